"""Attention overlays: the last token's map over the LR image and the HR tokens it selected.

The model sees each image padded to a square (:func:`flexattn_jax.preprocess.expand_to_square`),
so the LR grid (``g x g``) and the HR grid (``zoom * g`` per side) cover that square: the maps are
drawn over the padded image, stretched to its full extent. Drawing uses matplotlib's Agg backend
(no display needed). Used by ``flexattn-jax generate --save-attention`` (one PNG per item) and the
demo (one grid of several items).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float
from PIL import Image

from flexattn_jax.config import ModelConfig
from flexattn_jax.preprocess import expand_to_square, pad_and_resize, to_rgb


def mask_layer(cfg: ModelConfig) -> int:
    """The layer whose map and mask to show: the one feeding the last hierarchical layer (``L - 2``)."""
    return max(cfg.flex.first_select_layer, cfg.text.num_layers - 2)


def answer_maps(answer, cfg: ModelConfig, layer: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(image_attention (G,), hr_mask (M,))`` of an :class:`~flexattn_jax.inference.Answer` at ``layer``.

    ``layer`` defaults to :func:`mask_layer`; both are ``None`` when the answer has no maps
    (FlexAttention off, or a failed item).
    """
    layer = mask_layer(cfg) if layer is None else layer
    att = None if answer.image_attention is None else np.asarray(answer.image_attention)[layer]
    mask = None if answer.hr_masks is None else np.asarray(answer.hr_masks)[layer]
    return att, mask


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MAX_DRAW_SIDE = 1024  # a larger padded square is drawn downscaled (bounded memory, see pad_and_resize)


def _square(image: Image.Image) -> np.ndarray:
    image = to_rgb(image)
    if max(image.size) > _MAX_DRAW_SIDE:
        return np.asarray(pad_and_resize(image, _MAX_DRAW_SIDE))
    return np.asarray(expand_to_square(image))


def _grid(values: np.ndarray, what: str) -> np.ndarray:
    side = math.isqrt(values.size)
    if side * side != values.size:
        raise ValueError(f"{what} has {values.size} entries, not a square grid")
    return values.reshape(side, side)


def draw_map(ax, image: Image.Image, image_attention: Float[np.ndarray, " G"] | None, title: str = "") -> None:
    """The image (padded to a square) with the heads-summed attention over its ``g x g`` LR tokens."""
    sq = _square(image)
    side = sq.shape[0]
    ax.imshow(sq)
    if image_attention is not None:
        amap = _grid(np.asarray(image_attention, np.float32), "image_attention")
        ax.imshow(amap, cmap="magma", alpha=0.55, extent=(0, side, side, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_selection(ax, image: Image.Image, hr_mask: Bool[np.ndarray, " M"] | None, title: str = "") -> None:
    """The image (padded to a square) with its selected HR tokens highlighted."""
    sq = _square(image)
    side = sq.shape[0]
    ax.imshow(sq)
    if hr_mask is not None:
        mask = _grid(np.asarray(hr_mask).astype(np.float32), "hr_mask")
        ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="cool", alpha=0.45, vmin=0, vmax=1,
                  extent=(0, side, side, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_overlay(
    path: str | Path,
    image: Image.Image,
    image_attention: Float[np.ndarray, " G"] | None,
    hr_mask: Bool[np.ndarray, " M"] | None,
    *,
    title: str = "",
    layer: int | None = None,
    dpi: int = 90,
) -> Path:
    """One item's PNG: the attention map (left) and the selected HR tokens (right) over its image."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.4), squeeze=False)
    where = "" if layer is None else f", layer {layer}"
    n_sel = 0 if hr_mask is None else int(np.asarray(hr_mask).sum())
    draw_map(axes[0, 0], image, image_attention, f"last-token map{where}")
    draw_selection(axes[0, 1], image, hr_mask, f"selected HR tokens: {n_sel}")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_grid(
    path: str | Path,
    images: Sequence[Image.Image],
    image_attention: Sequence[Float[np.ndarray, " G"] | None],
    hr_masks: Sequence[Bool[np.ndarray, " M"] | None],
    *,
    map_titles: Sequence[str] | None = None,
    selection_titles: Sequence[str] | None = None,
    dpi: int = 90,
) -> Path:
    """Several items: a top row of attention maps, a bottom row of selected HR tokens (one column each)."""
    n = len(images)
    if not n or len(image_attention) != n or len(hr_masks) != n:
        raise ValueError(f"save_grid needs as many maps ({len(image_attention)}) and masks ({len(hr_masks)}) "
                         f"as images ({n}), at least one")
    plt = _pyplot()
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6), squeeze=False)
    for j in range(n):
        draw_map(axes[0, j], images[j], image_attention[j], map_titles[j] if map_titles else "")
        draw_selection(axes[1, j], images[j], hr_masks[j], selection_titles[j] if selection_titles else "")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
