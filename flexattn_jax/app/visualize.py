"""Attention overlays: the last token's map over the LR image (a heat map with a colour bar) and the HR tokens
it selected (outlined).

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
    """``(image_attention (G,), hr_mask (M,))`` of an :class:`~flexattn_jax.app.inference.Answer` at ``layer``.

    ``layer`` defaults to :func:`mask_layer`; both are ``None`` when the answer has no maps
    (FlexAttention off, or a failed item).
    """
    layer = mask_layer(cfg) if layer is None else layer
    att = None if answer.image_attention is None else np.asarray(answer.image_attention)[layer]
    mask = None if answer.hr_masks is None else np.asarray(answer.hr_masks)[layer]
    return att, mask


def save_figure(fig, path: str | Path, *, dpi: float | None = None, make_parents: bool = False) -> Path:
    """The one way figures are written: tight layout, PNG at ``path`` (its folder made with ``make_parents``), closed."""
    fig.tight_layout()
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


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


def share_of_attention(image_attention: Float[np.ndarray, " G"]) -> Float[np.ndarray, "g g"]:
    """The heads-summed map as a ``g x g`` grid of percentages of the attention the image got (sums to 100)."""
    amap = _grid(np.asarray(image_attention, np.float64), "image_attention")
    total = amap.sum()
    return (100.0 * amap / total if total > 0 else amap).astype(np.float32)


def outline_segments(mask: Bool[np.ndarray, "h h"], side: float) -> Float[np.ndarray, "E 2 2"]:
    """The boundary of the selected cells of an ``h x h`` grid drawn over ``side`` pixels: ``(E, 2, (x, y))`` segments.

    One unit edge per side of a selected cell whose neighbour (or the border) is not selected, so a
    selected region is outlined once, not cell by cell.
    """
    m = np.pad(np.asarray(mask, bool), 1)
    h = m.shape[0] - 2
    c = side / h
    rows, cols = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # horizontal edges at y = rows * c, x in [cols, cols + 1] * c
    horizontal = np.stack([np.stack([cols * c, rows * c], -1), np.stack([(cols + 1) * c, rows * c], -1)], 1)
    rows, cols = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # vertical edges at x = cols * c
    vertical = np.stack([np.stack([cols * c, rows * c], -1), np.stack([cols * c, (rows + 1) * c], -1)], 1)
    return np.concatenate([horizontal, vertical]).astype(np.float32).reshape(-1, 2, 2)


def draw_map(ax, image: Image.Image, image_attention: Float[np.ndarray, " G"] | None, title: str = "", colorbar: bool = True):
    """The image (padded to a square) under a heat map of its ``g x g`` LR tokens' share of the attention.

    Returns the heat map's ``AxesImage`` (None without a map); ``colorbar`` adds its scale in %.
    """
    sq = _square(image)
    side = sq.shape[0]
    ax.imshow(sq)
    heat = None
    if image_attention is not None:
        amap = share_of_attention(image_attention)
        heat = ax.imshow(amap, cmap="turbo", alpha=0.5, vmin=0.0, vmax=max(float(amap.max()), 1e-6),
                         extent=(0, side, side, 0), interpolation="bilinear")
        if colorbar:
            bar = ax.figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.03)
            bar.set_label("% of the attention on the image", fontsize=7)
            bar.ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return heat


def draw_selection(ax, image: Image.Image | None, hr_mask: Bool[np.ndarray, " M"] | None, title: str = ""):
    """The selected HR tokens outlined (white over black, visible on any image); the image is drawn first
    unless ``image`` is None (outlines over an existing panel). Returns the outline ``LineCollection``."""
    from matplotlib.collections import LineCollection

    if image is not None:
        ax.imshow(_square(image))
    lines = None
    if hr_mask is not None:
        x0, x1 = ax.get_xlim()
        side = abs(x1 - x0)
        segs = outline_segments(_grid(np.asarray(hr_mask).astype(bool), "hr_mask"), side)
        ax.add_collection(LineCollection(segs, colors="black", linewidths=2.2))
        lines = ax.add_collection(LineCollection(segs, colors="white", linewidths=1.0))
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")
    return lines


def overlay_title(question: str, answer: str, width: int = 70) -> str:
    """``Q: ...`` and ``A: ...``, each wrapped to ``width`` characters and cut after two lines."""
    import textwrap

    def part(tag: str, text: str) -> str:
        text = "".join(ch if ch.isprintable() else " " for ch in text)  # no control characters (fonts have no glyph)
        return "\n".join(textwrap.wrap(f"{tag}: {' '.join(text.split())}", width, max_lines=2, placeholder=" ..."))

    return part("Q", question.replace("<image>", "").strip()) + "\n" + part("A", answer)


def save_overlay(
    path: str | Path,
    image: Image.Image,
    image_attention: Float[np.ndarray, " G"] | None,
    hr_mask: Bool[np.ndarray, " M"] | None,
    *,
    question: str = "",
    answer: str = "",
    title: str = "",
    layer: int | None = None,
    dpi: int = 90,
    subject: str = "last prompt token's attention",
) -> Path:
    """One item's PNG: the image, the attention heat map with its colour bar, the selected HR tokens outlined,
    the question and the answer as the title (``title`` replaces them when given); ``subject`` names whose map it is."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    draw_map(ax, image, image_attention)
    where = "" if layer is None else f"layer {layer}: "
    n_sel = 0 if hr_mask is None else int(np.asarray(hr_mask).sum())
    n_all = 0 if hr_mask is None else int(np.asarray(hr_mask).size)
    draw_selection(ax, None, hr_mask, f"{where}{subject}; {n_sel} of {n_all} HR tokens selected (outlined)")
    fig.suptitle(title or overlay_title(question, answer), fontsize=9, x=0.02, ha="left")
    return save_figure(fig, path, dpi=dpi)


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
        draw_map(axes[0, j], images[j], image_attention[j], map_titles[j] if map_titles else "", colorbar=False)
        draw_selection(axes[1, j], images[j], hr_masks[j], selection_titles[j] if selection_titles else "")
    return save_figure(fig, path, dpi=dpi)
