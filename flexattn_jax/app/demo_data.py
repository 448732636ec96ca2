"""A deterministic synthetic high-resolution VQA task for the demo.

Each image (default 168 px: a 3 x 56 px low-resolution view, 14 px patches) has a smooth cluttered
background and ONE small framed square whose inside (``obj_px``, 6 or 9 px by default) carries one of
four grey patterns (:data:`CLASSES`), drawn from 1-px-wide features with a period of 3 px:

* ``horizontal``: rows ``i % 3 == 0``;  ``vertical``: columns ``j % 3 == 0``;
* ``diagonal``: ``(i + j) % 3 == 0``;  ``checkered``: the 3x3 tile ``101/010/101``.

Every pattern repeats with period 3 along both axes, so a 3x down-sampling whose filter has zeros at
1/3 cycle per pixel (box-3; PyTorch/JAX antialiased bilinear, whose taps are ``[1,2,3,2,1]/9``; and,
up to uint8 rounding, PIL's antialiased bicubic) turns the inside of every pattern into the same flat
grey: intensities are set per class so that each pattern's mean is ``grey``. The pattern sits on the
3-px grid of the (padded) image, so a box-3 down-sampling leaves no trace of it at all; the wider
antialiased filters leak a little on a one-pixel rim where the pattern meets the frame (a window
there sees a partial period: at most ~0.07 for bilinear, ~0.1 for PIL bicubic, against a 0.7 contrast
at full resolution), and the pattern's phase is random so that the rim is no fixed per-class
signature. At full resolution the classes are trivially separable. The coloured frame (``frame_px``
wide, a saturated colour unrelated to the class) keeps the object visible at low resolution, so the
question is answerable only with HR detail.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from flexattn_jax.preprocess import ROLES
from flexattn_jax.tokenizer import build_tokenizer, default_words

CLASSES: tuple[str, ...] = ("horizontal", "vertical", "checkered", "diagonal")
QUESTIONS: tuple[str, ...] = (
    "What pattern is the small square?",
    "Which pattern fills the small framed square?",
    "What is the pattern inside the small square?",
    "Name the pattern of the small square in one word.",
)
PERIOD = 3
FRAME_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 25),
    (20, 200, 40),
    (30, 60, 235),
    (245, 220, 0),
    (225, 0, 225),
    (0, 215, 225),
    (255, 130, 0),
)

_I, _J = np.mgrid[0:PERIOD, 0:PERIOD]
_TILES: dict[str, np.ndarray] = {
    "horizontal": (_I == 0).astype(np.float64),
    "vertical": (_J == 0).astype(np.float64),
    "checkered": ((_I + _J) % 2 == 0).astype(np.float64),
    "diagonal": ((_I + _J) % PERIOD == 0).astype(np.float64),
}


def class_tile(name: str) -> np.ndarray:
    """The 3x3 binary tile of a class (1 = bright feature)."""
    if name not in _TILES:
        raise ValueError(f"unknown class {name!r}; known: {CLASSES}")
    return _TILES[name].copy()


def pattern_patch(
    name: str, size: int, phase: tuple[int, int] = (0, 0), contrast: float = 0.7, grey: float = 0.5
) -> np.ndarray:
    """A ``(size, size)`` float pattern in [0, 1] whose mean over whole periods is ``grey``."""
    tile = class_tile(name)
    lo = grey - contrast * float(tile.mean())
    if lo < 0 or lo + contrast > 1:
        raise ValueError(f"contrast={contrast}, grey={grey} push class {name!r} outside [0, 1]")
    i, j = np.mgrid[0:size, 0:size]
    return lo + contrast * tile[(i + phase[0]) % PERIOD, (j + phase[1]) % PERIOD]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth clutter: a soft base colour, low-frequency waves and a few Gaussian blobs (float RGB)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    side = float(max(width, height))
    img = np.empty((height, width, 3))
    img[:] = rng.uniform(0.3, 0.75, 3)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(-3.0, 3.0, 2) / side  # at most 3 cycles per image: far below 1/3 cycle/px
            img[..., c] += rng.uniform(0.03, 0.1) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.05, 0.15) * side
        alpha = rng.uniform(0.3, 0.6) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
        img = img * (1 - alpha[..., None]) + rng.uniform(0.2, 0.85, 3) * alpha[..., None]
    return np.clip(img, 0.05, 0.95)


def _object_sizes(obj_px: int | tuple[int, int], whole_periods: bool) -> list[int]:
    lo, hi = (obj_px, obj_px) if isinstance(obj_px, int) else obj_px
    sizes = [s for s in range(lo, hi + 1) if s > 0 and (not whole_periods or s % PERIOD == 0)]
    if not sizes:
        raise ValueError(f"obj_px={obj_px} holds no size{' that is a multiple of 3' if whole_periods else ''}")
    return sizes


def make_sample(
    rng: np.random.Generator,
    hr_size: int = 168,
    *,
    obj_px: int | tuple[int, int] = (6, 9),
    frame_px: int = 2,
    contrast: float = 0.7,
    aspect_jitter: float = 0.0,
    whole_periods: bool = True,
    align: bool = True,
    cls: str | None = None,
) -> tuple[Image.Image, str, str, dict[str, Any]]:
    """One sample: ``(image, question, answer, meta)``.

    The image is ``hr_size`` square, or with ``aspect_jitter > 0`` one side shortened by a random
    fraction up to ``aspect_jitter`` (to exercise padding). ``obj_px`` is the side (or inclusive range)
    of the patterned square; with ``whole_periods`` only multiples of 3 are drawn, so each pattern has
    exactly the same mean. ``align`` puts the pattern on the 3-px grid of the padded square, where a
    box-3 down-sampling leaves no trace of it and the antialiased bilinear one the least. ``cls``
    forces the class without changing the other random draws. ``meta`` holds the class, its index,
    the pattern and frame boxes (x0, y0, x1, y1, half-open), the size, phase, frame colour, question
    index and image size.
    """
    label = int(rng.integers(len(CLASSES)))
    if cls is not None:
        if cls not in CLASSES:
            raise ValueError(f"unknown class {cls!r}; known: {CLASSES}")
        label = CLASSES.index(cls)
    name = CLASSES[label]
    q_index = int(rng.integers(len(QUESTIONS)))
    sizes = _object_sizes(obj_px, whole_periods)
    size = int(sizes[int(rng.integers(len(sizes)))])
    width = height = int(hr_size)
    if aspect_jitter > 0:
        short = max(1, int(round(hr_size * (1.0 - rng.uniform(0.0, aspect_jitter)))))
        if rng.integers(2):
            width = short
        else:
            height = short
    total = size + 2 * frame_px
    margin = 2
    if total + 2 * margin > min(width, height):
        raise ValueError(f"an object of {total} px (obj_px {size} + frame) does not fit in a {width}x{height} image")
    img = _background(rng, width, height)
    x0 = int(rng.integers(margin, width - total - margin + 1))
    y0 = int(rng.integers(margin, height - total - margin + 1))
    if align:  # put the pattern's origin on the 3-px grid of the padded square (the LR pixel grid)
        side = max(width, height)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        x0 = _snap(x0, pad_x + frame_px, margin, width - total - margin)
        y0 = _snap(y0, pad_y + frame_px, margin, height - total - margin)
    phase = (int(rng.integers(PERIOD)), int(rng.integers(PERIOD)))
    color = FRAME_COLORS[int(rng.integers(len(FRAME_COLORS)))]
    img[y0 : y0 + total, x0 : x0 + total] = np.asarray(color) / 255.0
    px0, py0 = x0 + frame_px, y0 + frame_px
    img[py0 : py0 + size, px0 : px0 + size] = pattern_patch(name, size, phase, contrast)[..., None]
    image = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), "RGB")
    meta = {
        "class": name,
        "label": label,
        "question_index": q_index,
        "obj_px": size,
        "frame_px": frame_px,
        "bbox": [px0, py0, px0 + size, py0 + size],
        "frame_bbox": [x0, y0, x0 + total, y0 + total],
        "phase": list(phase),
        "frame_color": list(color),
        "size": [width, height],
    }
    return image, QUESTIONS[q_index], name, meta


def _snap(pos: int, offset: int, lo: int, hi: int) -> int:
    """The position nearest ``pos`` in [lo, hi] with ``(pos + offset) % PERIOD == 0``."""
    cands = [p for p in range(lo, hi + 1) if (p + offset) % PERIOD == 0]
    if not cands:
        return pos
    return min(cands, key=lambda p: (abs(p - pos), p))


def make_split(seed: int, n: int, hr_size: int = 168, **kwargs: Any) -> list[tuple[Image.Image, str, str, dict[str, Any]]]:
    """``n`` samples; sample i uses ``default_rng([seed, i])`` and class ``CLASSES[i % 4]`` (balanced, prefix-stable)."""
    return [
        make_sample(np.random.default_rng([seed, i]), hr_size, cls=CLASSES[i % len(CLASSES)], **kwargs) for i in range(n)
    ]


def build_demo_tokenizer() -> Any:
    """The tiny local tokenizer with the demo's questions and answers each a single token (the demo, tests, benches)."""
    return build_tokenizer(default_words(tokenizer_texts()))


def tokenizer_texts() -> list[str]:
    """The demo's questions and answers (as the assistant says them), so that each is a single token."""
    return [*QUESTIONS, *(f"{ROLES[1]}: {a}" for a in CLASSES)]
