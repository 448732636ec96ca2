"""The ``flexattn-jax`` command: demo, generate, convert, train, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

USAGE = """flexattn-jax COMMAND [options]

commands:
  demo       run the built-in demo (tiny model, synthetic high-resolution task; no downloads)
  generate   answer questions about images with a converted checkpoint (single or JSONL batch)
  convert    convert a PyTorch LLaVA / FlexAttention checkpoint (see `flexattn-jax convert --help`)
  train      fine-tune on LLaVA-format data over a device mesh (see `flexattn-jax train --help`)
  bench      FLOP and time benchmarks (see `flexattn-jax bench --help`)

Run `flexattn-jax COMMAND --help` for each command's options.
"""

# command -> (module, entry point taking argv)
_DELEGATES = {
    "demo": ("flexattn_jax.demo", "main"),
    "convert": ("convert.cli", "main"),
    "train": ("train.cli", "main"),
    "bench": ("bench.flops", "main"),
}


def generate_parser(prog: str = "flexattn-jax generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Answer questions about images with a converted checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a directory written by `flexattn-jax convert`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file (with --prompt)")
    src.add_argument("--batch", help="JSONL of {\"image\": path, \"prompt\": text} per line")
    p.add_argument("--prompt", help="the question about --image")
    p.add_argument("--output", help="JSONL of answers for --batch (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute/param dtype (default: as converted)")
    p.add_argument("--hr-budget", default=None, help="HR tokens per select row: a count, a fraction of M, or 'all'")
    p.add_argument("--hr-strategy", choices=["project", "cache"], default="project", help="HR K/V: project per step or cache all M")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. flex.threshold=48")
    return p


def _generate(argv: list[str]) -> int:
    import dataclasses

    from convert import load_converted
    from flexattn_jax.config import apply_overrides
    from flexattn_jax.inference import Request, answer
    from flexattn_jax.tokenizer import load_tokenizer

    args = generate_parser().parse_args(argv)
    if args.image and not args.prompt:
        print("error: --image needs --prompt", file=sys.stderr)
        return 2
    params, cfg = load_converted(args.checkpoint, dtype=args.dtype)
    overrides = list(args.set)
    if args.hr_budget is not None:
        budget = "None" if args.hr_budget == "all" else args.hr_budget
        overrides.append(f"flex.hr_budget={budget}")
    cfg = apply_overrides(cfg, overrides)
    cfg = dataclasses.replace(cfg)
    tokenizer = load_tokenizer(args.checkpoint)
    if args.image:
        requests = [Request(args.image, args.prompt)]
    else:
        lines = [ln for ln in Path(args.batch).read_text().splitlines() if ln.strip()]
        requests = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                requests.append(Request(item["image"], item["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                print(f"error: {args.batch} line {n}: {e}", file=sys.stderr)
                return 2
    stats: dict = {}
    answers = answer(
        params, cfg, tokenizer, requests, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, hr_strategy=args.hr_strategy, stats=stats,
    )
    if args.image:
        a = answers[0]
        if a.error:
            print(f"error: {a.error}", file=sys.stderr)
            return 1
        print(a.text)
    else:
        out = open(args.output, "w") if args.output else sys.stdout
        for req, a in zip(requests, answers, strict=False):
            out.write(json.dumps({"image": str(req.image), "prompt": req.prompt, "answer": a.text, "error": a.error}) + "\n")
        if args.output:
            out.close()
    print(f"{stats.get('tokens', 0)} tokens in {stats.get('seconds', 0):.1f} s ({stats.get('tokens_per_s', 0):.1f} tokens/s)",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "generate":
        return _generate(rest)
    if command not in _DELEGATES:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module, func = _DELEGATES[command]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        print(f"`flexattn-jax {command}` is not available in this build ({e})", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
