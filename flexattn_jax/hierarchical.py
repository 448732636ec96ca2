"""FlexAttention's decoder layer: hierarchical attention and the high-resolution selection.

A layer has one of three kinds (static): PLAIN (ordinary causal attention), SELECT (plain, and
selects HR tokens for the next layer from the select rows' attention over the LR image) and
HIERARCHICAL (the select rows also attend to their selected HR keys, merged by LSE, and select for
the next layer). The stack of layers runs in :mod:`flexattn_jax.model`; the Llama pieces are
:mod:`flexattn_jax.text`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from flexattn_jax.attention import (
    AUTO_CHUNK_MIN_KEYS,
    CausalPadding,
    attention,
    attention_with_lse,
    choose_impl,
    hr_attention,
    hr_chunked,
    hr_kernel,
    hr_kernel_attention,
    merge_by_lse,
    row_probabilities,
    rows_attention_with_lse,
)
from flexattn_jax.config import ModelConfig
from flexattn_jax.selection import Selection, cell_order, compact, select_hr_tokens, selection_mask
from flexattn_jax.text import MLP, AttentionWeights, RMSNorm, apply_rope

PLAIN, SELECT, HIERARCHICAL = 0, 1, 2  # layer kinds


class LayerContext(NamedTuple):
    """Everything a decoder layer reads besides its params and the carried state (all arrays)."""

    cos: jax.Array  # (B, T, d) RoPE of the current rows
    sin: jax.Array
    mask: CausalPadding  # causal + padding over the key slots (structured; .dense(T) is the (B, T, S) mask)
    write_index: jax.Array  # () int32: cache slot of row 0 (0 without a cache)
    select_rows: jax.Array  # (B, R) int32 row indices of the select rows
    select_valid: jax.Array  # (B, R) bool
    image_slot: jax.Array  # (B,) int32 key slot of the first LR image token
    margin: jax.Array  # (B, 2) int32 padded-band rows/cols
    alpha: jax.Array  # () float: blend of the select output into the select rows
    hr_features: jax.Array | None  # (B, M, D) projector output of the HR tiles
    hr_cos: jax.Array | None  # (B, M, d)
    hr_sin: jax.Array | None
    rng: jax.Array | None  # for the random-selection ablation


class HRKV(NamedTuple):
    """Projected HR keys (image RoPE applied) and values of all M tokens, cached for generation.

    Stacked over the hierarchical layers, ``(Lh, B, M, Hkv, d)``, or one layer's slice ``(B, M, Hkv, d)``.
    ``projected`` ``(Lh, B, M)`` marks the tokens projected so far (the incremental cache, filled as
    tokens get selected); ``None`` means every token is (all M projected at prefill).
    """

    k: jax.Array
    v: jax.Array
    projected: jax.Array | None


class LayerOutput(NamedTuple):
    x: jax.Array  # (B, T, D)
    k: jax.Array  # (B, T, Hkv, d) this layer's new keys (post-RoPE), for the cache
    v: jax.Array
    selection: Selection | None  # for the next layer
    image_attention: jax.Array | None  # (B, R, G) heads-summed map of the select rows
    hr_mask: jax.Array | None  # (B, R, M) the release's boolean mask
    hr_update: tuple[jax.Array, jax.Array, jax.Array] | None  # incremental cache: (token (B, S), k, v), M = no write


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """Per sample, ``x[b][index[b]]``: x (B, N, ...) at index (B, ...) -> (B, ..., ...)."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def _scatter_rows(x: jax.Array, rows: jax.Array, valid: jax.Array, values: jax.Array) -> jax.Array:
    """x with x[b, rows[b, r]] = values[b, r] where valid; invalid rows are dropped, never written."""
    t = x.shape[1]
    safe = jnp.where(valid, rows, t)  # out of bounds -> dropped
    b_idx = jnp.arange(x.shape[0])[:, None]
    return x.at[b_idx, safe].set(values.astype(x.dtype), mode="drop")


