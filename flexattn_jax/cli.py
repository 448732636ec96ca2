"""The ``flexattn-jax`` command: demo, generate, convert, train, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, get_args

if TYPE_CHECKING:
    from flexattn_jax.config import ModelConfig

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
    "bench": ("bench.cli", "main"),
}


def generate_parser(prog: str = "flexattn-jax generate") -> argparse.ArgumentParser:
    from flexattn_jax.generate import HRStrategy

    p = argparse.ArgumentParser(
        prog=prog,
        description="Answer questions about images with a converted checkpoint: one --image and --prompt, or a --batch "
        "JSONL. Batches are left-padded to length buckets (one compile per bucket) and run jitted; a bad item "
        "(missing, corrupt or undecodable image, empty or too long prompt, more than one <image>) gets an 'error' "
        "in the output and the other items are still answered.",
    )
    p.add_argument("--checkpoint", required=True, help="a directory written by `flexattn-jax convert` (params + tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file (with --prompt); a failure exits with status 1 and a message on stderr")
    src.add_argument("--batch", help="JSONL with one {\"image\": path, \"prompt\": text} object per line (blank lines skipped)")
    p.add_argument("--prompt", help="the question about --image (an optional <image> tag is moved to the front)")
    p.add_argument("--output", help="JSONL of answers for --batch, one per input line, in order: image, prompt, answer, "
                   "error (null when fine) and, with --save-attention, attention (the PNG) (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per item, EOS included (default: 64)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="items per jitted batch; a multiple of the mesh's data axis with --mesh (default: 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass with --temperature > 0 (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute/param dtype (default: as converted)")
    p.add_argument("--hr-budget", default=None, help="HR tokens per select row: a count, a fraction of M, or 'all'")
    p.add_argument("--hr-strategy", choices=list(get_args(HRStrategy)), default="project",
                   help="where HR keys/values are projected (all give the same tokens): 'project' the K selected tokens "
                   "at every step (the release; cheapest prefill), 'cache' all M once at prefill (fewer FLOPs once the "
                   "answer is longer than about M/K - 1 tokens; Lh x M x Hkv x d x 2 values per sample); see "
                   "flexattn_jax.generate for the others (default: project)")
    p.add_argument("--mesh", metavar="SPEC", default=None,
                   help="data parallel over devices, e.g. 'data=8' or 'data=-1' (all devices): parameters replicated, "
                   "each batch split over the data axis (default: one device)")
    p.add_argument("--save-attention", metavar="DIR", default=None,
                   help="write one PNG per answered item into DIR (created): the last prompt token's attention over "
                   "the LR image and the HR tokens selected for the last hierarchical layer, over the image "
                   "(FlexAttention checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. flex.threshold=48")
    return p


def read_batch(path: str | Path) -> list:
    """The requests of a JSONL file; a bad line raises ValueError naming the file and the line."""
    from flexattn_jax.inference import Request

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read --batch file {path}: {e.strerror or e}") from e
    requests = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e})") from e
        if not isinstance(item, dict):
            raise ValueError(f"{path} line {n}: expected an object {{\"image\": ..., \"prompt\": ...}}, got {type(item).__name__}")
        for key in ("image", "prompt"):
            if key not in item:
                raise ValueError(f"{path} line {n}: missing field {key!r}")
            if not isinstance(item[key], str):
                raise ValueError(f"{path} line {n}: field {key!r} must be a string, got {type(item[key]).__name__}")
        requests.append(Request(item["image"], item["prompt"]))
    return requests


def _png_name(index: int, image) -> str:
    stem = Path(image).stem if isinstance(image, str | Path) else "image"
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:60]}.png"


def save_attention_pngs(out_dir: str | Path, requests: list, answers: list, cfg) -> list[str | None]:
    """One overlay PNG per answered item (see :mod:`flexattn_jax.visualize`); the paths, None where skipped."""
    from flexattn_jax.inference import request_image
    from flexattn_jax.visualize import answer_maps, mask_layer, save_overlay

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = mask_layer(cfg)
    paths: list[str | None] = []
    for i, (req, ans) in enumerate(zip(requests, answers, strict=True)):
        att, mask = answer_maps(ans, cfg, layer)
        if ans.error or att is None:
            paths.append(None)
            continue
        title = f"{req.prompt[:60]!r} -> {(ans.text or '')[:40]!r}"
        paths.append(str(save_overlay(out_dir / _png_name(i, req.image), request_image(req), att, mask, title=title, layer=layer)))
    return paths


def check_generate_args(args: argparse.Namespace) -> None:
    """The generate flags that need no checkpoint, and every output path, checked before any work.

    Raises ValueError (an :class:`~flexattn_jax.paths.OutputPathError` for paths) naming the flag and value.
    """
    from flexattn_jax.config import parse_hr_budget
    from flexattn_jax.paths import check_output_dir, check_output_file

    if args.image and args.prompt is None:
        raise ValueError("--image needs --prompt")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: use a finite value >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:  # NaN fails too
        raise ValueError(f"--top-p {args.top_p}: use a nucleus mass in (0, 1]")
    if args.hr_budget is not None:
        parse_hr_budget(args.hr_budget, name="--hr-budget")
    inputs = [args.checkpoint, args.batch, args.image]
    if args.batch and args.output:
        check_output_file(args.output, sources=inputs, flag="--output")
    if args.save_attention:
        check_output_dir(args.save_attention, sources=inputs, exist_ok=True, flag="--save-attention")


def check_context(cfg: ModelConfig, max_new_tokens: int) -> None:
    """``--max-new-tokens`` must leave room for a prompt with its image in the model's context."""
    from flexattn_jax.preprocess import BUCKETS

    least = cfg.num_image_tokens + 2  # BOS, the image, one token of prompt
    room = min(max(BUCKETS), cfg.text.max_position_embeddings - max_new_tokens)
    if room < least:
        most = cfg.text.max_position_embeddings - least
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: the model's context is {cfg.text.max_position_embeddings} tokens "
            f"(max_position_embeddings) and a prompt with its image needs at least {least}; use at most {most}"
        )


