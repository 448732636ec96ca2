"""LLaVA-1.5 with FlexAttention: the forward pass as a pure function of (params, inputs).

``forward`` embeds the tokens, merges the LR image features at the ``<image>`` placeholders
(static-shape cumsum-gather), runs the decoder (one scan over the stacked layers; each layer's
kind - plain, select, hierarchical - is switched inside the scan, so one compile serves any
depth) and returns logits plus, on request, hidden states, attention maps and HR masks.
The same decoder runs with an explicit KV cache for generation (:mod:`flexattn_jax.generate`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax import hierarchical as H
from flexattn_jax import sharding as S
from flexattn_jax import text as T
from flexattn_jax.attention import CausalPadding
from flexattn_jax.config import ModelConfig, check_context
from flexattn_jax.selection import Selection
from flexattn_jax.vision import dual_path, encode_images

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Explicit KV cache: a static ``max_len`` of slots per layer."""

    k: Float[Array, "L B S Hkv d"]
    v: Float[Array, "L B S Hkv d"]
    valid: Bool[Array, "B S"]  # slot holds a real (non-padding) token
    index: Int[Array, ""]  # next slot to write


class DecoderOutput(NamedTuple):
    x: jax.Array  # (B, T, D) final hidden state (before the final norm)
    cache: KVCache | None
    selection: Selection | None  # the last layer's selection (for a following decode step's layers)
    hidden_states: jax.Array | None  # (L, B, T, D) each layer's output
    image_attention: jax.Array | None  # (L, B, R, G)
    hr_masks: jax.Array | None  # (L, B, R, M)
    hr_kv: H.HRKV | None  # the HR K/V cache passed in, updated (incremental strategy)


class ForwardOutput(NamedTuple):
    logits: Float[Array, "B T V"]
    hidden_states: jax.Array | None  # (L + 1, B, T, D): embeddings, each layer's output, the last after the final norm
    image_attention: jax.Array | None  # (L, B, R, G): select rows' heads-summed map (zeros below the first select layer)
    hr_masks: jax.Array | None  # (L, B, R, M): the release's boolean HR masks per layer


# ---- host-side checks -------------------------------------------------------------------------

def check_image_tokens(cfg: ModelConfig, input_ids: np.ndarray, num_images: np.ndarray | int) -> None:
    """Raise ValueError unless every sample has exactly ``num_images * G`` image tokens.

    Placeholder expansion happens on the host (preprocess), so counting happens there too:
    before jit, with a message that says which sample is wrong.
    """
    ids = np.asarray(input_ids)
    counts = (ids == cfg.image_token_id).sum(axis=1)
    want = np.broadcast_to(np.asarray(num_images), counts.shape) * cfg.num_image_tokens
    for b, (got, exp) in enumerate(zip(counts, want, strict=False)):
        if got != exp:
            raise ValueError(
                f"sample {b}: {got} image tokens (id {cfg.image_token_id}) but {exp // cfg.num_image_tokens} image(s) "
                f"x {cfg.num_image_tokens} tokens each = {exp} expected; expand each <image> once per image"
            )


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


# ---- pieces ------------------------------------------------------------------------------------

def embed_tokens(text_params: dict, cfg: ModelConfig, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Token embeddings; ids outside the vocabulary (the original LLaVA's image placeholder -200) embed as id 0.

    An in-vocabulary image token id embeds its own row, as transformers does: the prompt's placeholders
    are overwritten by image features afterwards, and a generated one is an ordinary token.

    Under a mesh the table's embed dim is gathered first (FSDP's all-gather of a weight), so the lookup and
    its gradient's scatter-add stay batch-sharded (the scatter's result is reduced to the table's shards).
    Gathering from the embed-sharded table instead made XLA replicate the batch's whole cotangent ("[SPMD]
    Involuntary full rematerialization ... to {devices=[1,1,4,2] ...}" on data=2,fsdp=4).
    """
    table = S.constrain_logical(text_params["embed"]["embedding"], ("vocab", None))
    ids = jnp.where((input_ids < 0) | (input_ids >= table.shape[0]), 0, input_ids)
    return S.constrain_batch(jnp.take(table, ids, axis=0).astype(jnp.dtype(cfg.dtype)))


def merge_image_features(
    x: Float[Array, "B T D"], input_ids: Int[Array, "B T"], features: Float[Array, "B P D"], image_token_id: int
) -> Float[Array, "B T D"]:
    """Put each sample's image features, in order, at its image-token positions (cumsum-gather)."""
    is_img = input_ids == image_token_id
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered.astype(x.dtype), x)


