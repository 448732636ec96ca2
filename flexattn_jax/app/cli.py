"""The ``flexattn-jax`` command: a dispatcher to each command's module (each parses its own options)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from flexattn_jax import GOOGLE_PCI_VENDOR, skip_absent_tpu  # noqa: F401 - in the library: it runs at its import

USAGE = """flexattn-jax [--log-level LEVEL] COMMAND [options]

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
--log-level debug|info|warning|error (or the FLEXATTN_JAX_LOG environment variable; default info): the log
records on stderr; results (answers, tables, JSON summaries) go to stdout.
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


# Commands whose package is not installed (pyproject's packages.find leaves it out: no top-level `bench` in
# site-packages): they run from a source checkout, the tree an editable install (`pip install -e .`) points at.
SOURCE_ONLY = {"bench": "bench"}
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding flexattn_jax/ (site-packages when installed)


def source_package(command: str, root: Path | None = None) -> str | None:
    """Put the source checkout on ``sys.path`` for a :data:`SOURCE_ONLY` command's package; the one-line reason
    when there is none (an installed wheel), else None."""
    package = SOURCE_ONLY[command]
    root = SOURCE_ROOT if root is None else root
    if not (root / package / "__init__.py").is_file():
        return (f"`flexattn-jax {command}` runs from a source checkout (git clone, then pip install -e .): "
                f"the {package}/ package is not installed with flexattn-jax, and {root} has none")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    skip_absent_tpu()  # before any command imports jax
    from flexattn_jax.logs import configure_logging

    level = None
    if argv[:1] == ["--log-level"] or argv[:1] and argv[0].startswith("--log-level="):
        level = argv[0].partition("=")[2] if "=" in argv[0] else (argv[1] if len(argv) > 1 else "")
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    try:
        if level == "":
            raise ValueError("--log-level needs a level: debug, info, warning or error")
        configure_logging(level)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in _DELEGATES:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func = _DELEGATES[command]
    if command in SOURCE_ONLY and (why := source_package(command)) is not None:
        print(why, file=sys.stderr)
        return 2
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
