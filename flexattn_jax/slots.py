"""Decode slots: the device side of continuous batching (the serving engine's jitted programs).

A fixed number ``S`` of decode rows, compiled once. Each slot holds one request's whole decode
state: its text K/V cache, and with FlexAttention its HR context (features, image RoPE, where its
image sits in its own sequence) and, for the ``'cache'`` / ``'incremental'`` HR strategies, its
projected HR K/V (with the incremental strategy: which HR tokens are projected so far). Besides,
per slot: the last token, the index of the next token and the sampling parameters
(temperature, top_p, seed) as arrays, so a new temperature is data, not a new program.

Every program is the single-request computation vmapped over rows: a slot's cache has its own
write index, positions and image range, and nothing in a row reads another row, so a request's
tokens do not depend on what shares the slots with it.

* :func:`encode_images`: the vision tower (LR features, HR features) of a batch of images; the
  engine caches its output per image;
* :func:`prefill_rows`: ``P`` prompts of one length bucket from their image features to slot
  states and first tokens (one compile per (P, bucket));
* :func:`insert_rows`: write those states into free slots (donates the slot state);
* :func:`decode_slots`: one token for every slot (one compile, donates the slot state).

On a mesh (the programs traced under :func:`~flexattn_jax.sharding.target_mesh`) the parameters
follow the rules table and every program pins the slot state it returns to :func:`slot_specs`: the
slot axis over ``data`` (x ``fsdp``), the K/V heads of the text and HR caches over ``tensor``
(as the k/v projections shard them), so a step reads and writes each chip's own slots and heads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int, PyTree

from flexattn_jax import sharding as S
from flexattn_jax.config import ModelConfig
from flexattn_jax.generate import DecodeState, HRStrategy, StepMaps, decode_step, nucleus_filter, prefill_embedded, selection_rng
from flexattn_jax.model import embed_with_features, encode, positions_from_mask


class SlotState(NamedTuple):
    """Every slot's state; each leaf has the slot axis first (``decode``'s leaves then have the batch-1 shapes of
    :class:`~flexattn_jax.generate.DecodeState`)."""

    decode: DecodeState
    token: Int[Array, " S"]  # the last sampled token: the next step's input
    step: Int[Array, " S"]  # index of the next token to sample (tokens sampled so far)
    temperature: Float[Array, " S"]  # 0: greedy
    top_p: Float[Array, " S"]
    seed: Int[Array, " S"]  # the sampling key is jax.random.key(seed), token i draws with fold_in(key, i)


def slot_logical(state: PyTree) -> PyTree:
    """Logical axis names per leaf of a :class:`SlotState` (or its ``ShapeDtypeStruct`` tree): ``batch`` on the slot
    axis; on the text K/V cache and the HR K/V (``(S, L, 1, len, Hkv, d)``) also ``kv_heads``."""
    def one(path, leaf):
        names = [getattr(k, "name", None) for k in path]
        logical: list[str | None] = ["batch"] + [None] * (len(leaf.shape) - 1)
        if len(leaf.shape) == 6 and (names[1:3] in (["cache", "k"], ["cache", "v"]) or names[1:2] == ["hr_kv"]):
            logical[4] = "kv_heads"
        return tuple(logical)

    return jax.tree_util.tree_map_with_path(one, state)


def slot_specs(state: PyTree, mesh: Mesh) -> PyTree:
    """``PartitionSpec`` per leaf of the slot state on ``mesh`` (:func:`slot_logical` through the rules table)."""
    return jax.tree.map(lambda leaf, names: S.logical_to_spec(names, leaf.shape, mesh), state, slot_logical(state))


def slot_shardings(state: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding`` per leaf of the slot state on ``mesh`` (:func:`slot_specs`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), slot_specs(state, mesh))


def constrain_slots(state: SlotState) -> SlotState:
    """The slot state pinned to :func:`slot_specs` of the ambient mesh (:func:`~flexattn_jax.sharding.target_mesh`);
    unchanged without one."""
    return jax.tree.map(S.constrain_logical, state, slot_logical(state))


def _random_selection(cfg: ModelConfig) -> bool:
    return cfg.flex.enabled and cfg.flex.selection == "random"


def sample_rows(
    logits: Float[Array, "B V"], seed: Int[Array, " B"], step: Int[Array, " B"], temperature: Float[Array, " B"],
    top_p: Float[Array, " B"],
) -> Int[Array, " B"]:
    """Per row: greedy where ``temperature == 0``, else temperature + nucleus sampling with the row's own key
    ``fold_in(key(seed), step)`` (reproducible from the seed whatever the other rows hold)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = nucleus_filter(logits / jnp.where(temperature > 0, temperature, 1.0)[:, None], top_p)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, step)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_images(
    params: dict, cfg: ModelConfig, pixel_values: Float[Array, "B H W C"]
) -> tuple[Float[Array, "B G D"], Float[Array, "B M D"] | None]:
    """The vision tower's outputs for the prompt (``G`` LR features) and, with FlexAttention, the HR features."""
    return encode(params, cfg, pixel_values)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "hr_strategy"))
