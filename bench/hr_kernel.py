"""The HR kernel (``attention_impl='splash_hr'``): the share of blocks it computes on selection masks, and its roofline.

The kernel's ``pl.CostEstimate`` is static: it reports every block (the upper bound). What runs is that times the
active (query block, key block) share, which depends on the masks. Measured here:

* **masks**: the training rows' selections of the scaled model (random weights, :func:`bench.common.scaled_config`,
  R select rows = the last R rows of a random prompt, every hierarchical layer), each row's 9 x 9 pooled cells
  upsampled to the 7B HR grid (72 x 72, M = 5184: the pooled selection is scale-free); the ``--cells`` fraction
  of a synthetic selection (the same random cells for every row: the best case for skipping) for comparison;
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

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import make_inputs, scaled_config, variant
from flexattn_jax.chips import CHIPS
from flexattn_jax.kernels.hr_attention import BLOCK, active_block_fraction, cost_estimates
from flexattn_jax.model import forward
from flexattn_jax.params import init_params
from flexattn_jax.selection import cell_order

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
    hr = np.asarray(out)[layers.start:layers.stop]  # (L, B, R, M) the masks the next layers attend with
    g, step = v.cfg.hr_grid, v.cfg.hr_grid // POOL
    cells = hr.reshape(*hr.shape[:3], g, g)[..., ::step, ::step]
    return cells.reshape(-1, rows, POOL * POOL)


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
    est = cost_estimates(s["b"], s["h"], 1, rp, mp, s["d"], s["itemsize"])
    flops = share * sum(e.flops for e in est.values())
    nbytes = share * sum(e.bytes_accessed for e in est.values())
    peak, bw = CHIPS[chip].peak_flops, CHIPS[chip].hbm_bytes_per_s
    return {"chip": chip, "share": share, "tflops": flops / 1e12, "gbytes": nbytes / 1e9, "compute_s": flops / peak,
            "memory_s": nbytes / bw, "seconds": max(flops / peak, nbytes / bw)}


def run(rows: int, cells: float, seed: int) -> dict:
    measured = to_7b(scaled_masks(rows, seed))
    rng = np.random.default_rng(seed)
    synthetic = to_7b(np.broadcast_to(rng.random((1, 1, POOL * POOL)) < cells, (1, rows, POOL * POOL)))
    shares = {"scaled-model": block_shares(measured), f"synthetic-{cells:g}": block_shares(synthetic)}
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
        out.append(f"{name}: selected {sh['selected']:.3f} of (row, key) pairs; active blocks {sh['row_major']:.3f} row-major, "
                   f"{sh['cell_order']:.3f} cell-ordered")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hr_kernel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="select rows of the scaled model's training forward (7B training: 2048)")
    p.add_argument("--cells", type=float, default=0.25, help="selected share of the 81 cells in the synthetic masks")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.rows < 1 or not 0 < a.cells <= 1:
        p.error(f"--rows {a.rows} must be >= 1 and --cells {a.cells} in (0, 1]")
    res = run(a.rows, a.cells, a.seed)
    print(json.dumps(res))
    print(format_table(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