def _generate_config(args: argparse.Namespace, cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``--set`` and ``--hr-budget`` applied (validated)."""
    from flexattn_jax.config import apply_overrides, parse_hr_budget

    cfg = apply_overrides(cfg, list(args.set))
    if args.hr_budget is not None:
        cfg = apply_overrides(cfg, {"flex.hr_budget": parse_hr_budget(args.hr_budget, name="--hr-budget")})
    return cfg


def _generate(argv: list[str]) -> int:
    from convert import load_converted, read_config
    from flexattn_jax.inference import Request, answer, check_batch_size
    from flexattn_jax.sharding import make_mesh, replicated
    from flexattn_jax.tokenizer import check_tokenizer_vocab, load_tokenizer

    args = generate_parser().parse_args(argv)
    try:  # every check that can fail runs before the parameters are restored
        check_generate_args(args)
        cfg = _generate_config(args, read_config(args.checkpoint))
        check_context(cfg, args.max_new_tokens)
        tokenizer = load_tokenizer(args.checkpoint)
        check_tokenizer_vocab(tokenizer, cfg.text.vocab_size)
        requests = [Request(args.image, args.prompt)] if args.image else read_batch(args.batch)
        try:
            mesh = None if args.mesh is None else make_mesh(args.mesh)
        except ValueError as e:
            raise ValueError(f"--mesh {args.mesh!r}: {e}") from e
        check_batch_size(mesh, args.batch_size)
        params, cfg = load_converted(args.checkpoint, dtype=args.dtype, sharding=None if mesh is None else replicated(mesh))
        cfg = _generate_config(args, cfg)
    except (ValueError, OSError) as e:  # ConvertError, ShardingError, ConfigError, OutputPathError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats: dict = {}
    answers = answer(
        params, cfg, tokenizer, requests, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, hr_strategy=args.hr_strategy, stats=stats,
        mesh=mesh, progress=args.batch is not None,
    )
    pngs: list[str | None] = [None] * len(answers)
    if args.save_attention:
        if not cfg.flex.enabled:
            print("warning: --save-attention: FlexAttention is off in this checkpoint, no attention maps to draw", file=sys.stderr)
        pngs = save_attention_pngs(args.save_attention, requests, answers, cfg)
    if args.image:
        a = answers[0]
        if a.error:
            print(f"error: {a.error}", file=sys.stderr)
            return 1
        print(a.text)
    else:
        out = open(args.output, "w") if args.output else sys.stdout
        for req, a, png in zip(requests, answers, pngs, strict=True):
            record = {"image": str(req.image), "prompt": req.prompt, "answer": a.text, "error": a.error}
            if args.save_attention:
                record["attention"] = png
            out.write(json.dumps(record) + "\n")
        if args.output:
            out.close()
        failed = sum(a.error is not None for a in answers)
        if failed:
            print(f"{failed} of {len(answers)} items failed (see their 'error')", file=sys.stderr)
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
