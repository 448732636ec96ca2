"""The HR kernel (``attention_impl='splash_hr'``): the share of blocks it computes on selection masks, and its roofline.

The kernel's ``pl.CostEstimate`` is static: it reports every block (the upper bound). What runs is that times the
active (query block, key block) share, which depends on the masks. Measured here:

* **masks**: the training rows' selections of the scaled model (random weights, :func:`bench.common.scaled_config`,
  the FLOP benchmark's model at 7B shapes; R select rows = the last R rows of a random prompt, every hierarchical
  layer); with ``--checkpoint`` those of a trained model (``flexattn-jax demo``'s ``demo_out/model``) on its own
  training batches: the demo's data, its learnable rows as select rows, every hierarchical layer; each row's
  9 x 9 pooled cells upsampled to the 7B HR grid (72 x 72, M = 5184: the pooled selection is scale-free); the
  ``--cells`` fraction of a synthetic selection (the same random cells for every row: the best case for
  skipping) for comparison;
* **active share** of 128 x 128 blocks, keys row-major against cell-ordered
  (:func:`flexattn_jax.selection.cell_order`), and the selected share of (row, key) pairs (the floor);
* **roofline** of one hierarchical layer's HR part, forward + backward, at 7B shapes (one sample: R = 2048,
  M = 5184, 32 heads of 128 (MHA, as Llama-2-7B), bf16): :func:`flexattn_jax.kernels.hr_attention.cost_estimates` scaled by the
  active share, against the chip's peak (``flexattn_jax.chips.CHIPS``) and HBM bandwidth
  (v5p 2.76 TB/s, v5e 0.82 TB/s).

``python -m bench.hr_kernel`` prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import make_inputs, scaled_config, variant
from flexattn_jax.chips import CHIPS
from flexattn_jax.kernels.hr_attention import BLOCK, active_block_fraction, cost_estimates
from flexattn_jax.model import forward
from flexattn_jax.params import init_params
from flexattn_jax.selection import cell_order, nearest_source_index

ROOFLINE_CHIPS = ("v5p", "v5e")  # the TPUs the kernel targets; peak and bandwidth from flexattn_jax.chips
HR_7B, POOL = 72, 9  # 1008 px: a 72 x 72 HR grid, 9 x 9 pooled cells of 8 x 8 tokens
SHAPE_7B = dict(b=1, h=32, r=2048, m=HR_7B**2, d=128, itemsize=2)


def scaled_masks(rows: int, seed: int = 0) -> np.ndarray:
    """(layers x batch, R, 81) pooled cell masks of the scaled model's R training rows, every hierarchical layer."""
    cfg = scaled_config()
    v = variant(cfg, "flex-M", "project")
    params = init_params(v.cfg, jax.random.key(seed))
    ids, mask, pixels = make_inputs(v, 1, rows + 8, seed=seed)
    t = ids.shape[1]
    sel = jnp.arange(t - rows, t, dtype=jnp.int32)[None]
    out = jax.jit(lambda p: forward(p, v.cfg, ids, pixels, mask, select_rows=sel, select_valid=jnp.ones(sel.shape, bool),
                                    return_maps=True).hr_masks)(params)
    layers = v.cfg.mask_layers
    return pooled_cells(np.asarray(out)[layers.start:layers.stop], v.cfg.hr_grid)  # the masks the next layers attend with


def pooled_cells(hr: np.ndarray, grid: int) -> np.ndarray:
    """``(L, B, R, grid^2)`` HR masks (a 9 x 9 pooled selection upsampled ``nearest``) -> ``(L x B, R, 81)`` cell masks:
    each cell read at the first HR row / column that shows it."""
    first = np.array([np.flatnonzero(nearest_source_index(POOL, grid) == c)[0] for c in range(POOL)])
    cells = hr.reshape(*hr.shape[:3], grid, grid)[..., first[:, None], first[None, :]]
    return cells.reshape(-1, hr.shape[2], POOL * POOL)


class MaskSourceError(ValueError):
    """A ``--checkpoint`` that gives no selection masks (the message names the path and why)."""


