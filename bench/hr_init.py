"""Fine-tuning a plain LLaVA into LLaVA-FlexAttn: ``k_hr``/``v_hr`` copied from ``k``/``v`` (as they are, or with the
input norm folded in: ``copy-normed``, the demo's) vs random N(0, 0.02).

On the demo's task (:mod:`flexattn_jax.app.demo`: a tiny LLaVA pretrained on 56 px close-ups, then
fine-tuned with FlexAttention on 168 px images where only the HR tokens show the pattern) one
pretrained model per seed is fine-tuned twice, identically except for the init of the new HR
projections (``params.add_hr_projections(init=...)``, what ``train --hr-init`` uses), and without the demo's
grounding term (``demo.FINETUNE_GROUNDING``), so that the loss curves show the init alone. Reported per
seed and init: the loss curve's smoothed value (mean over a trailing window) at a few points, and the
steps until it first reaches each target loss (``null``: not within the budget).

    python -m bench.hr_init                  # demo budget (400 + 600 steps), seeds 0 1 2
    python -m bench.hr_init --quick          # 150 + 200 steps, 512 samples, seeds 0 1: a smoke run (both stay
                                             # on the LR-only plateau, loss ~0.69, within 200 steps)

Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flexattn_jax.app import demo
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.params import HR_INITS

TARGETS = (1.0, 0.7, 0.5, 0.3, 0.2)


def smoothed(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start): step s's value uses steps max(1, s-window+1)..s."""
    x = np.asarray(losses, np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def steps_to(curve: np.ndarray, target: float) -> int | None:
    """First 1-based step whose smoothed loss is <= ``target``, or None."""
    hit = np.nonzero(curve <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def run_seed(seed: int, budget: demo.Budget, lr: float, window: int, targets: tuple[float, ...], scratch: Path,
             progress: bool, inits: tuple[str, ...] = HR_INITS) -> dict[str, Any]:
    """Pretrain once, fine-tune with each HR init; per init the loss curve and steps to each target."""
    tok = build_demo_tokenizer()
    cfg = demo.demo_model_config(len(tok))
    close_ups, train_items, _ = demo.splits(cfg, budget, seed)
    t0 = time.perf_counter()
    plain, pre, _ = demo.pretrain_stage(cfg, close_ups, seed, tok, budget, scratch / f"s{seed}", progress)
    plain = jax.device_get(plain)
    out: dict[str, Any] = {"seed": seed, "pretrain_last_loss": pre["last_loss"], "pretrain_seconds": time.perf_counter() - t0}
    for init in inits:
        params, _ = demo.hr_projections(plain, cfg, train_items, init, seed)
        t0 = time.perf_counter()
        _, summary, records = demo.train_stage(f"finetune-{init}", cfg, params, train_items, budget.finetune_steps, lr,
                                               demo.FINETUNE_TRAINABLE, tok, budget, scratch / f"s{seed}", progress)
        losses = [r["loss"] for r in records]
        curve = smoothed(losses, window)
        marks = sorted({max(1, len(losses) // 4), max(1, len(losses) // 2), len(losses)})
        out[init] = {
            "first_loss": losses[0], "smoothed_at": {str(m): float(curve[m - 1]) for m in marks},
            "steps_to": {str(t): steps_to(curve, t) for t in targets}, "seconds": time.perf_counter() - t0,
            "losses": losses,
        }
    return out


def table(results: dict[str, Any]) -> str:
    """Per seed and target: steps to reach it with each init that ran, and each init's final smoothed loss."""
    targets = results["targets"]
    lines = []
    for r in results["seeds"]:
        inits = [i for i in HR_INITS if i in r]
        if not lines:
            lines.append(f"{'seed':>4} {'target':>7} " + " ".join(f"{i:>12}" for i in inits))
        for t in targets:
            lines.append(f"{r['seed']:>4} {t:>7.2f} " + " ".join(f"{r[i]['steps_to'][str(t)] or '-':>12}" for i in inits))
        lines.append(f"{r['seed']:>4} final smoothed loss: " + ", ".join(
            f"{i} {r[i]['smoothed_at'][str(len(r[i]['losses']))]:.4f}" for i in inits))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hr_init", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="150 + 200 steps, 512 samples per stage, seeds 0 1")
    p.add_argument("--seeds", help="comma list of seeds (default 0,1,2; --quick 0,1)")
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--steps", type=int, help="fine-tuning steps per init")
    p.add_argument("--samples", type=int, help="pretraining and fine-tuning samples")
    p.add_argument("--lr", type=float, default=demo.FINETUNE_LR, help=f"fine-tuning peak lr (the demo's, default {demo.FINETUNE_LR:g})")
    p.add_argument("--window", type=int, default=10, help="smoothing window in steps (default 10)")
    p.add_argument("--targets", help=f"comma list of target losses (default {','.join(map(str, TARGETS))})")
    p.add_argument("--inits", default=",".join(HR_INITS),
                   help="comma list of HR inits to fine-tune with (default all three; one each in two processes runs them "
                   "in parallel: the pretraining is deterministic, so both start from the same model)")
    p.add_argument("--scratch", help="directory for the stages' checkpoints (default: a temporary one, removed)")
    p.add_argument("--progress", action="store_true", help="print the train loop's metric lines")
    a = p.parse_args(argv)
    budget = dataclasses.replace(demo.FULL, test_samples=1)
    if a.quick:
        budget = dataclasses.replace(budget, pretrain_steps=150, finetune_steps=200, pretrain_samples=512, finetune_samples=512)
    given = {"pretrain_steps": a.pretrain_steps, "finetune_steps": a.steps, "pretrain_samples": a.samples,
             "finetune_samples": a.samples}
    budget = dataclasses.replace(budget, **{k: v for k, v in given.items() if v is not None})
    for k, v in dataclasses.asdict(budget).items():
        if v < 1:
            p.error(f"{k} must be >= 1, got {v}")
    if budget.batch_size % jax.device_count():
        p.error(f"batch {budget.batch_size} is not a multiple of the {jax.device_count()} devices")
    seeds = [int(x) for x in (a.seeds or ("0,1" if a.quick else "0,1,2")).split(",")]
    targets = tuple(float(x) for x in a.targets.split(",")) if a.targets else TARGETS
    inits = tuple(a.inits.split(","))
    if not set(inits) <= set(HR_INITS):
        p.error(f"--inits: choose from {', '.join(HR_INITS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hr_init_") as tmp:
        scratch = Path(a.scratch) if a.scratch else Path(tmp)
        per_seed = []
        for s in seeds:
            per_seed.append(run_seed(s, budget, a.lr, a.window, targets, scratch / f"{s}-{'-'.join(inits)}", a.progress, inits))
            print(f"seed {s} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    results = {
        "benchmark": "hr_init", "budget": dataclasses.asdict(budget), "lr": a.lr, "window": a.window, "targets": list(targets),
        "devices": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__, "seeds": per_seed,
        "seconds": time.perf_counter() - t0,
    }
    print(table(results), file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
