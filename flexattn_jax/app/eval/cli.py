"""``flexattn-jax eval TASK``: the paper's benchmarks in their protocols, resumable, with accuracy-vs-cost sweeps."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flexattn_jax.app.eval.data import TASKS, EvalDataError, read_task
from flexattn_jax.app.eval.runner import METRICS, PREDICTIONS, EvalSettings, Interrupted, OutputWriteError, Runner
from flexattn_jax.app.eval.sweep import budget_dir, parse_budgets, plot_sweep, sweep_table
from flexattn_jax.app.inference import generation_args
from flexattn_jax.quant import MODES as QUANT_MODES

# the release's scripts generate up to 512 tokens; LLaVA's model_vqa_loader (letter / generic VQA) 128
DEFAULT_MAX_NEW_TOKENS = {"magnifier": 512, "textvqa": 512, "vstar": 128, "vqa": 128}

DESCRIPTION = """Evaluate a converted checkpoint on the FlexAttention paper's benchmarks, in the protocols that
produced its table (V* Bench 54.5, MagnifierBench 35.0, TextVQA 48.9; LLaVA-1.5: 47.6 / 26.8 / 46.0).

tasks and the protocol each follows:
  vstar      --data the V* Bench folder (direct_attributes/, relative_position/).
             --protocol likelihood (default; the FlexAttention release's scripts/evaluation/eval_vbench.py):
             each option scored by the mean cross-entropy of its tokens after "ASSISTANT:", lowest wins;
             the model runs as the release runs it, in training mode: select rows = the option's learnable
             rows, alpha 1. Each option token's row selects from its own attention, as the newest token
             does in cached decoding, so these losses equal teacher-forced generation's.
             --protocol letter (LLaVA's multiple-choice prompt): options lettered in a per-sample shuffled
             order, "Answer with the option's letter from the given choices directly.", greedy.
  magnifier  --data the MagnifierBench folder (Otter's data_instructions.json + images.json), as the
             release's eval_magnifier.py: options on their own lines, the letter instruction, greedy, and
             its answer parser ("The answer is X", else the first of A-D found, else "other").
  textvqa    --data TextVQA_0.5.1_val.json (images in --images, default train_images/ next to it) or
             LLaVA's llava_textvqa_val_v051_ocr.jsonl with --annotations TextVQA_0.5.1_val.json. Prompt of
             the release's eval_textvqa.py (no OCR tokens); --ocr-tokens uses LLaVA's own prompt with the
             "Reference OCR token:" line (LLaVA's reported scale, not the release's). Scored like LLaVA's
             eval_textvqa.py (m4c evaluator): VQA soft accuracy after the standard answer normalisation.
  vqa        --data JSONL of {"image", "question", "answers"} (POPE, GQA-style): exact match after
             normalisation; LLaVA's POPE accuracy / precision / recall / F1 when the answers are yes/no.

Predictions go to OUT/predictions.jsonl as items finish, after a header record (the checkpoint's
fingerprint and every setting that changes a prediction); re-running with the same --out skips the
finished items, and refuses (leaving the file as it is) a predictions file with another header or one
this command did not write. One run writes an --out at a time: it holds OUT.lock (with its PID) for the whole
run; a second run on the same --out is refused at once, naming that PID (a lock left by a killed run is taken
over). Ctrl-C or SIGTERM finishes the batch in flight and exits with 130 or 143;
re-running resumes. The headline accuracy counts every item, a failed one as wrong, beside the number
scored; exit status 1 when no item was scored or predictions.jsonl cannot be written (a full disk),
2 on bad arguments or an --out in use by another run.
OUT/metrics.json holds the metrics, the mean TFLOPs per item (XLA cost analysis of the
programs that ran) and the wall time. OUT/results.json and OUT/samples_<task>.jsonl hold the same run in
lmms-eval's layout and names (vstar_bench: vstar_overall_acc, vstar_<category>_acc, 0-100; textvqa_val:
exact_match, 0-1), each result naming its protocol and select rows. lmms-eval's vstar_bench is the
letter protocol; the paper's V* figure is the likelihood one. --sweep-budget runs the task at several HR budgets (OUT/budget-*/)
and writes OUT/sweep.json and OUT/sweep.png (accuracy against TFLOPs per item).
"""


EVAL_OPTIONS = generation_args(("batch_size", "max_new_tokens", "hr_budget"),
                               defaults={"max_new_tokens": (None, "512 for magnifier and textvqa as the release, 128 otherwise")})
"""eval's flags of the generation options; ``--max-new-tokens`` defaults by task (:data:`DEFAULT_MAX_NEW_TOKENS`)."""


def eval_parser(prog: str = "flexattn-jax eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS, metavar="TASK", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--checkpoint", required=True, help="a directory written by `flexattn-jax convert` (params + tokenizer)")
    p.add_argument("--data", required=True, help="the data set as its authors ship it (see above)")
    p.add_argument("--images", default=None, help="image folder for textvqa / vqa (default: see above)")
    p.add_argument("--annotations", default=None, help="textvqa with LLaVA's JSONL: the official TextVQA_0.5.1_val.json")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--out", default=None, help="output folder (default: eval-TASK); re-running with it resumes")
    p.add_argument("--mesh", metavar="SPEC", default=None,
                   help="devices to run on, e.g. 'data=8' or 'data=2,tensor=4': parameters sharded by the rules table, batches "
                   "split over data (default: one device)")
    p.add_argument("--sweep-budget", default=None, metavar="B1,B2,...",
                   help="run at each of these HR budgets, e.g. 0.05,0.1,0.25,all: a table and OUT/sweep.png")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute/param dtype (default: as converted)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None, help="weight-only quantise the decoder linears at load")
    p.add_argument("--mode", choices=["release", "inference"], default="release",
                   help="vstar likelihood: 'release' (the only select-row mode: each option token's row selects, as in "
                        "cached decoding); 'inference' is an alias of it, kept for old command lines")
    p.add_argument("--protocol", choices=["likelihood", "letter"], default="likelihood", help="vstar only (default: likelihood)")
    p.add_argument("--ocr-tokens", action="store_true", help="textvqa: LLaVA's prompt with the Reference OCR token line")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. flex.threshold=48")
    p.add_argument("--compile-cache", metavar="DIR", default=None, help="persistent compilation cache folder")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    EVAL_OPTIONS.add(p.add_argument_group("generation (GenerationOptions)", "greedy; --batch-size is also the option rows "
                                          "per likelihood forward"))
    return p


def metrics_table(m: dict[str, Any]) -> str:
    """The printed summary of one run."""
    how = {"likelihood": f"option likelihood, mode {m.get('mode')}", "letter": "letter choice, greedy",
           "generate": "greedy generation"}[m["protocol"]]
    if m.get("ocr_tokens"):
        how += ", with OCR tokens (LLaVA's prompt)"
    lines = [f"{m['task']} ({how}), HR budget {m['hr_budget']} (K={m['hr_budget_tokens']})",
             f"  items {m['items']}: scored {m['scored']}, failed {m['failed']}"]
    for f in m["failures"][:10]:
        lines.append(f"    failed {f['id']}: {f['error']}")
    if m["failed"] > 10:
        lines.append(f"    ... and {m['failed'] - 10} more (see metrics.json)")
    for c, v in (m.get("categories") or {}).items():
        lines.append(f"  {c:<24} {v['accuracy']:7.2f} %  ({v['items']} items, {v.get('scored', v['items'])} scored)")
    acc = "-" if m["accuracy"] is None else f"{m['accuracy']:7.2f} %"
    scored = "-" if m.get("accuracy_scored") is None else f"{m['accuracy_scored']:.2f} %"
    lines.append(f"  {'accuracy' if m['task'] != 'textvqa' else 'VQA accuracy':<24} {acc}  over all {m['items']} items, "
                 f"failed ones as wrong ({m['scored']} scored: {scored} of those)")
    if "pope" in m:
        lines.append("  POPE " + ", ".join(f"{k} {v:.2f}" for k, v in m["pope"].items()))
    tf = m.get("tflops_per_item")
    lines.append(f"  TFLOPs per item {'-' if tf is None else f'{tf:.6g}'}; wall time {m['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from flexattn_jax.interrupt import StopRequests

    args = eval_parser().parse_args(argv)
    with StopRequests() as stop, contextlib.ExitStack() as held:
        return _eval(args, stop, held)


def _eval(args: argparse.Namespace, stop, held: contextlib.ExitStack) -> int:
    """The command after parsing; ``held`` keeps the --out lock until the command returns."""
    err = lambda msg: print(f"error: {msg}", file=sys.stderr) or 2  # noqa: E731
    if args.task != "vstar" and (args.protocol != "likelihood" or args.mode != "release"):
        return err("--protocol and --mode apply to vstar only")
    if args.ocr_tokens and args.task != "textvqa":
        return err("--ocr-tokens applies to textvqa only")
    if args.limit is not None and args.limit < 1:
        return err(f"--limit {args.limit} must be at least 1")
    if args.sweep_budget and args.hr_budget:
        return err("give --hr-budget or --sweep-budget, not both")
    max_new = DEFAULT_MAX_NEW_TOKENS[args.task] if args.max_new_tokens is None else args.max_new_tokens
    try:
        options = EVAL_OPTIONS.build(args, max_new_tokens=max_new)
    except ValueError as e:
        return err(str(e))
    from flexattn_jax.app.resume import lock_output
    from flexattn_jax.overrides import parse_hr_budget
    from flexattn_jax.paths import check_output_dir

    out = Path(args.out or f"eval-{args.task}")
    try:
        budgets = parse_budgets(args.sweep_budget) if args.sweep_budget else [options.hr_budget]
        for b in budgets:  # every budget checked before anything is loaded
            if b is not None:
                parse_hr_budget(b, name="--sweep-budget" if args.sweep_budget else "--hr-budget")
        check_output_dir(out, sources=[args.checkpoint, args.data, args.images, args.annotations], exist_ok=True, flag="--out")
        items = list(read_task(args.task, args.data, args.images, args.annotations, args.limit))
        if not items:
            raise EvalDataError(f"{args.data}: no {args.task} samples found")
        if not Path(args.checkpoint).is_dir():  # before the lock, which makes --out's parent directory
            raise EvalDataError(f"--checkpoint {args.checkpoint}: no such model directory")
        lock = held.enter_context(lock_output(out, "--out"))  # one run writes a run directory at a time
        if lock.stale_pid is not None:
            print(f"note: took over the lock of {out} left by PID {lock.stale_pid} (no longer running)", file=sys.stderr)
    except (EvalDataError, ValueError) as e:
        return err(str(e))
    from flexattn_jax.app.compile_cache import setup_compile_cache
    from flexattn_jax.app.eval.runner import predictions_header, read_predictions
    from flexattn_jax.app.generate_cli import check_backend
    from flexattn_jax.app.inference import load_for_inference
    from flexattn_jax.app.resume import checkpoint_fingerprint
    from flexattn_jax.checkpoint import read_config
    from flexattn_jax.overrides import apply_overrides
    from flexattn_jax.tokenizer import check_tokenizer_vocab, load_tokenizer

    def run_dir(budget: str | None) -> Path:
        return out / budget_dir(budget) if args.sweep_budget else out

    try:  # before loading: the kernel fits the backend, each run's predictions file is this run's (else refused)
        base = apply_overrides(read_config(args.checkpoint), list(args.set))
        check_backend(base)
        fingerprint = checkpoint_fingerprint(args.checkpoint)
        settings = [EvalSettings(
            args.task, protocol=args.protocol, mode="release", ocr_tokens=args.ocr_tokens,
            generation=replace(options, hr_budget=b), checkpoint=fingerprint,
            extra={"hr_budget": b or "checkpoint", "dtype": args.dtype or base.dtype, "quantize": args.quantize,
                   "overrides": list(args.set)},
        ) for b in budgets]
        for b, st in zip(budgets, settings, strict=True):
            read_predictions(run_dir(b) / PREDICTIONS, predictions_header(st))
    except (ValueError, OSError) as e:
        return err(str(e))
    if stop.requested:
        return stop.exit_code
    setup_compile_cache(args.compile_cache, disabled=args.no_compile_cache)
    try:
        params, cfg, mesh = load_for_inference(args.checkpoint, args.dtype, args.mesh, options.batch_size, args.quantize)
        cfg = apply_overrides(cfg, list(args.set))
        if args.sweep_budget and not cfg.flex.enabled:
            raise ValueError("--sweep-budget: FlexAttention is off in this checkpoint (no HR budget to sweep)")
        cfgs = [st.generation.model_config(cfg) for st in settings]
        tokenizer = load_tokenizer(args.checkpoint)
        check_tokenizer_vocab(tokenizer, cfg.text.vocab_size)
    except (ValueError, OSError) as e:
        return err(str(e))
    log = logging.getLogger(__name__).info
    t0 = time.perf_counter()
    rows = []
    for budget, cfg_b, st in zip(budgets, cfgs, settings, strict=True):
        where = run_dir(budget)
        runner = Runner(params, cfg_b, tokenizer, st, mesh=mesh, progress=not args.no_progress, log=log)
        if stop.requested:
            return stop.exit_code
        try:
            metrics = runner.run(items, where, stop=lambda: stop.requested)
        except (KeyboardInterrupt, Interrupted):
            log(f"interrupted: finished items are in {where / PREDICTIONS}; re-run the same command to resume")
            return stop.exit_code
        except ValueError as e:  # ResumeError: another run's predictions file
            return err(str(e))
        except OutputWriteError as e:  # a full disk
            err(str(e))
            return 1
        print(metrics_table(metrics))
        print(f"  predictions: {where / PREDICTIONS}; metrics: {where / METRICS}")
        rows.append(metrics)
        if not metrics["scored"]:
            err(f"no item was scored ({metrics['failed']} of {metrics['items']} failed; see {where / METRICS})")
            return 1
    if args.sweep_budget:
        summary = [{k: m.get(k) for k in ("hr_budget", "hr_budget_tokens", "accuracy", "tflops_per_item", "wall_s", "scored",
                                          "failed")} for m in rows]
        (out / "sweep.json").write_text(json.dumps({"task": args.task, "budgets": summary}, indent=2) + "\n")
        png = plot_sweep(summary, out / "sweep.png", f"{args.task}: accuracy vs cost per HR budget")
        print(sweep_table(summary))
        print(f"  sweep: {out / 'sweep.json'}, plot: {png}; total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