def prefill_rows(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "P T"],
    attention_mask: Bool[Array, "P T"],
    features: Float[Array, "P G D"],
    hr_features: Float[Array, "P M D"] | None,
    margin: Int[Array, "P 2"],
    temperature: Float[Array, " P"],
    top_p: Float[Array, " P"],
    seed: Int[Array, " P"],
    *,
    max_len: int,
    hr_strategy: HRStrategy = "project",
) -> tuple[SlotState, Int[Array, " P"], StepMaps | None]:
    """Each (left-padded) prompt prefilled on its own into a slot state with a ``max_len`` cache; its first token.

    The prefill maps (per layer, the last prompt row's LR attention and HR mask) come back with a
    leading ``P`` axis and batch 1 inside.
    """
    def one(ids, mask, feats, hr_feats, margin, seed):
        mask = mask[None].astype(bool)
        positions = positions_from_mask(mask)
        x, hr = embed_with_features(params, cfg, ids[None], feats[None], None if hr_feats is None else hr_feats[None],
                                    positions, margin[None])
        rng = selection_rng(jax.random.key(seed)) if _random_selection(cfg) else None
        state, logits, maps = prefill_embedded(params, cfg, x, hr, mask, positions, max_len=max_len, hr_strategy=hr_strategy,
                                               rng=rng)
        return state, logits[0], maps

    states, logits, maps = jax.vmap(one)(input_ids, attention_mask, features, hr_features, margin, seed)
    zero = jnp.zeros_like(seed)
    first = sample_rows(logits, seed, zero, temperature, top_p)
    rows = SlotState(states, first, zero + 1, temperature.astype(jnp.float32), top_p.astype(jnp.float32), seed)
    return constrain_slots(rows), first, maps


@functools.partial(jax.jit, donate_argnums=(0,))
def insert_rows(state: SlotState, rows: SlotState, slots: Int[Array, " P"]) -> SlotState:
    """``rows`` written into slots ``slots`` (an index ``>= S`` drops its row: the padding of a prefill batch).

    One ``dynamic_update_slice`` per row (a scatter of whole slots is an element loop on CPU, ~50x slower)."""
    size = slots.shape[0]

    def put(s, r):
        last = s.shape[0] - 1
        for p in range(size):
            i = jnp.minimum(slots[p], last)
            keep = jax.lax.dynamic_slice_in_dim(s, i, 1)
            s = jax.lax.dynamic_update_slice_in_dim(s, jnp.where(slots[p] <= last, r[p:p + 1].astype(s.dtype), keep), i, 0)
        return s

    return constrain_slots(jax.tree.map(put, state, rows))


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("state",))
def decode_slots(params: dict, cfg: ModelConfig, state: SlotState, steps: int = 1) -> tuple[SlotState, Int[Array, "K S"]]:
    """Every slot advanced by ``steps`` tokens (a free slot too: its result is ignored); the new tokens, step by step.

    Several steps per call cost one host round trip instead of ``steps``; a request that ends within
    them only wastes the steps after its end (its tokens are the same: each step of a slot reads only
    that slot).
    """
    def one(decode, token, seed, step):
        rng = jax.random.fold_in(selection_rng(jax.random.key(seed)), step) if _random_selection(cfg) else None
        decode, logits, _ = decode_step(params, cfg, decode, token[None], rng)
        return decode, logits[0]

    def body(state, _):
        decode, logits = jax.vmap(one)(state.decode, state.token, state.seed, state.step)
        token = sample_rows(logits, state.seed, state.step, state.temperature, state.top_p)
        return constrain_slots(state._replace(decode=decode, token=token, step=state.step + 1)), token

    return jax.lax.scan(body, state, None, length=steps)


def slot_shapes(
    params: dict, cfg: ModelConfig, slots: int, max_len: int, hr_strategy: HRStrategy = "project"
) -> SlotState:
    """``ShapeDtypeStruct`` leaves of ``slots`` slots' state, as :func:`prefill_rows` gives it (its cache ``max_len`` long)."""
    pixels = jax.ShapeDtypeStruct((slots, cfg.image_size, cfg.image_size, 3), jnp.dtype(cfg.dtype))
    feats, hr = jax.eval_shape(lambda q, p: encode(q, cfg, p), params, pixels)
    ids = jax.ShapeDtypeStruct((slots, 1), jnp.int32)
    vec = lambda dt: jax.ShapeDtypeStruct((slots,), dt)  # noqa: E731
    shapes = jax.eval_shape(
        lambda p, *a: prefill_rows(p, cfg, *a, max_len=max_len, hr_strategy=hr_strategy),
        params, ids, jax.ShapeDtypeStruct((slots, 1), bool), feats, hr, jax.ShapeDtypeStruct((slots, 2), jnp.int32),
        vec(jnp.float32), vec(jnp.float32), vec(jnp.int32),
    )[0]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)


def empty_slots(
    params: dict, cfg: ModelConfig, slots: int, max_len: int, hr_strategy: HRStrategy = "project", mesh: Mesh | None = None
) -> SlotState:
    """``slots`` free slots: zeros of :func:`slot_shapes`; with ``mesh``, made in place with :func:`slot_shardings` (no
    chip ever holds the whole state)."""
    shapes = slot_shapes(params, cfg, slots, max_len, hr_strategy)
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    return zeros() if mesh is None else jax.jit(zeros, out_shardings=slot_shardings(shapes, mesh))()


def slot_bytes(state: SlotState) -> int:
    """Device bytes of one slot's state (K/V cache, HR features, HR cache, the per-slot scalars)."""
    return sum(a.nbytes // a.shape[0] for a in jax.tree.leaves(state))
