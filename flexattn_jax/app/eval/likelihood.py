"""Option likelihood: the mean token cross-entropy of each answer option, many options per jitted forward.

The FlexAttention release scores V* Bench this way (``eval_vbench.py``): the prompt with the option
as the assistant's answer, labels only on the option's tokens (the tokens after ``ASSISTANT:``), the
model in training mode, so the select rows are the option's learnable rows (row t when token t+1 is
a label) with alpha 1. Each scored row selects from its own attention, as each token does when it is
the newest one in cached decoding: the losses equal the cross-entropies of teacher-forcing the option
through generation's prefill and decode steps (``tests/test_eval_likelihood.py``). The options of
several questions share one forward: rows are right-padded to a length bucket and the select rows to
a row bucket, each question's image is sent once and gathered per row on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax.config import IGNORE_INDEX, ModelConfig
from flexattn_jax.flops import abstract, cached, cost_flops, counting_config
from flexattn_jax.model import forward
from flexattn_jax.preprocess import BUCKETS, PreprocessError, bucket_length, pad_batch, tokenize_with_image
from flexattn_jax.selection import answer_targets, learnable_rows, margin_patches
from flexattn_jax.sharding import batch_sharding, param_shardings, target_mesh

ROW_BUCKETS: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class OptionQuestion:
    """One question's options, tokenized, with its preprocessed image."""

    ids: list[np.ndarray]  # per option: the prompt and the option
    labels: list[np.ndarray]  # per option: IGNORE_INDEX except on the option's tokens
    pixels: np.ndarray  # (S, S, 3)
    ori_size: tuple[int, int]


def option_tokens(prompt: str, option: str, tokenizer: Any, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)`` of ``prompt + " " + option``: the labels are the tokens after the prompt's.

    ``prompt`` ends with ``"ASSISTANT:"``. The prompt must tokenize to a prefix of the whole (true
    for Llama's and byte-level tokenizers, where ``":"`` and ``" word"`` are separate pieces).
    """
    prefix = tokenize_with_image(prompt, tokenizer, cfg.image_token_id, cfg.num_image_tokens, num_images=1)
    ids = tokenize_with_image(f"{prompt} {option}", tokenizer, cfg.image_token_id, cfg.num_image_tokens, num_images=1)
    n = len(prefix)
    if len(ids) <= n or not np.array_equal(ids[:n], prefix):
        raise PreprocessError(f"option {option!r}: its tokens do not follow the prompt's (empty option, or the tokenizer "
                              "merges it with 'ASSISTANT:')")
    labels = np.full(len(ids), IGNORE_INDEX, np.int32)
    labels[n:] = ids[n:]
    return ids, labels


def option_losses(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    labels: Int[Array, "B T"],
    attention_mask: Bool[Array, "B T"],
    pixels: Float[Array, "Q S S C"],
    question: Int[Array, " B"],
    margin: Int[Array, "B 2"],
    select_rows: Int[Array, "B R"],
    select_valid: Bool[Array, "B R"],
) -> Float[Array, " B"]:
    """Mean next-token cross-entropy over each row's labelled tokens (fp32); row b shows image ``question[b]``."""
    out = forward(
        params, cfg, input_ids, jnp.take(pixels, question, axis=0), attention_mask, margin=margin,
        select_rows=select_rows, select_valid=select_valid, alpha=1.0,
    )
    logits = out.logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = answer_targets(labels)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, logp, 0.0), axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _option_losses_jit(params, cfg, *args):
    return option_losses(params, cfg, *args)


@dataclass
class Batch:
    """One packed forward: host arrays of fixed shapes, and which rows belong to which question."""

    arrays: tuple[Any, ...]  # input_ids, labels, mask, pixels, question, margin, select_rows, select_valid
    owners: list[tuple[int, int]]  # per question of the batch: (its position in the input, its number of options)