def checkpoint_masks(path: str | Path, samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """``(L x B, R, 81)`` pooled cell masks of a trained FlexAttention model's select rows on ``samples`` of the demo's
    training data (``flexattn-jax demo``'s split at the model's image size, its prompt length of 64, its learnable
    rows as the select rows, every hierarchical layer; rows that are padding are all-False, as the kernel masks
    them), which rows are real ``(L x B, R)``, and the selected share of (real row, HR token) pairs on the model's
    own grid."""
    from flexattn_jax.app.demo import OBJECT_PX, _records
    from flexattn_jax.app.demo_data import make_split
    from flexattn_jax.checkpoint import CheckpointError, load_converted
    from flexattn_jax.preprocess import SYSTEM_PROMPT
    from flexattn_jax.tokenizer import load_tokenizer
    from train.config import DataConfig
    from train.data import Collator, SampleLoader

    if not (Path(path) / "metadata.json").is_file():
        raise MaskSourceError(f"--checkpoint {path}: no metadata.json (want a model directory, e.g. demo_out/model)")
    try:
        params, cfg = load_converted(path)
    except CheckpointError as e:
        raise MaskSourceError(f"--checkpoint {path}: {e}") from None
    if not cfg.flex.enabled:
        raise MaskSourceError(f"--checkpoint {path}: FlexAttention is off in its config, so it selects nothing")
    tokenizer = load_tokenizer(path)
    dcfg = DataConfig(max_len=64, system_prompt=SYSTEM_PROMPT, threads=1)
    records = _records(make_split(2000 + seed, samples, hr_size=cfg.image_size, obj_px=OBJECT_PX))
    loader = SampleLoader(records, cfg, dcfg, tokenizer)
    batch = Collator(cfg, dcfg)([loader((i, 0)) for i in range(samples)])
    out = jax.jit(lambda p: forward(p, cfg, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                    margin=batch["margin"], select_rows=batch["select_rows"], select_valid=batch["select_valid"],
                                    return_maps=True).hr_masks)(params)
    layers = cfg.mask_layers
    hr = np.asarray(out)[layers.start:layers.stop]
    rows = np.broadcast_to(np.asarray(batch["select_valid"]), hr.shape[:3])
    hr = hr & rows[..., None]
    return pooled_cells(hr, cfg.hr_grid), rows.reshape(-1, hr.shape[2]), float(hr[rows].mean())


def to_7b(cells: np.ndarray) -> np.ndarray:
    """Pooled (N, R, 81) cell masks upsampled to the 72 x 72 HR grid: (N, R, 5184), row-major."""
    n, r, _ = cells.shape
    side = HR_7B // POOL
    return cells.reshape(n, r, POOL, 1, POOL, 1).repeat(side, 3).repeat(side, 5).reshape(n, r, HR_7B**2)


def block_shares(masks: np.ndarray) -> dict:
    """Active 128 x 128 block share, row-major and cell-ordered, and the selected share of (row, key) pairs."""
    order = cell_order(HR_7B, POOL)
    return {"selected": float(masks.mean()), "row_major": active_block_fraction(masks),
            "cell_order": active_block_fraction(masks[..., order])}


def roofline(share: float, chip: str) -> dict:
    """Seconds of one layer's HR part (forward + backward, one sample, 7B shapes) at this active share."""
    s = SHAPE_7B
    rp, mp = -(-s["r"] // BLOCK) * BLOCK, -(-s["m"] // BLOCK) * BLOCK
    est = cost_estimates(s["b"], s["h"], 1, rp, mp, s["d"], s["itemsize"], share=share)  # the kernel's own estimate at this share
    flops = sum(e.flops for e in est.values())
    nbytes = sum(e.bytes_accessed for e in est.values())
    peak, bw = CHIPS[chip].peak_flops, CHIPS[chip].hbm_bytes_per_s
    return {"chip": chip, "share": share, "tflops": flops / 1e12, "gbytes": nbytes / 1e9, "compute_s": flops / peak,
            "memory_s": nbytes / bw, "seconds": max(flops / peak, nbytes / bw)}


def run(rows: int, cells: float, seed: int, checkpoint: str | Path | None = None, samples: int = 32) -> dict:
    shares = {}
    if checkpoint is not None:  # first: a bad --checkpoint fails before the scaled model runs
        demo, rows_valid, own = checkpoint_masks(checkpoint, samples, seed)
        shares["trained-model"] = {**block_shares(to_7b(demo)), "rows_per_sample": float(rows_valid.sum(axis=1).mean()),
                                   "selected_own_grid": own}
    shares["scaled-model"] = block_shares(to_7b(scaled_masks(rows, seed)))
    rng = np.random.default_rng(seed)
    synthetic = to_7b(np.broadcast_to(rng.random((1, 1, POOL * POOL)) < cells, (1, rows, POOL * POOL)))
    shares[f"synthetic-{cells:g}"] = block_shares(synthetic)
    lines = []
    for name, sh in shares.items():
        for order in ("row_major", "cell_order"):
            lines += [{"masks": name, "order": order, **roofline(sh[order], chip)} for chip in ROOFLINE_CHIPS]
    dense = [{"masks": "all blocks", "order": "-", **roofline(1.0, chip)} for chip in ROOFLINE_CHIPS]
    return {"rows": rows, "shares": shares, "roofline": dense + lines}


def format_table(res: dict) -> str:
    out = [f"R = {res['rows']} select rows; 7B HR part per layer and sample (fwd + bwd)",
           f"{'masks':<18}{'order':<12}{'chip':<6}{'share':>7}{'TFLOP':>8}{'GB':>8}{'compute ms':>12}{'memory ms':>11}"]
    for row in res["roofline"]:
        out.append(f"{row['masks']:<18}{row['order']:<12}{row['chip']:<6}{row['share']:>7.3f}{row['tflops']:>8.3f}"
                   f"{row['gbytes']:>8.2f}{row['compute_s'] * 1e3:>12.2f}{row['memory_s'] * 1e3:>11.2f}")
    for name, sh in res["shares"].items():
        own = (f" ({sh['rows_per_sample']:.1f} select rows a sample; {sh['selected_own_grid']:.3f} on its own grid)"
               if "rows_per_sample" in sh else "")
        out.append(f"{name}: selected {sh['selected']:.3f} of (row, key) pairs{own}; active blocks {sh['row_major']:.3f} row-major, "
                   f"{sh['cell_order']:.3f} cell-ordered")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hr_kernel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="select rows of the scaled model's training forward (7B training: 2048)")
    p.add_argument("--cells", type=float, default=0.25, help="selected share of the 81 cells in the synthetic masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None,
                   help="also a trained FlexAttention model's masks (e.g. demo_out/model of `flexattn-jax demo`)")
    p.add_argument("--samples", type=int, default=32, help="--checkpoint: training samples of the demo's data to select on")
    a = p.parse_args(argv)
    if a.rows < 1 or not 0 < a.cells <= 1 or a.samples < 1:
        p.error(f"--rows {a.rows} and --samples {a.samples} must be >= 1 and --cells {a.cells} in (0, 1]")
    try:
        res = run(a.rows, a.cells, a.seed, a.checkpoint, a.samples)
    except MaskSourceError as e:
        print(f"python -m bench.hr_kernel: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    print(format_table(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
