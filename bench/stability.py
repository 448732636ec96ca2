"""How stable is the HR selection across decode steps? It sizes the incremental HR K/V cache.

At every decode step each hierarchical layer attends to the HR tokens selected by the layer below
(release semantics: the selection is recomputed from the new token's attention). The incremental
cache (``hr_strategy='incremental'``) projects only tokens a layer has not projected before, at most
``flex.hr_step_cells`` pooled cells' worth per step on its fast path, else an exact fallback that
projects all K. This benchmark generates answers, counts per (step, hierarchical layer) the tokens
selected for the first time, and reports for each budget of new cells per step:

* ``fallback_rate``: the share of layer-steps whose batch needs more than the budget (the fallback
  is taken for the whole batch, so it is measured at batch 1 and at the batch size given);
* ``projected_per_step``: expected projected tokens per layer-step, ``(1 - f) * budget + f * K``,
  against ``K`` for the 'project' strategy: the ratio is the decode-step HR projection saving.

Two sources: the demo's trained model (``--demo DIR``: a ``flexattn-jax demo`` output directory; its
held-out task images) and a random-weight model of the scaled benchmark config on random images.
Steps after a sample's EOS are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax.config import ModelConfig
from flexattn_jax.generate import GenerateOutput, generate

BUDGET_CELLS = (0, 1, 2, 3, 4, 8)


def new_tokens(out: GenerateOutput, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(counts (S, Lh, B), live (S, B))``: per decode step, tokens each hierarchical layer sees selected
    for the first time in the answer (the prefill's selection counts as seen), and whether the sample
    was still generating at that step."""
    masks = np.concatenate([np.asarray(out.prefill_maps.hr_masks)[None], np.asarray(out.step_maps.hr_masks)])  # (S+1, L, B, M)
    first = cfg.flex.first_select_layer
    used = masks[:, first:-1]  # hierarchical layer j attends with the mask made by layer j - 1
    seen = used[0].copy()
    counts = []
    for step in used[1:]:
        counts.append((step & ~seen).sum(-1))
        seen |= step
    lengths = np.asarray(out.lengths)  # tokens generated, EOS included: step s (feeding token s) is live if s < length - 1
    steps = np.arange(len(counts))[:, None]
    live = steps < (lengths[None, :] - 1)
    return np.array(counts), live


def budget_table(counts: np.ndarray, live: np.ndarray, cfg: ModelConfig, batch: int) -> list[dict[str, Any]]:
    """Fallback rate and expected projected tokens per layer-step for each budget, at batch 1 and ``batch``."""
    k, cell = cfg.hr_budget_tokens, cfg.hr_cell_tokens
    per_sample = counts.transpose(0, 2, 1)[live]  # (live sample-steps, Lh)
    rows = []
    for cells in BUDGET_CELLS:
        fast = min(k, cells * cell)
        f1 = float(np.mean(per_sample > fast)) if per_sample.size else 0.0
        # batch: groups of `batch` samples decode together; the fallback fires if any live sample needs it
        fb = []
        n = counts.shape[2]
        for start in range(0, n - batch + 1, batch):
            grp = counts[:, :, start : start + batch]
            alive = live[:, start : start + batch]
            need = (grp > fast) & alive[:, None, :]
            any_live = alive.any(axis=1)
            fb.append(need.any(axis=2)[any_live])
        fb_rate = float(np.mean(np.concatenate(fb))) if fb else float("nan")
        rows.append({
            "cells": cells, "fast_tokens": fast, "K": k,
            "fallback_rate_b1": f1, "projected_per_step_b1": (1 - f1) * fast + f1 * k,
            "fallback_rate_batch": fb_rate, "projected_per_step_batch": (1 - fb_rate) * fast + fb_rate * k,
        })
    return rows


def summarize(counts: np.ndarray, live: np.ndarray, cfg: ModelConfig) -> dict[str, Any]:
    per = counts.transpose(0, 2, 1)[live].reshape(-1)
    if not per.size:
        return {"layer_steps": 0}
    cells = per / cfg.hr_cell_tokens
    return {
        "layer_steps": int(per.size), "K": cfg.hr_budget_tokens, "cell_tokens": cfg.hr_cell_tokens,
        "zero_new_share": float(np.mean(per == 0)), "mean_new_tokens": float(per.mean()),
        "mean_new_cells": float(cells.mean()), "p90_new_cells": float(np.percentile(cells, 90)),
        "max_new_cells": float(cells.max()),
    }


def _run(params, cfg: ModelConfig, ids, pixels, mask, margin, steps: int) -> tuple[np.ndarray, np.ndarray]:
    out = generate(params, cfg, ids, pixels, mask, margin, max_new_tokens=steps, return_step_maps=True)
    return new_tokens(out, cfg)


