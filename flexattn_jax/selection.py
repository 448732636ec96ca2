"""High-resolution token selection: attention map -> boolean HR mask -> static top-k indices.

Exactly the release's chain (spec, "Selection"), on fixed grids so one compiled function serves
every image: heads-summed attention of the select rows over the g x g LR image columns, margin
zeroing of the padded bands, min-max normalisation, ``*255 > threshold``, PyTorch's
``adaptive_max_pool2d`` to P x P, ``nearest`` upsampling to the HR grid. The mask then becomes K
indices plus a validity mask (static budget K), ranked by the pooled (pre-threshold) score so
that a budget smaller than the selection drops the weakest tokens. No boolean indexing. The
adaptive budget carries the whole mask (K = M) and each hierarchical layer packs it into its
rung's K slots (:func:`compact`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax.config import IGNORE_INDEX, ModelConfig


class Selection(NamedTuple):
    """Per select row, the K HR tokens it may attend to."""

    index: Int[Array, "B R K"]  # HR token indices (row-major over the HR grid)
    valid: Bool[Array, "B R K"]  # False for padding slots (fewer than K selected)


# ---- static resampling tables (host-side numpy; PyTorch's exact index rules) ---------------

def adaptive_pool_bins(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) membership of PyTorch's adaptive pooling bins.

    Bin i covers ``[floor(i * in / out), ceil((i + 1) * in / out))``; bins overlap when
    out does not divide in, and repeat input cells when out > in.
    """
    member = np.zeros((size_out, size_in), bool)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        member[i, start:end] = True
    return member