def final_norm(text_params: dict, cfg: ModelConfig, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return T.RMSNorm(cfg.text.rms_norm_eps, dtype=x.dtype).apply({"params": text_params["final_norm"]}, x)


def logits_from_hidden(text_params: dict, cfg: ModelConfig, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Final RMSNorm and the (tied or untied) LM head, in fp32."""
    h = final_norm(text_params, cfg, x)
    if cfg.text.tie_word_embeddings:
        w = text_params["embed"]["embedding"].T
    else:
        w = text_params["lm_head"]["kernel"]
    return jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def default_select_rows(
    cfg: ModelConfig, attention_mask: Bool[Array, "B T"]
) -> tuple[Int[Array, "B R"], Bool[Array, "B R"]]:
    """Inference select rows: the last real row (release) or every row (paper)."""
    b, t = attention_mask.shape
    if cfg.flex.hr_mode == "paper":
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), attention_mask
    last = (t - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)).astype(jnp.int32)
    return last[:, None], jnp.any(attention_mask, axis=1)[:, None]


class HRContext(NamedTuple):
    """Per-sample high-resolution context, fixed for a prompt and kept across decode steps."""

    features: Float[Array, "B M D"]
    cos: Float[Array, "B M d"]
    sin: Float[Array, "B M d"]
    image_slot: Int[Array, " B"]  # cache/sequence slot of the first LR image token
    margin: Int[Array, "B 2"]
    has_image: Bool[Array, " B"]


def hr_context(
    cfg: ModelConfig,
    hr_features: jax.Array,
    input_ids: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    margin: Int[Array, "B 2"] | None,
) -> HRContext:
    """HR features plus their image RoPE, from the LR image tokens' positions in the sequence."""
    is_img = input_ids == cfg.image_token_id
    begin = jnp.argmax(is_img, axis=1).astype(jnp.int32)
    g2 = cfg.lr_grid**2
    img_pos = jnp.take_along_axis(positions, jnp.clip(begin[:, None] + jnp.arange(g2), 0, positions.shape[1] - 1), axis=1)
    cos, sin = T.image_rope(cfg.text, img_pos, cfg.lr_grid, cfg.hr_grid)
    if margin is None:
        margin = jnp.zeros((input_ids.shape[0], 2), jnp.int32)
    return HRContext(S.constrain_batch(hr_features), cos, sin, begin, margin, jnp.any(is_img, axis=1))


# ---- the decoder --------------------------------------------------------------------------------

def run_decoder(
    text_params: dict,
    cfg: ModelConfig,
    x: Float[Array, "B T D"],
    positions: Int[Array, "B T"],
    key_valid: Bool[Array, "B S"],
    *,
    cache: KVCache | None = None,
    hr: HRContext | None = None,
    hr_kv: H.HRKV | None = None,
    select_rows: jax.Array | None = None,
    select_valid: jax.Array | None = None,
    alpha: float | jax.Array = 1.0,
    rng: jax.Array | None = None,
    collect_hidden: bool = False,
    collect_maps: bool = False,
    cache_start: int | None = None,
) -> DecoderOutput:
    """All decoder layers over rows ``x`` (with a cache: written at ``cache.index``).

    ``cache_start`` is ``cache.index`` as a Python int when the caller knows it at trace time (a
    fresh cache: 0), which a kernel with a static causal offset (splash, cuDNN) needs for many rows.

    ``key_valid`` marks valid key slots: the attention mask without a cache, the cache's valid
    slots (already including the new rows) with one. ``hr_kv`` optionally gives every
    hierarchical layer's projected HR keys/values, ``(Lh, B, M, Hkv, d)``, instead of projecting
    the HR features in the layer; with ``hr_kv.projected`` it is the incremental cache, which the
    hierarchical layers fill (the updated cache is returned).
    """
    t_cfg = cfg.text
    b, t, _ = x.shape
    check_context(t_cfg, key_valid.shape[1])  # static: the key slots (a cache's max_len) against a sliding window
    write_index = jnp.int32(0) if cache is None else cache.index
    mask = CausalPadding(key_valid, write_index, 0 if cache is None else cache_start)  # no cache: row 0 at slot 0, static
    cos, sin = T.rope_cos_sin(t_cfg, positions)
    flex = cfg.flex.enabled and hr is not None
    if flex:
        if select_rows is None:
            raise ValueError("run_decoder with an HR context needs select_rows")
        select_valid = select_valid & hr.has_image[:, None]
        ctx = H.LayerContext(
            cos, sin, mask, write_index, select_rows.astype(jnp.int32), select_valid,
            hr.image_slot, hr.margin, jnp.asarray(alpha, jnp.float32), hr.features, hr.cos, hr.sin, rng,
        )
        r, k_budget = select_rows.shape[1], cfg.hr_budget_tokens
        sel0 = Selection(jnp.zeros((b, r, k_budget), jnp.int32), jnp.zeros((b, r, k_budget), bool))
    else:
        dummy = jnp.zeros((b, 1), jnp.int32)
        ctx = H.LayerContext(
            cos, sin, mask, write_index, dummy, dummy > 0,
            dummy[:, 0], jnp.zeros((b, 2), jnp.int32), jnp.float32(0), None, None, None, rng,
        )
        sel0 = None
    layer = H.DecoderLayer(cfg)
    num_layers = t_cfg.num_layers
    first_hier = cfg.flex.first_select_layer + 1

    incremental = flex and hr_kv is not None and hr_kv.projected is not None

    def no_update():
        slots = ctx.select_rows.shape[1] * cfg.hr_budget_tokens
        zeros = jnp.zeros((b, slots, *hr_kv.k.shape[-2:]), hr_kv.k.dtype)
        return jnp.full((b, slots), cfg.num_hr_tokens, jnp.int32), zeros, zeros

    def run_layer(kind: H.LayerKind, ctx, x, sel, p, ck_i, cv_i, hkv_i):
        lora_rngs = {"lora_dropout": jax.random.fold_in(ctx.rng, 1)} if ctx.rng is not None and cfg.lora_dropout > 0 else None
        out = layer.apply({"params": p}, x, ctx, sel, None if ck_i is None else (ck_i, cv_i), hkv_i, kind, rngs=lora_rngs)
        r_shape = (b, ctx.select_rows.shape[1])
        sel_out = out.selection if out.selection is not None else sel
        att = out.image_attention if out.image_attention is not None else jnp.zeros((*r_shape, cfg.lr_grid**2), jnp.float32)
        msk = out.hr_mask if out.hr_mask is not None else jnp.zeros((*r_shape, cfg.num_hr_tokens), bool)
        upd = (out.hr_update if out.hr_update is not None else no_update()) if incremental else None
        return out.x, sel_out, out.k, out.v, att, msk, upd

    def switched_layer(i, *args, one_layer=run_layer):
        """The layer whose kind the traced index ``i`` picks (one ``lax.switch`` over the kinds)."""
        branches = [lambda *a, kd=kd: one_layer(kd, *a) for kd in H.LayerKind]
        # the layer's weights sliced here, not inside the branch that alone reads them (XLA sinks the slice into the
        # switch, where a layout the branch's dots want reaches the whole stack: libtpu copied the 7B's int8 k_hr and
        # v_hr stacks, 1 GiB, before the loop)
        args = (*args[:3], jax.lax.optimization_barrier(args[3]), *args[4:])
        return jax.lax.switch(H.traced_layer_kind(cfg, i), branches, *args)

    if cfg.remat_policy != "none":
        # one checkpoint around the switch, not one in each branch: a branch's residuals leave the switch as new
        # values, so the scan stacked the layer's weights (its ``p``) again as a residual, a copy of the whole decoder
        # per chip; around the switch the residuals are the scan's own inputs and are not copied (docs/lora.md)
        policy = REMAT_POLICIES[cfg.remat_policy]
        run_layer = jax.checkpoint(run_layer, policy=policy, static_argnums=(0,))
        switched_layer = jax.checkpoint(switched_layer, policy=policy)

    def hr_slot(i):
        return jnp.clip(i - first_hier, 0, hr_kv.k.shape[0] - 1)

    def layer_step(i, kind, x, sel, ck, cv, hkv, p):
        """One layer, with ``kind`` static (an int) or switched on the traced layer index ``i``."""
        ck_i = None if ck is None else jax.lax.dynamic_index_in_dim(ck, i, keepdims=False)
        cv_i = None if cv is None else jax.lax.dynamic_index_in_dim(cv, i, keepdims=False)
        hkv_i = None if hkv is None else H.HRKV(
            *(None if a is None else jax.lax.dynamic_index_in_dim(a, hr_slot(i), keepdims=False) for a in hkv)
        )
        layer_ctx = ctx if ctx.rng is None else ctx._replace(rng=jax.random.fold_in(ctx.rng, i))  # a new draw per layer
        x = S.constrain_batch(x)  # the residual stream stays batch-sharded under a mesh (no replicated activations)
        args = (layer_ctx, x, sel, p, ck_i, cv_i, hkv_i)
        if kind is not None:
            x, sel, k, v, att, msk, upd = run_layer(kind, *args)
        else:
            x, sel, k, v, att, msk, upd = switched_layer(i, *args)
        if ck is not None:
            start = (i, 0, write_index, 0, 0)
            ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
        if upd is not None:  # write the newly projected HR tokens (M = no write: other layer kinds, cached slots)
            token, k_new, v_new = upd
            j, b_idx = hr_slot(i), jnp.arange(b)[:, None]
            hkv = H.HRKV(
                hkv.k.at[j, b_idx, token].set(k_new.astype(hkv.k.dtype), mode="drop"),
                hkv.v.at[j, b_idx, token].set(v_new.astype(hkv.v.dtype), mode="drop"),
                hkv.projected.at[j, b_idx, token].set(True, mode="drop"),
            )
        return x, sel, ck, cv, hkv, att, msk

    ck = None if cache is None else cache.k
    cv = None if cache is None else cache.v
    hkv = hr_kv if flex else None
    hiddens, atts, msks = [], [], []
    if cfg.scan_layers:

        def body(carry, xs):
            x, sel, ck, cv, hkv = carry
            p, i = xs
            x, sel, ck, cv, hkv, att, msk = layer_step(i, None if flex else H.LayerKind.PLAIN, x, sel, ck, cv, hkv, p)
            ys = (x if collect_hidden else None, att if collect_maps and flex else None, msk if collect_maps and flex else None)
            return (x, sel, ck, cv, hkv), ys

        (x, sel, ck, cv, hkv), (hs, att, msk) = jax.lax.scan(
            body, (x, sel0, ck, cv, hkv), (text_params["layers"], jnp.arange(num_layers))
        )
    else:
        sel = sel0
        for i in range(num_layers):
            p = jax.tree.map(lambda a, i=i: a[i], text_params["layers"])
            kind = H.layer_kind(cfg, i) if flex else H.LayerKind.PLAIN
            x, sel, ck, cv, hkv, a_i, m_i = layer_step(i, kind, x, sel, ck, cv, hkv, p)
            hiddens.append(x)
            atts.append(a_i)
            msks.append(m_i)
        hs = jnp.stack(hiddens) if collect_hidden else None
        att = jnp.stack(atts) if collect_maps and flex else None
        msk = jnp.stack(msks) if collect_maps and flex else None
    new_cache = None if cache is None else KVCache(ck, cv, cache.valid, cache.index + t)
    return DecoderOutput(x, new_cache, sel, hs, att, msk, hkv if flex else hr_kv)


# ---- the model ----------------------------------------------------------------------------------

def encode(params: dict, cfg: ModelConfig, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Image features for the sequence ``(B, I*G, D)`` and, with FlexAttention, the HR features."""
    if cfg.flex.enabled:
        if pixel_values.ndim == 5:
            if pixel_values.shape[1] != 1:
                raise ValueError(f"FlexAttention takes one image per sample; pixel_values has {pixel_values.shape[1]}")
            pixel_values = pixel_values[:, 0]
        return dual_path(params, cfg, S.constrain_batch(pixel_values))  # (the tiling before CLIP stays sharded)
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[:, None]
    b, i, h, w, c = pixel_values.shape
    s = cfg.vision.image_size
    if (h, w) != (s, s):
        raise ValueError(f"pixel_values are {h}x{w}; the vision tower takes {s}x{s}")
    feats = encode_images(params, cfg, pixel_values.reshape(b * i, h, w, c))
    return feats.reshape(b, i * feats.shape[1], -1), None


def hr_feature_rms(params: dict, cfg: ModelConfig, pixel_values: Float[Array, "B H W C"]) -> float:
    """Root mean square of the HR features (the projector's output for the tiles) of a batch of images.

    The scale :func:`flexattn_jax.params.add_hr_projections` (``init='copy-normed'``) folds into the HR kernels.
    ``params`` may be a plain LLaVA tree: the dual path only uses the vision tower and the projector."""
    if not cfg.flex.enabled:
        raise ValueError("hr_feature_rms needs a FlexAttention config (cfg.flex.enabled): a plain model has no HR features")
    _, hr = jax.jit(encode, static_argnums=1)(params, cfg, jnp.asarray(pixel_values))
    return float(jnp.sqrt(jnp.mean(jnp.square(hr.astype(jnp.float32)))))


def embed_inputs(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    pixel_values: jax.Array | None,
    positions: Int[Array, "B T"],
    margin: Int[Array, "B 2"] | None,
) -> tuple[Float[Array, "B T D"], HRContext | None]:
    """Token embeddings with the LR image features merged in, and (FlexAttention) the HR context.

    A batch without any image token (text-only samples, e.g. the 40k of LLaVA's 665k mix when the
    loader puts them together) skips the vision tower: ``lax.cond`` on the batch, static shapes, zero
    features in its place (nothing reads them: no image token takes them, no select row is valid).
    """
    x = embed_tokens(params["text"], cfg, input_ids)
    if pixel_values is None:
        return x, None
    shapes = jax.eval_shape(lambda p: encode(params, cfg, p), pixel_values)
    feats, hr_feats = jax.lax.cond(
        jnp.any(input_ids == cfg.image_token_id),
        lambda p: encode(params, cfg, p),
        lambda p: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
        pixel_values,
    )
    return embed_with_features(params, cfg, input_ids, feats, hr_feats, positions, margin, x)


def embed_with_features(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    features: Float[Array, "B P D"],
    hr_features: Float[Array, "B M D"] | None,
    positions: Int[Array, "B T"],
    margin: Int[Array, "B 2"] | None,
    x: Float[Array, "B T D"] | None = None,
) -> tuple[Float[Array, "B T D"], HRContext | None]:
    """:func:`embed_inputs` from already encoded images (:func:`encode`'s two outputs): the decode slots' image cache
    runs the vision tower once per image and prefills from its features."""
    x = embed_tokens(params["text"], cfg, input_ids) if x is None else x
    x = merge_image_features(x, input_ids, features, cfg.image_token_id)
    hr = None if hr_features is None else hr_context(cfg, hr_features.astype(x.dtype), input_ids, positions, margin)
    return x, hr


def positions_from_mask(attention_mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
    """HF's position ids for left/right padding: cumsum of the mask minus one, clipped at 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def forward(
    params: dict,
    cfg: ModelConfig,
    input_ids: Int[Array, "B T"],
    pixel_values: Float[Array, "B *I H W C"] | None = None,
    attention_mask: Bool[Array, "B T"] | None = None,
    *,
    positions: Int[Array, "B T"] | None = None,
    margin: Int[Array, "B 2"] | None = None,
    select_rows: Int[Array, "B R"] | None = None,
    select_valid: Bool[Array, "B R"] | None = None,
    alpha: float | jax.Array = 1.0,
    rng: jax.Array | None = None,
    return_hidden: bool = False,
    return_maps: bool = False,
) -> ForwardOutput:
    """Logits of LLaVA(-FlexAttn) for a padded batch; pure, jit it with ``cfg`` static.

    ``pixel_values`` are NHWC, CLIP-normalised: ``(B, S, S, 3)`` (one image per sample; with
    FlexAttention S is ``highres_size``) or ``(B, I, S, S, 3)`` for I images per sample (plain
    LLaVA). ``margin`` is :func:`flexattn_jax.selection.margin_patches` of the original sizes.
    ``select_rows``/``select_valid`` default to the inference rows (:func:`default_select_rows`);
    training passes the learnable rows and ``alpha``. ``rng`` drives the random-selection ablation and, with
    ``cfg.lora_dropout`` > 0, the LoRA dropout (:class:`flexattn_jax.text.Linear`); without it nothing is random.
    """
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if _concrete(input_ids) and pixel_values is not None and _concrete(pixel_values):
        n_img = 1 if (cfg.flex.enabled or pixel_values.ndim == 4) else pixel_values.shape[1]
        has = (np.asarray(input_ids) == cfg.image_token_id).any(axis=1)
        check_image_tokens(cfg, np.asarray(input_ids)[has], n_img)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    x, hr = embed_inputs(params, cfg, input_ids, pixel_values, positions, margin)
    if hr is not None and select_rows is None:
        select_rows, select_valid = default_select_rows(cfg, attention_mask)
    elif select_rows is not None and select_valid is None:
        select_valid = jnp.ones(select_rows.shape, bool)
    out = run_decoder(
        params["text"], cfg, x, positions, attention_mask, hr=hr, select_rows=select_rows, select_valid=select_valid,
        alpha=alpha, rng=rng, collect_hidden=return_hidden, collect_maps=return_maps,
    )
    logits = logits_from_hidden(params["text"], cfg, out.x)
    hidden = None
    if return_hidden:  # transformers' convention: the last entry is after the final norm
        normed = final_norm(params["text"], cfg, out.x)
        hidden = jnp.concatenate([x[None], out.hidden_states[:-1], normed[None]], axis=0)
    return ForwardOutput(logits, hidden, out.image_attention, out.hr_masks)