def demo_source(demo_dir: Path, n: int, steps: int, budget: float | None) -> tuple[ModelConfig, np.ndarray, np.ndarray]:
    """The demo's trained model on its held-out task (its own questions; answers are a word + EOS)."""
    from flexattn_jax.app.demo import OBJECT_PX
    from flexattn_jax.app.demo_data import make_split
    from flexattn_jax.app.inference import Request, prepare
    from flexattn_jax.checkpoint import load_converted
    from flexattn_jax.preprocess import pad_batch
    from flexattn_jax.selection import margin_patches
    from flexattn_jax.tokenizer import load_tokenizer

    params, cfg = load_converted(demo_dir / "model")
    cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=budget))
    tokenizer = load_tokenizer(demo_dir / "model")
    items = make_split(4000, n, hr_size=cfg.image_size, obj_px=OBJECT_PX)
    prepared = [prepare(Request(img, q), cfg, tokenizer, 512) for img, q, _, _ in items]
    length = max(len(p.ids) for p in prepared)
    ids, mask = pad_batch([p.ids for p in prepared], length, pad_id=cfg.pad_token_id, side="left")
    pixels = np.stack([p.pixels for p in prepared])
    margin = margin_patches(np.array([p.ori_size for p in prepared]), cfg.lr_grid)
    counts, live = _run(params, cfg, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), jnp.asarray(margin), steps)
    return cfg, counts, live


def random_source(n: int, steps: int, budget: float | None, seed: int = 0) -> tuple[ModelConfig, np.ndarray, np.ndarray]:
    """A random-weight model of the scaled benchmark config on random images and prompts (no EOS stop)."""
    from bench.common import scaled_config
    from flexattn_jax.params import init_params

    cfg = scaled_config()
    cfg = dataclasses.replace(cfg, eos_token_id=-1, flex=dataclasses.replace(cfg.flex, hr_budget=budget))  # never stops
    rng = np.random.default_rng(seed)
    prompt = 16
    ids = rng.integers(5, cfg.text.vocab_size - 1, (n, prompt + cfg.num_image_tokens)).astype(np.int32)
    ids[:, 4 : 4 + cfg.num_image_tokens] = cfg.image_token_id
    pixels = rng.normal(size=(n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    params = init_params(cfg, jax.random.key(seed))
    counts, live = _run(params, cfg, jnp.asarray(ids), jnp.asarray(pixels), jnp.ones(ids.shape, bool),
                        jnp.zeros((n, 2), jnp.int32), steps)
    return cfg, counts, live


def stability(demo_dir: str | Path | None = None, n: int = 16, steps: int = 16, batch: int = 8,
              budgets: tuple[float | None, ...] = (0.1, None)) -> list[dict[str, Any]]:
    """One entry per (source, K): the new-token summary and the budget table."""
    results = []
    for budget in budgets:
        sources = []
        if demo_dir is not None:
            sources.append(("demo", lambda b=budget: demo_source(Path(demo_dir), n, steps, b)))
        sources.append(("random", lambda b=budget: random_source(n, steps, b)))
        for name, make in sources:
            cfg, counts, live = make()
            results.append({
                "source": name, "hr_budget": budget, "batch": batch, "steps": steps, "samples": n,
                "summary": summarize(counts, live, cfg), "budgets": budget_table(counts, live, cfg, batch),
            })
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'source':<7} {'K':>5} {'cells':>5} {'fast':>5} {'fallback b1':>11} {'proj/step b1':>12} "
             f"{'fallback bN':>11} {'proj/step bN':>12} {'vs project':>10}"]
    for r in results:
        for b in r["budgets"]:
            lines.append(
                f"{r['source']:<7} {b['K']:>5} {b['cells']:>5} {b['fast_tokens']:>5} {b['fallback_rate_b1']:>11.3f} "
                f"{b['projected_per_step_b1']:>12.1f} {b['fallback_rate_batch']:>11.3f} {b['projected_per_step_batch']:>12.1f} "
                f"{b['projected_per_step_b1'] / b['K']:>10.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", help="a `flexattn-jax demo` output directory (its model/ is used)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="batch size for the batch-level fallback rate")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.demo and not (Path(args.demo) / "model" / "metadata.json").exists():
        print(f"error: {args.demo}/model is not a demo model directory (run `flexattn-jax demo --out {args.demo}`)", file=sys.stderr)
        return 2
    results = stability(args.demo, args.samples, args.steps, args.batch)
    if args.json:
        print(json.dumps({"stability": results}, indent=1))
    else:
        for r in results:
            print(r["source"], r["hr_budget"], json.dumps(r["summary"]))
        print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