def nearest_source_index(size_in: int, size_out: int) -> np.ndarray:
    """PyTorch ``interpolate(mode='nearest')`` source index per output index (float32 scale)."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, size_in - 1)


def cell_order(hr_grid: int, pool: int) -> np.ndarray:
    """(M,) permutation of the HR tokens (row-major) that puts them cell by cell: a selected pooled cell (the P x P grid
    that ``nearest`` upsampling spreads over the HR grid) becomes one contiguous run of keys, in raster order of cells.

    Keys form a set, so attending over ``k[order]`` under ``mask[..., order]`` (each key keeping its own image RoPE)
    equals the row-major attention up to float order; a block-skipping kernel then skips whole unselected cells
    (at 1008 px: 9 x 9 cells of 8 x 8 = 64 tokens, a 128-key block = 2 cells) instead of blocks that mix 8-key runs
    of many cells.
    """
    cell = nearest_source_index(pool, hr_grid)  # the pooled row / column each HR row / column shows
    rows, cols = np.meshgrid(np.arange(hr_grid), np.arange(hr_grid), indexing="ij")
    return np.lexsort((cols.ravel(), rows.ravel(), cell[cols].ravel(), cell[rows].ravel())).astype(np.int32)


def margin_patches(ori_size: np.ndarray, grid: int) -> np.ndarray:
    """(B, 2) int32: rows and columns to zero at each side for the padded bands, from (w, h).

    ``m = int(|w - h| // 2 / max(w, h) * grid)`` in float64 as the release computes it; w > h pads
    top/bottom (rows), w <= h pads left/right (columns). Computed on the host, before jit.
    """
    ori = np.asarray(ori_size, np.int64).reshape(-1, 2)
    out = np.zeros((ori.shape[0], 2), np.int32)
    for i, (w, h) in enumerate(ori):
        if w <= 0 or h <= 0:
            continue
        m = int((abs(int(w) - int(h)) // 2) / max(int(w), int(h)) * grid)
        out[i, 0 if w > h else 1] = m
    return out


def box_cell_counts(box: np.ndarray, size: tuple[int, int], grid: int) -> np.ndarray:
    """(grid, grid) int: how many of the box's pixels fall in each cell of a square token grid.

    ``box`` is (x0, y0, x1, y1), half-open, in pixels of the original ``size`` = (w, h) image; the grid
    spans the image padded to a square (centred, as LLaVA's ``expand2square``) and resized to the
    model's input, so a pixel's cell follows from its centre. One geometry for every box-to-grid use:
    the selection's coverage of an object (HR grid) and the grounding target (LR grid).
    """
    w, h = (int(v) for v in size)
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {[x0, y0, x1, y1]} is empty or outside the {w}x{h} image (want 0 <= x0 < x1 <= w, "
                         "0 <= y0 < y1 <= h)")
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    scale = grid / side  # cells per original pixel
    cols = np.clip(((np.arange(x0, x1) + 0.5 + ox) * scale).astype(int), 0, grid - 1)
    rows = np.clip(((np.arange(y0, y1) + 0.5 + oy) * scale).astype(int), 0, grid - 1)
    return np.outer(np.bincount(rows, minlength=grid), np.bincount(cols, minlength=grid))


def grounding_target(box: np.ndarray, size: tuple[int, int], grid: int) -> np.ndarray:
    """(grid * grid,) float32 summing to 1: the share of the box's pixels in each LR cell (row-major)."""
    counts = box_cell_counts(box, size, grid).astype(np.float64)
    return (counts / counts.sum()).reshape(-1).astype(np.float32)


def grounded_rows(target: Float[Array, "*B G"], row_valid: Bool[Array, "*B R"]) -> Bool[Array, "*B R"]:
    """The select rows the grounding term scores: valid rows of samples that have a target (a box)."""
    return row_valid & (jnp.sum(target, axis=-1) > 0)[..., None]


def grounding_cross_entropy(
    image_attention: Float[Array, "L B R G"], target: Float[Array, "B G"], row_valid: Bool[Array, "B R"]
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """``(sum, count)`` of the cross-entropy between ``target`` and each select row's map, normalised over
    the image cells, over the given layers' maps; rows count when valid and their sample has a target.

    The selection itself passes no gradient (a threshold); this term trains the maps it thresholds
    directly, for data that marks where the detail is (a departure from the release, which has none).
    """
    att = image_attention.astype(jnp.float32)
    p = att / jnp.maximum(jnp.sum(att, axis=-1, keepdims=True), 1e-9)
    ce = -jnp.sum(target[None, :, None, :] * jnp.log(p + 1e-9), axis=-1)  # (L, B, R)
    counted = jnp.broadcast_to(grounded_rows(target, row_valid)[None], ce.shape)
    return jnp.sum(jnp.where(counted, ce, 0.0)), jnp.sum(counted.astype(jnp.int32))


# ---- the selection chain ------------------------------------------------------------------

def _zero_margins(a: jax.Array, margin: jax.Array) -> jax.Array:
    """Zero ``margin[b, 0]`` rows at top and bottom and ``margin[b, 1]`` columns left and right."""
    g = a.shape[-1]
    idx = jnp.arange(g)
    mr = margin[:, 0][:, None, None]
    mc = margin[:, 1][:, None, None]
    keep_rows = (idx[None, None, :] >= mr) & (idx[None, None, :] < g - mr)  # (B, 1, g)
    keep_cols = (idx[None, None, :] >= mc) & (idx[None, None, :] < g - mc)
    keep = keep_rows[..., :, None] & keep_cols[..., None, :]  # (B, 1, g, g)
    return jnp.where(keep, a, 0.0)


def _max_pool(a: jax.Array, member: np.ndarray) -> jax.Array:
    """Adaptive max pool of (..., g, g) with a (P, g) bin membership table, on both axes."""
    m = jnp.asarray(member)
    rows = jnp.max(jnp.where(m[:, :, None], a[..., None, :, :], -jnp.inf), axis=-2)  # (..., P, g)
    return jnp.max(jnp.where(m[:, :], rows[..., :, None, :], -jnp.inf), axis=-1)  # (..., P, P)


def _upsample_nearest(a: jax.Array, size_out: int) -> jax.Array:
    src = jnp.asarray(nearest_source_index(a.shape[-1], size_out))
    return a[..., src, :][..., :, src]


def hr_scores(
    image_attention: Float[Array, "B R G"], margin: Int[Array, "B 2"], cfg: ModelConfig
) -> tuple[Bool[Array, "B R M"], Float[Array, "B R M"]]:
    """The release's boolean HR mask and a ranking score per HR token, for each select row."""
    g, hr, p = cfg.lr_grid, cfg.hr_grid, cfg.flex.pool_size
    b, r, _ = image_attention.shape
    a = _zero_margins(image_attention.reshape(b, r, g, g).astype(jnp.float32), margin)
    lo = jnp.min(a, axis=(-2, -1), keepdims=True)
    hi = jnp.max(a, axis=(-2, -1), keepdims=True)
    norm = (a - lo) / (hi - lo)  # NaN for a constant map: nothing passes, as in the release
    binary = (norm * 255 > cfg.flex.threshold).astype(jnp.float32)
    member = adaptive_pool_bins(g, p)
    pooled_mask = _max_pool(binary, member) > 0
    pooled_score = _max_pool(jnp.nan_to_num(norm, nan=0.0), member)
    mask = _upsample_nearest(pooled_mask, hr).reshape(b, r, hr * hr)
    score = _upsample_nearest(pooled_score, hr).reshape(b, r, hr * hr)
    return mask, score


def random_mask(key: jax.Array, batch: int, rows: int, cfg: ModelConfig) -> Bool[Array, "B R M"]:
    """The release's ``special='random'`` ablation: an 8x8 Bernoulli(0.1) grid upsampled to HR."""
    n, hr = cfg.flex.random_grid, cfg.hr_grid
    grid = jax.random.uniform(key, (batch, rows, n, n)) <= cfg.flex.random_prob
    return _upsample_nearest(grid, hr).reshape(batch, rows, hr * hr)


def top_k_pad(mask: Bool[Array, "B R M"], score: Float[Array, "B R M"], k: int) -> Selection:
    """Static budget: the K best selected tokens (by score, ties to the lower index) + validity.

    With K == M the indices are the identity and the validity is the mask itself (exact release).
    """
    m = mask.shape[-1]
    if k >= m:
        index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), mask.shape)
        return Selection(index, mask)
    key = jnp.where(mask, score, -jnp.inf)
    top, index = jax.lax.top_k(key, k)
    return Selection(index.astype(jnp.int32), top > -jnp.inf)


def compact(mask: Bool[Array, "B R M"], k: int) -> Selection:
    """The selected tokens of each row in index order, packed into K slots (cumsum compaction) + validity.

    Exact (every selected token kept) when no row selects more than K: the adaptive budget's rungs
    call it only then. Beyond K, the rest are dropped.
    """
    b, r, m = mask.shape
    pos = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(mask & (pos < k), pos, k)  # k: out of range, dropped
    b_idx, r_idx = jnp.arange(b)[:, None, None], jnp.arange(r)[None, :, None]
    tokens = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), mask.shape)
    index = jnp.zeros((b, r, k), jnp.int32).at[b_idx, r_idx, slot].set(tokens, mode="drop")
    valid = jnp.arange(k) < pos[..., -1:] + 1
    return Selection(index, valid)