class DecoderLayer(nn.Module):
    """One Llama layer; ``kind`` (static) adds the FlexAttention selection and HR attention.

    * PLAIN: ordinary causal attention over the N keys.
    * SELECT: plain, and computes the HR selection for the next layer from the select rows'
      attention over the image columns (the release's layer 8).
    * HIERARCHICAL: the select rows also attend to their selected HR keys (LSE merge), and the
      layer computes the selection for the next layer (the release's layers 9..L-1).

    The main attention of all rows runs by ``cfg.attention_impl``; unless that is the dense XLA
    einsum, the select rows are recomputed (their queries against the N keys, with the fp32 LSE,
    differentiable; by key blocks for ``xla_chunked`` and long sequences) and their merged output
    overwrites the kernel's: exact for every kernel.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        norm = functools.partial(RMSNorm, eps=c.text.rms_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.input_norm = norm()
        self.attn = AttentionWeights(c)
        self.post_norm = norm()
        self.mlp = MLP(c)

    def init_all(self, x: jax.Array) -> jax.Array:
        return self.mlp(self.post_norm(self.attn.touch_all(self.input_norm(x))))

    def __call__(
        self,
        x: Float[Array, "B T D"],
        ctx: LayerContext,
        selection: Selection | None,
        cache_kv: tuple[jax.Array, jax.Array] | None,
        hr_kv: HRKV | None,
        kind: int,
    ) -> LayerOutput:
        cfg = self.cfg
        h = self.input_norm(x)
        q, k, v = self.attn.qkv(h)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if cache_kv is None:
            keys, values = k, v
        else:
            start = (0, ctx.write_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), start)
            values = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), start)
        t = q.shape[1]
        impl = choose_impl(cfg.attention_impl, q, keys, ctx.mask)
        dense = impl == "xla" or (kind != PLAIN and cfg.flex.hr_mode == "paper")  # paper: every row selects
        if dense:  # one dense pass gives every row's output and LSE
            o, lse = attention_with_lse(q, keys, values, ctx.mask.dense(t))
        else:
            o = attention(q, keys, values, ctx.mask, impl=impl)
        new_sel = image_attention = hr_mask = hr_update = None
        if kind != PLAIN:
            rows, valid = ctx.select_rows, ctx.select_valid
            q_sel = _take(q, rows)
            if dense:
                o_sel, lse_sel = _take(o, rows), _take(lse, rows)
            else:  # kernels give no differentiable LSE: recompute the R select rows, O(R N d), exact
                chunked = impl == "xla_chunked" or keys.shape[1] >= AUTO_CHUNK_MIN_KEYS  # memory O(R x block)
                o_sel, lse_sel = rows_attention_with_lse(q_sel, keys, values, ctx.mask, rows, chunked=chunked)
            if kind == HIERARCHICAL:
                o_hr, lse_hr, hr_update = self._hr_part(q_sel, selection, ctx, hr_kv)
                merged = merge_by_lse(o_sel, lse_sel, o_hr, lse_hr)
                blended = (1.0 - ctx.alpha) * o_sel.astype(jnp.float32) + ctx.alpha * merged
                o = _scatter_rows(o, rows, valid, blended)
            g2 = cfg.lr_grid**2
            k_img = jax.vmap(lambda kb, s: jax.lax.dynamic_slice_in_dim(kb, s, g2, axis=0))(keys, ctx.image_slot)
            probs = row_probabilities(q_sel, k_img, lse_sel)  # (B, R, H, G)
            img_slots = ctx.image_slot[:, None, None] + jnp.arange(g2)  # causal: rows before the image see none of it
            visible = img_slots <= (ctx.write_index + rows)[..., None]
            image_attention = jnp.where(visible, jnp.sum(probs, axis=2), 0.0)  # (B, R, G)
            new_sel, hr_mask = select_hr_tokens(image_attention, ctx.margin, valid, cfg, ctx.rng)
        x = x + self.attn.out(o)
        x = x + self.mlp(self.post_norm(x))
        return LayerOutput(x, k, v, new_sel, image_attention, hr_mask, hr_update)

    def _hr_part(
        self, q_sel: jax.Array, sel: Selection, ctx: LayerContext, hr_kv: HRKV | None
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array] | None]:
        """Attention of the select rows over their selected HR keys: (output, lse, cache update).

        A fixed budget attends with its static K (:meth:`_attend`). The adaptive budget carries the
        whole mask (K = M) and switches (``lax.switch``, one compile) to the smallest rung of
        ``cfg.hr_rungs`` that holds the largest selection of any select row in the batch: that
        rung's program packs each row's tokens into K_r slots and projects / gathers and attends
        K_r keys; nothing is truncated, so it computes what K = M computes. Rungs with R x K_r >= M
        cost the all-M path anyway (:meth:`_attend`), so they are not separate branches. The
        incremental cache (:meth:`_incremental_hr_kv`) keeps its M slots and the rung sizes the
        projections of its fallback.
        """
        cfg = self.cfg
        if hr_kv is not None and hr_kv.projected is not None:  # adaptive: the fallback's projections follow the rung
            k_hr, v_hr, update = self._incremental_hr_kv(sel, ctx, hr_kv)
            o, lse = hr_attention(q_sel, k_hr, v_hr, sel.valid)
            return o, lse, update
        if not cfg.hr_adaptive:
            return (*self._attend(q_sel, sel, ctx, hr_kv), None)
        m, r = cfg.num_hr_tokens, sel.index.shape[1]
        rungs = [k for k in cfg.hr_rungs if r * k < m] + [m]
        if len(rungs) == 1:
            return (*self._attend(q_sel, sel, ctx, hr_kv), None)
        count = jnp.max(jnp.sum(sel.valid, axis=-1))  # the largest selection of any sample and select row
        rung = jnp.sum(jnp.asarray(rungs[:-1]) < count)
        branches = [lambda k=k: self._attend(q_sel, compact(sel.valid, k) if k < m else sel, ctx, hr_kv) for k in rungs]
        o, lse = jax.lax.switch(rung, branches)  # packing inside the branch: only the taken rung's runs
        return o, lse, None

    def _attend(self, q_sel: jax.Array, sel: Selection, ctx: LayerContext, hr_kv: HRKV | None) -> tuple[jax.Array, jax.Array]:
        """HR attention of the select rows over a static-K selection (K = M: the identity index).

        With R x K >= M (K = M, or many select rows as in training: R up to ~2048) all M HR tokens are
        projected once (or read from ``hr_kv``) and shared by the rows, the selection a mask over
        them: (B, M) keys and (B, H, R, M) logits instead of (B, R, K) per-row keys, which at 7B
        with R = 2048 and K = 0.1 M is the smaller by far (``bench/adaptive.py`` measures it).
        Otherwise each row's K tokens are projected (or gathered from ``hr_kv``). With ``flex.train_hr_budget``
        the shared keys are only the union of the rows' selections (:meth:`_attend_union`). The shared-key
        attention runs by the Pallas kernel where :func:`~flexattn_jax.attention.hr_kernel` says (``splash_hr``), else
        by key blocks where :func:`~flexattn_jax.attention.hr_chunked` says (training at 7B: memory O(R x block), not
        the (B, H, R, M) fp32 logits and their gradient): :meth:`_shared`.
        """
        m, u = self.cfg.num_hr_tokens, self.cfg.train_hr_tokens
        b, r, k = sel.index.shape
        if k >= m or r * k >= m:
            valid = sel.valid if k >= m else selection_mask(sel, m)
            if hr_kv is None and u is not None and u < m:
                return self._attend_union(q_sel, valid, ctx, u)
            if hr_kv is not None:
                k_hr, v_hr = hr_kv.k, hr_kv.v
            else:
                k_hr, v_hr = self.attn.hr_kv(ctx.hr_features, ctx.hr_cos, ctx.hr_sin)
            return self._shared(q_sel, k_hr, v_hr, valid)
        if hr_kv is not None:
            k_hr, v_hr, valid = _take(hr_kv.k, sel.index), _take(hr_kv.v, sel.index), sel.valid
        else:
            (k_hr, v_hr), valid = self._project(sel.index, ctx), sel.valid
        return hr_attention(q_sel, k_hr, v_hr, valid)

    def _shared(self, q_sel: jax.Array, k_hr: jax.Array, v_hr: jax.Array, valid: jax.Array, ordered: bool = False):
        """HR attention of the select rows over keys shared by them, ``(B, S, Hkv, d)`` under the ``(B, R, S)`` mask:
        by the Pallas kernel where :func:`~flexattn_jax.attention.hr_kernel` says, its keys cell by cell
        (:func:`~flexattn_jax.selection.cell_order`, exact: a masked cell is one run of keys, skipped whole) unless
        ``ordered`` says they are already, else by :func:`~flexattn_jax.attention.hr_attention`. fp32 output."""
        r, s = q_sel.shape[1], k_hr.shape[1]
        if hr_kernel(self.cfg.attention_impl, r):
            if not ordered:
                order = cell_order(self.cfg.hr_grid, self.cfg.flex.pool_size)
                k_hr, v_hr, valid = k_hr[:, order], v_hr[:, order], valid[..., order]
            o, lse = hr_kernel_attention(q_sel, k_hr, v_hr, valid)
        else:
            o, lse = hr_attention(q_sel, k_hr, v_hr, valid, chunked=hr_chunked(self.cfg.attention_impl, r, s))
        return o.astype(jnp.float32), lse

    def _attend_union(self, q_sel: jax.Array, valid: jax.Array, ctx: LayerContext, u: int) -> tuple[jax.Array, jax.Array]:
        """``flex.train_hr_budget``: project and attend only the union of the HR tokens the sample's select rows
        selected, packed cell by cell into ``u`` slots; when a sample's union is larger, the all-M path
        (``lax.cond``, both compiled), so the result is always what all M give (up to float order)."""
        order = jnp.asarray(cell_order(self.cfg.hr_grid, self.cfg.flex.pool_size))
        union = jnp.any(valid, axis=1)[:, order]  # (B, M) cell by cell
        packed = compact(union[:, None], u)
        index, slot_valid = order[packed.index[:, 0]], packed.valid[:, 0]  # (B, U) HR token per slot
        fits = jnp.all(jnp.sum(union, axis=1) <= u)

        def selected():
            k_hr, v_hr = self._project(index, ctx)
            mask = jnp.take_along_axis(valid, jnp.broadcast_to(index[:, None], (*valid.shape[:2], u)), axis=2)
            return self._shared(q_sel, k_hr, v_hr, mask & slot_valid[:, None], ordered=True)

        def everything():
            return self._shared(q_sel, *self.attn.hr_kv(ctx.hr_features, ctx.hr_cos, ctx.hr_sin), valid)

        return jax.lax.cond(fits, selected, everything)

    def _project(self, index: jax.Array, ctx: LayerContext) -> tuple[jax.Array, jax.Array]:
        """HR keys/values of the tokens ``index`` (B, ...) only."""
        return self.attn.hr_kv(_take(ctx.hr_features, index), _take(ctx.hr_cos, index), _take(ctx.hr_sin, index))

    def _incremental_hr_kv(self, sel: Selection, ctx: LayerContext, cache: HRKV):
        """The selected HR keys/values from this layer's cache, projecting only tokens it has not seen.

        Fast path: at most ``cfg.hr_step_tokens`` newly selected tokens are projected and the rest are
        read from the cache; when more are new (any sample of the batch), ``lax.cond`` takes the
        exact fallback that projects all K selected tokens (the 'project' strategy; with the adaptive
        budget, where the slots are the M tokens, only the selected ones, packed into the rung that
        holds them). Rows > 1 (a prefill where every row selects) always take the fallback. Returns
        the keys, the values and the update (token index per slot, M where nothing is written; the
        slot's key and value).
        """
        cfg = self.cfg
        b, r, k = sel.index.shape
        s = r * k
        flat, ok = sel.index.reshape(b, s), sel.valid.reshape(b, s)
        need = ok & ~_take(cache.projected, flat)  # selected, not yet projected here
        fast = min(cfg.hr_step_tokens, s)
        dtype = cache.k.dtype

        def project_all():
            if cfg.hr_adaptive and r == 1:
                return project_rung()
            k_all, v_all = self._project(flat, ctx)
            return k_all.astype(dtype), v_all.astype(dtype)

        def project_rung():
            """Adaptive (slots = the M tokens in order): project the selected tokens, packed into the smallest
            rung that holds them (``lax.switch``), over the cache; unselected slots keep what the cache has
            (masked out of the attention, never written back: only ``need`` slots are)."""
            m = cfg.num_hr_tokens
            rungs = cfg.hr_rungs

            def branch(kr: int):
                if kr >= m:
                    k_all, v_all = self._project(flat, ctx)
                    return k_all.astype(dtype), v_all.astype(dtype)
                packed = compact(ok[:, None], kr)
                index, valid = packed.index[:, 0], packed.valid[:, 0]
                k_new, v_new = self._project(index, ctx)
                target = jnp.where(valid, index, m)  # out of range: dropped
                b_idx = jnp.arange(b)[:, None]
                return (cache.k.at[b_idx, target].set(k_new.astype(dtype), mode="drop"),
                        cache.v.at[b_idx, target].set(v_new.astype(dtype), mode="drop"))

            rung = jnp.sum(jnp.asarray(rungs[:-1]) < jnp.max(jnp.sum(ok, axis=1)))
            return jax.lax.switch(rung, [functools.partial(branch, kr) for kr in rungs])

        def project_new():
            old_k, old_v = _take(cache.k, flat), _take(cache.v, flat)
            if fast == 0:
                return old_k, old_v
            top, slot = jax.lax.top_k(need.astype(jnp.float32), fast)  # needed slots first
            k_new, v_new = self._project(_take(flat, slot), ctx)
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


def layer_kind(cfg: ModelConfig, layer: int) -> int:
    """PLAIN below the first selection layer, SELECT at it, HIERARCHICAL above (FlexAttention on)."""
    if not cfg.flex.enabled or layer < cfg.flex.first_select_layer:
        return PLAIN
    return SELECT if layer == cfg.flex.first_select_layer else HIERARCHICAL
