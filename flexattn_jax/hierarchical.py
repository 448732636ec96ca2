"""FlexAttention's decoder layer: hierarchical attention and the high-resolution selection.

A layer has one of three kinds (static): PLAIN (ordinary causal attention), SELECT (plain, and
selects HR tokens for the next layer from the select rows' attention over the LR image) and
HIERARCHICAL (the select rows also attend to their selected HR keys, merged by LSE, and select for
the next layer). The stack of layers runs in :mod:`flexattn_jax.model`; the Llama pieces are
:mod:`flexattn_jax.text`.
"""

from __future__ import annotations

import enum
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
from flexattn_jax.hr_cache import HRKV, incremental_hr_kv, take_rows
from flexattn_jax.selection import Selection, cell_order, compact, select_hr_tokens, selection_mask
from flexattn_jax.text import MLP, AttentionWeights, RMSNorm, apply_rope


class LayerKind(enum.IntEnum):
    """What a decoder layer computes besides ordinary causal attention (static; its value indexes ``lax.switch``)."""

    PLAIN = 0  # ordinary causal attention only
    SELECT = 1  # and the HR selection for the next layer (the release's first selection layer)
    HIERARCHICAL = 2  # and the select rows' attention over their selected HR keys, merged by LSE; selects too



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


class LayerOutput(NamedTuple):
    x: jax.Array  # (B, T, D)
    k: jax.Array  # (B, T, Hkv, d) this layer's new keys (post-RoPE), for the cache
    v: jax.Array
    selection: Selection | None  # for the next layer
    image_attention: jax.Array | None  # (B, R, G) heads-summed map of the select rows
    hr_mask: jax.Array | None  # (B, R, M) the release's boolean mask
    hr_update: tuple[jax.Array, jax.Array, jax.Array] | None  # incremental cache: (token (B, S), k, v), M = no write


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
        kind: LayerKind,
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
        dense = impl == "xla" or (kind != LayerKind.PLAIN and cfg.flex.hr_mode == "paper")  # paper: every row selects
        if dense:  # one dense pass gives every row's output and LSE
            o, lse = attention_with_lse(q, keys, values, ctx.mask.dense(t))
        else:
            o = attention(q, keys, values, ctx.mask, impl=impl)
        new_sel = image_attention = hr_mask = hr_update = None
        if kind != LayerKind.PLAIN:
            rows, valid = ctx.select_rows, ctx.select_valid
            q_sel = take_rows(q, rows)
            if dense:
                o_sel, lse_sel = take_rows(o, rows), take_rows(lse, rows)
            else:  # kernels give no differentiable LSE: recompute the R select rows, O(R N d), exact
                chunked = impl == "xla_chunked" or keys.shape[1] >= AUTO_CHUNK_MIN_KEYS  # memory O(R x block)
                o_sel, lse_sel = rows_attention_with_lse(q_sel, keys, values, ctx.mask, rows, chunked=chunked)
            if kind == LayerKind.HIERARCHICAL:
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
        incremental cache (:func:`flexattn_jax.hr_cache.incremental_hr_kv`) keeps its M slots and the rung sizes the
        projections of its fallback.
        """
        cfg = self.cfg
        if hr_kv is not None and hr_kv.projected is not None:  # adaptive: the fallback's projections follow the rung
            k_hr, v_hr, update = incremental_hr_kv(cfg, sel, hr_kv, lambda index: self._project(index, ctx))
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
            k_hr, v_hr, valid = take_rows(hr_kv.k, sel.index), take_rows(hr_kv.v, sel.index), sel.valid
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
            o, lse = hr_kernel_attention(q_sel, k_hr, v_hr, valid, self.cfg.flex.hr_kernel_block_share)
        else:
            o, lse = hr_attention(q_sel, k_hr, v_hr, valid, chunked=hr_chunked(self.cfg.attention_impl, r, s))
        return o.astype(jnp.float32), lse

    def _attend_union(self, q_sel: jax.Array, valid: jax.Array, ctx: LayerContext, u: int) -> tuple[jax.Array, jax.Array]:
        """``flex.train_hr_budget``: project and attend only the union of the HR tokens the sample's select rows
        selected, packed cell by cell into ``u`` slots; when a sample's union is larger, the all-M path
        (``lax.cond``, both compiled), so the result is always what all M give (up to float order).
        ``flex.train_hr_fallback=False``: the packed path alone (for cost analysis; not exact when a union does not fit)."""
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

        if not self.cfg.flex.train_hr_fallback:
            return selected()
        return jax.lax.cond(fits, selected, everything)

    def _project(self, index: jax.Array, ctx: LayerContext) -> tuple[jax.Array, jax.Array]:
        """HR keys/values of the tokens ``index`` (B, ...) only."""
        return self.attn.hr_kv(take_rows(ctx.hr_features, index), take_rows(ctx.hr_cos, index), take_rows(ctx.hr_sin, index))


def layer_kind(cfg: ModelConfig, layer: int) -> LayerKind:
    """PLAIN below the first selection layer, SELECT at it, HIERARCHICAL above (FlexAttention on)."""
    if not cfg.flex.enabled or layer < cfg.flex.first_select_layer:
        return LayerKind.PLAIN
    return LayerKind.SELECT if layer == cfg.flex.first_select_layer else LayerKind.HIERARCHICAL


def traced_layer_kind(cfg: ModelConfig, layer: jax.Array) -> jax.Array:
    """:func:`layer_kind` of a traced layer index (FlexAttention on): the ``lax.switch`` index of its kind."""
    first = cfg.flex.first_select_layer
    return jnp.where(layer < first, int(LayerKind.PLAIN), jnp.where(layer == first, int(LayerKind.SELECT), int(LayerKind.HIERARCHICAL)))