def selection_mask(sel: Selection, m: int) -> Bool[Array, "B R M"]:
    """The boolean mask over the M HR tokens that a selection's valid slots make."""
    b, r, _ = sel.index.shape
    b_idx, r_idx = jnp.arange(b)[:, None, None], jnp.arange(r)[None, :, None]
    return jnp.zeros((b, r, m), bool).at[b_idx, r_idx, sel.index].max(sel.valid)


def rungs_taken(cfg: ModelConfig, hr_masks: Bool[Array, "*S L B M"], per_sample: bool = False) -> Int[Array, "*S Lh"]:
    """Index in ``cfg.hr_rungs`` of the rung each hierarchical layer takes under the adaptive budget.

    ``hr_masks``: every layer's mask of the (one, release-mode) select row, as generation's step
    maps give them; hierarchical layer l attends with the mask layer l - 1 made. The rung holds the
    largest selection of the batch; ``per_sample`` gives each sample's own rung instead,
    ``(*S, Lh, B)`` (what per-sample rungs would take: the benchmark's measure of the batch's waste).
    """
    first = cfg.flex.first_select_layer
    count = jnp.sum(hr_masks[..., first:-1, :, :], axis=-1)  # (*S, Lh, B)
    if not per_sample:
        count = jnp.max(count, axis=-1)
    return jnp.sum(jnp.asarray(cfg.hr_rungs[:-1]) < count[..., None], axis=-1)


def select_hr_tokens(
    image_attention: Float[Array, "B R G"],
    margin: Int[Array, "B 2"],
    row_valid: Bool[Array, "B R"],
    cfg: ModelConfig,
    rng: jax.Array | None = None,
) -> tuple[Selection, Bool[Array, "B R M"]]:
    """Selection for each select row: (top-k padded indices, the boolean mask over M they make).

    The returned mask is what the row attends to: the release's mask, truncated to the budget.
    """
    b, r, _ = image_attention.shape
    mode = cfg.flex.selection
    if mode == "attention":
        mask, score = hr_scores(image_attention, margin, cfg)
    elif mode == "random":
        if rng is None:
            raise ValueError("flex.selection='random' needs an rng key")
        mask = random_mask(rng, b, r, cfg)
        score = jnp.ones(mask.shape, jnp.float32)
    else:  # "all": LLaVA-XAttn, every HR token
        mask = jnp.ones((b, r, cfg.num_hr_tokens), bool)
        score = jnp.ones(mask.shape, jnp.float32)
    mask = mask & row_valid[..., None]
    sel = top_k_pad(mask, score, cfg.hr_budget_tokens)
    if cfg.hr_budget_tokens < cfg.num_hr_tokens:
        mask = selection_mask(sel, cfg.num_hr_tokens)
    return sel, mask


def answer_targets(labels: Int[Array | np.ndarray, "*B T"]) -> Bool[Array | np.ndarray, "*B T-1"]:
    """Which next-token targets count (the training loss's, the option likelihood's, the learnable rows'): row t
    predicts token t+1, counted when ``labels[t+1] != IGNORE_INDEX``. jax or numpy arrays, any leading axes."""
    return labels[..., 1:] != IGNORE_INDEX


def learnable_rows(
    labels: Int[np.ndarray, " T"], has_image: bool, num_rows: int
) -> tuple[Int[np.ndarray, " R"], Bool[np.ndarray, " R"], int]:
    """The release's learnable (select) rows of one sample, packed into ``num_rows`` static slots.

    Row t is learnable when ``labels[t + 1] != IGNORE_INDEX`` (for each answer span x..y, the rows
    x-1..y-1), only for samples with an image. Returns ``(rows, valid, n)`` with n the number of
    learnable rows before the cap (rows beyond ``num_rows`` are dropped).
    """
    labels = np.asarray(labels)
    rows = np.zeros(num_rows, np.int32)
    valid = np.zeros(num_rows, bool)
    if not has_image or labels.shape[0] < 2:
        return rows, valid, 0
    found = np.flatnonzero(answer_targets(labels)).astype(np.int32)
    k = min(found.size, num_rows)
    rows[:k], valid[:k] = found[:k], True
    return rows, valid, int(found.size)
