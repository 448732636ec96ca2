"""From image files and questions to answers: host preprocessing, bucketed batches, jitted generation.

Per-item failures (a missing or corrupt image, an empty or too long prompt, more than one
``<image>`` placeholder) are reported for that item; the other items are still answered.
With a mesh, batches are data parallel: the parameters are replicated and each batch is split
over the mesh's ``data`` (and, where it divides, ``fsdp``) axis; the tokens are the same as on one
device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from tqdm import tqdm

from flexattn_jax.config import ModelConfig
from flexattn_jax.generate import GenerateOutput, generate
from flexattn_jax.preprocess import (
    BUCKETS,
    IMAGE_PLACEHOLDER,
    PreprocessError,
    bucket_length,
    format_prompt,
    load_image,
    pad_batch,
    preprocess_image,
    tokenize_with_image,
)
from flexattn_jax.selection import margin_patches
from flexattn_jax.sharding import batch_sharding, replicated


@dataclass
class Request:
    """One question about one image (a path or a PIL image)."""

    image: str | Path | Image.Image
    prompt: str


@dataclass
class Answer:
    text: str | None
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    hr_masks: np.ndarray | None = None  # (L, M) the prefill's per-layer selected HR tokens
    image_attention: np.ndarray | None = None  # (L, G) the last prompt token's map over the LR image


@dataclass
class Prepared:
    ids: np.ndarray
    pixels: np.ndarray
    ori_size: tuple[int, int]


def request_image(req: Request) -> Image.Image:
    """The request's image as RGB (a path is loaded with :func:`flexattn_jax.preprocess.load_image`)."""
    return req.image if isinstance(req.image, Image.Image) else load_image(req.image)


def prepare(req: Request, cfg: ModelConfig, tokenizer, max_context: int) -> Prepared:
    """Load, pad-to-square, resize and normalise the image; format and tokenize the prompt."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise PreprocessError(f"empty prompt (got {req.prompt!r})")
    n_tags = req.prompt.count(IMAGE_PLACEHOLDER)
    if n_tags > 1:
        raise PreprocessError(f"the prompt has {n_tags} {IMAGE_PLACEHOLDER} tags; one image per prompt is supported")
    pixels, ori = preprocess_image(request_image(req), cfg.image_size)
    text = format_prompt(req.prompt.replace(IMAGE_PLACEHOLDER, "").strip(), has_image=True)
    ids = tokenize_with_image(text, tokenizer, cfg.image_token_id, cfg.num_image_tokens, num_images=1)
    if len(ids) > max_context:
        raise PreprocessError(f"prompt is {len(ids)} tokens with the image; the context allows {max_context}")
    return Prepared(ids, pixels, ori)


def check_batch_size(mesh: Mesh | None, batch_size: int) -> None:
    """Raise ValueError unless ``batch_size`` is positive and a multiple of the mesh's ``data`` axis."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    data = 1 if mesh is None else mesh.shape["data"]
    if batch_size % data:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the mesh's data axis ({data}); "
            f"use a batch size divisible by {data}, e.g. {data * max(1, batch_size // data)}"
        )


def _placer(mesh: Mesh | None, batch_size: int):
    """``jnp.asarray``, or with a mesh a ``device_put`` splitting the batch axis over it."""
    check_batch_size(mesh, batch_size)
    if mesh is None:
        return jnp.asarray
    return lambda a: jax.device_put(a, batch_sharding(mesh, a.shape))


def answer(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    hr_strategy: str = "project",
    buckets: Sequence[int] = BUCKETS,
    progress: bool = True,
    stats: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
) -> list[Answer]:
    """Answer every request; batches are left-padded to a length bucket (one compile per bucket).

    ``mesh`` (optional) makes the batches data parallel; ``batch_size`` must then be a multiple
    of its ``data`` axis.
    """
    put = _placer(mesh, batch_size)
    if mesh is not None:
        params = jax.device_put(params, replicated(mesh))
    max_context = min(max(buckets), cfg.text.max_position_embeddings - max_new_tokens)
    answers: list[Answer | None] = [None] * len(requests)
    ready: list[tuple[int, Prepared]] = []
    for i, req in enumerate(requests):
        try:
            ready.append((i, prepare(req, cfg, tokenizer, max_context)))
        except (PreprocessError, ValueError, OSError) as e:
            answers[i] = Answer(None, error=str(e))
    ready.sort(key=lambda item: len(item[1].ids))
    rng = jax.random.key(seed)
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(ready), desc="answering", unit="item", disable=not progress)
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        length = bucket_length(max(len(p.ids) for _, p in chunk), buckets)
        ids, mask = pad_batch([p.ids for _, p in chunk], length, pad_id=cfg.pad_token_id, side="left")
        pixels = np.stack([p.pixels for _, p in chunk])
        margin = margin_patches(np.array([p.ori_size for _, p in chunk]), cfg.lr_grid)
        pad = batch_size - len(chunk)  # fixed batch shape: pad with copies of the first row
        if pad:
            ids, mask, pixels, margin = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (ids, mask, pixels, margin))
        rng, key = jax.random.split(rng)
        out: GenerateOutput = generate(
            params, cfg, put(ids), put(pixels.astype(jnp.dtype(cfg.dtype))), put(mask), put(margin),
            key if temperature > 0 else None, max_new_tokens=max_new_tokens, max_len=length + max_new_tokens,
            temperature=temperature, top_p=top_p, hr_strategy=hr_strategy,
        )
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        maps = out.prefill_maps
        for row, (i, _) in enumerate(chunk):
            toks = tokens[row, : lengths[row]].tolist()
            n_tokens += len(toks)
            text = tokenizer.decode([t for t in toks if t != cfg.eos_token_id], skip_special_tokens=True).strip()
            answers[i] = Answer(
                text, toks, None,
                None if maps is None else np.asarray(maps.hr_masks[:, row]),
                None if maps is None else np.asarray(maps.image_attention[:, row]),
            )
        bar.update(len(chunk))
    bar.close()
    if stats is not None:
        elapsed = time.perf_counter() - t0
        stats.update(tokens=n_tokens, seconds=elapsed, tokens_per_s=n_tokens / max(elapsed, 1e-9))
    return [a for a in answers if a is not None]
