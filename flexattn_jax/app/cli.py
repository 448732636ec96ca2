"""The ``flexattn-jax`` command: a dispatcher to each command's module (each parses its own options)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from flexattn_jax import GOOGLE_PCI_VENDOR, skip_absent_tpu  # noqa: F401 - in the library: it runs at its import

USAGE = """flexattn-jax COMMAND [options]

commands:
  demo       run the built-in demo (tiny model, synthetic high-resolution task; no downloads)
  generate   answer questions about images with a converted checkpoint (single or JSONL batch)
  convert    convert a PyTorch LLaVA / FlexAttention checkpoint (see `flexattn-jax convert --help`)
  train      fine-tune on LLaVA-format data over a device mesh (see `flexattn-jax train --help`)
  bench      FLOP and time benchmarks (see `flexattn-jax bench --help`)
  eval       V* Bench, MagnifierBench, TextVQA, VQA in the paper's protocols (see `flexattn-jax eval --help`)
  serve      an OpenAI-compatible HTTP server batching concurrent requests (see `flexattn-jax serve --help`)
  compile    compile a program for a TPU slice or GPU node from this host: fit, kernels, estimated speed

Run `flexattn-jax COMMAND --help` for each command's options.
"""

# command -> (module, entry point taking argv)
_DELEGATES = {
    "generate": ("flexattn_jax.app.generate_cli", "main"),
    "demo": ("flexattn_jax.app.demo", "main"),
    "convert": ("convert.cli", "main"),
    "train": ("train.cli", "main"),
    "bench": ("bench.cli", "main"),
    "eval": ("flexattn_jax.app.eval.cli", "main"),
    "compile": ("flexattn_jax.app.aot", "main"),
    "serve": ("flexattn_jax.app.serve", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()  # before any command imports jax
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _DELEGATES:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func = _DELEGATES[command]
    from flexattn_jax.interrupt import early_signals, exit_code

    restore = early_signals()  # Ctrl-C and SIGTERM stop the command even when SIGINT was inherited as ignored
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            print(f"`flexattn-jax {command}` is not available in this build ({e})", file=sys.stderr)
            return 2
        return int(getattr(mod, func)(rest) or 0)
    except KeyboardInterrupt as e:  # before the command reached its work (Terminated: SIGTERM)
        print("\ninterrupted", file=sys.stderr)
        return exit_code(e)
    finally:
        restore()


if __name__ == "__main__":
    raise SystemExit(main())
