"""The incremental HR K/V cache of generation: each hierarchical layer's projected HR keys and values, filled as
tokens get selected, so that a decode step projects only the tokens it has not projected before.

:class:`HRKV` is the cache's state (stacked over the hierarchical layers, or one layer's slice);
:func:`incremental_hr_kv` is one layer's read-and-fill, called by :class:`flexattn_jax.hierarchical.DecoderLayer`
with the layer's own projection of HR tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flexattn_jax.config import ModelConfig
from flexattn_jax.selection import Selection, compact


class HRKV(NamedTuple):
    """Projected HR keys (image RoPE applied) and values of all M tokens, cached for generation.

    Stacked over the hierarchical layers, ``(Lh, B, M, Hkv, d)``, or one layer's slice ``(B, M, Hkv, d)``.
    ``projected`` ``(Lh, B, M)`` marks the tokens projected so far (the incremental cache, filled as
    tokens get selected); ``None`` means every token is (all M projected at prefill).
    """

    k: jax.Array
    v: jax.Array
    projected: jax.Array | None


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """Per sample, ``x[b][index[b]]``: x (B, N, ...) at index (B, ...) -> (B, ..., ...)."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def incremental_hr_kv(cfg: ModelConfig, sel: Selection, cache: HRKV, project: Callable[[jax.Array], tuple[jax.Array, jax.Array]]):
    """The selected HR keys/values from this layer's cache, projecting only tokens it has not seen.

    Fast path: at most ``cfg.hr_step_tokens`` newly selected tokens are projected and the rest are
    read from the cache; when more are new (any sample of the batch), ``lax.cond`` takes the
    exact fallback that projects all K selected tokens (the 'project' strategy; with the adaptive
    budget, where the slots are the M tokens, only the selected ones, packed into the rung that
    holds them). Rows > 1 (a prefill where every row selects) always take the fallback. Returns
    the keys, the values and the update (token index per slot, M where nothing is written; the
    slot's key and value).
    """
    b, r, k = sel.index.shape
    s = r * k
    flat, ok = sel.index.reshape(b, s), sel.valid.reshape(b, s)
    need = ok & ~take_rows(cache.projected, flat)  # selected, not yet projected here
    fast = min(cfg.hr_step_tokens, s)
    dtype = cache.k.dtype

    def project_all():
        if cfg.hr_adaptive and r == 1:
            return project_rung()
        k_all, v_all = project(flat)
        return k_all.astype(dtype), v_all.astype(dtype)

    def project_rung():
        """Adaptive (slots = the M tokens in order): project the selected tokens, packed into the smallest
        rung that holds them (``lax.switch``), over the cache; unselected slots keep what the cache has
        (masked out of the attention, never written back: only ``need`` slots are)."""
        m = cfg.num_hr_tokens
        rungs = cfg.hr_rungs

        def branch(kr: int):
            if kr >= m:
                k_all, v_all = project(flat)
                return k_all.astype(dtype), v_all.astype(dtype)
            packed = compact(ok[:, None], kr)
            index, valid = packed.index[:, 0], packed.valid[:, 0]
            k_new, v_new = project(index)
            target = jnp.where(valid, index, m)  # out of range: dropped
            b_idx = jnp.arange(b)[:, None]
            return (cache.k.at[b_idx, target].set(k_new.astype(dtype), mode="drop"),
                    cache.v.at[b_idx, target].set(v_new.astype(dtype), mode="drop"))

        rung = jnp.sum(jnp.asarray(rungs[:-1]) < jnp.max(jnp.sum(ok, axis=1)))
        return jax.lax.switch(rung, [functools.partial(branch, kr) for kr in rungs])

    def project_new():
        old_k, old_v = take_rows(cache.k, flat), take_rows(cache.v, flat)
        if fast == 0:
            return old_k, old_v
        top, slot = jax.lax.top_k(need.astype(jnp.float32), fast)  # needed slots first
        k_new, v_new = project(take_rows(flat, slot))
        slot = jnp.where(top > 0, slot, s)  # out of range: not written
        b_idx = jnp.arange(b)[:, None]
        return (old_k.at[b_idx, slot].set(k_new.astype(dtype), mode="drop"),
                old_v.at[b_idx, slot].set(v_new.astype(dtype), mode="drop"))

    if r > 1 or fast >= s:
        k_flat, v_flat = project_all()
    elif not cfg.flex.hr_cache_fallback:
        k_flat, v_flat = project_new()
    else:
        k_flat, v_flat = jax.lax.cond(jnp.any(need.sum(axis=1) > fast), project_all, project_new)
    update = (jnp.where(need, flat, cfg.num_hr_tokens), k_flat, v_flat)
    shape = (b, r, k, *k_flat.shape[2:])
    return k_flat.reshape(shape), v_flat.reshape(shape), update