def pack(questions: Sequence[tuple[int, OptionQuestion]], cfg: ModelConfig, rows: int, buckets: Sequence[int] = BUCKETS) -> Batch:
    """Right-pad the options of ``questions`` into ``rows`` rows (padding rows repeat row 0); select rows = learnable rows."""
    ids, labels, qidx, sizes = [], [], [], []
    for q, (_, item) in enumerate(questions):
        ids += item.ids
        labels += item.labels
        qidx += [q] * len(item.ids)
        sizes.append(item.ori_size)
    if len(ids) > rows:
        raise ValueError(f"{len(ids)} options do not fit in a batch of {rows} rows")
    length = bucket_length(max(len(x) for x in ids), buckets)
    tok, mask = pad_batch(ids, length, pad_id=cfg.pad_token_id, side="right")
    lab, _ = pad_batch(labels, length, pad_id=IGNORE_INDEX, side="right")
    q = np.asarray(qidx, np.int32)
    margin = margin_patches(np.asarray(sizes, np.int32), cfg.lr_grid)[q]
    pixels = np.zeros((rows, *questions[0][1].pixels.shape), np.float32)
    pixels[: len(questions)] = np.stack([item.pixels for _, item in questions])
    n_rows = bucket_length(max(int(answer_targets(x).sum()) for x in labels), ROW_BUCKETS)
    packed = [learnable_rows(x, True, n_rows) for x in lab]
    sel, sel_valid = np.stack([r for r, _, _ in packed]), np.stack([v for _, v, _ in packed])
    pad = rows - len(ids)
    arrays = [tok, lab, mask, q, margin, sel, sel_valid]
    if pad:
        arrays = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in arrays]
    tok, lab, mask, q, margin, sel, sel_valid = arrays
    return Batch((tok, lab, mask, pixels, q, margin, sel, sel_valid), [(i, len(item.ids)) for i, item in questions])


class OptionScorer:
    """Scores :class:`OptionQuestion` s in packed batches of ``rows`` option rows; records each program's shapes."""

    def __init__(self, params: dict, cfg: ModelConfig, *, rows: int = 8, mesh: Mesh | None = None, buckets: Sequence[int] = BUCKETS):
        if mesh is not None and rows % mesh.shape["data"]:
            raise ValueError(f"batch size {rows} is not a multiple of the mesh's data axis ({mesh.shape['data']})")
        self.cfg, self.rows, self.mesh, self.buckets = cfg, rows, mesh, tuple(buckets)
        self.params = params if mesh is None else jax.device_put(params, param_shardings(params, mesh))
        self.programs: dict[tuple, int] = {}  # argument shapes -> batches run

    def _put(self, a: np.ndarray) -> jax.Array:
        return jnp.asarray(a) if self.mesh is None else jax.device_put(a, batch_sharding(self.mesh, a.shape))

    def run(self, batch: Batch) -> np.ndarray:
        """The loss of every row of ``batch``."""
        args = tuple(self._put(a) for a in batch.arrays)
        shapes = tuple((a.shape, str(a.dtype)) for a in batch.arrays)
        self.programs[shapes] = self.programs.get(shapes, 0) + 1
        pixels = args[3].astype(jnp.dtype(self.cfg.dtype))
        with target_mesh(self.mesh):  # kernels follow the mesh's devices
            return np.asarray(_option_losses_jit(self.params, self.cfg, *args[:3], pixels, *args[4:]))

    def score(self, questions: Iterable[tuple[int, OptionQuestion]]) -> Iterator[tuple[int, list[float], tuple, int]]:
        """``(input position, option losses, program shapes, real rows of its batch)`` per question, batches as they fill."""
        pending: list[tuple[int, OptionQuestion]] = []
        n_rows = 0

        def flush():
            batch = pack(pending, self.cfg, self.rows, self.buckets)
            losses = self.run(batch)
            shapes = tuple((a.shape, str(a.dtype)) for a in batch.arrays)
            start, real = 0, sum(n for _, n in batch.owners)
            for pos, n in batch.owners:
                yield pos, losses[start : start + n].tolist(), shapes, real
                start += n

        for pos, item in questions:
            if len(item.ids) > self.rows:
                raise ValueError(f"a question has {len(item.ids)} options but a batch holds {self.rows} rows; "
                                 f"use --batch-size {len(item.ids)} or more")
            if n_rows + len(item.ids) > self.rows:
                yield from flush()
                pending, n_rows = [], 0
            pending.append((pos, item))
            n_rows += len(item.ids)
        if pending:
            yield from flush()


def losses_flops(params: dict, cfg: ModelConfig, shapes: tuple) -> float:
    """FLOPs of one packed forward with these argument shapes (XLA cost analysis, layers unrolled)."""
    args = [jax.ShapeDtypeStruct(s[0], jnp.dtype(s[1])) for s in shapes]
    args[3] = jax.ShapeDtypeStruct(args[3].shape, jnp.dtype(cfg.dtype))
    counted = counting_config(cfg)
    return cached(("likelihood", cfg, shapes),
                  lambda: cost_flops(lambda p, *a: option_losses(p, counted, *a), abstract(params), *args))
