"""The parameter tree: its layout, shapes, random initialisation and abstract (shape-only) form.

Parameters are a plain nested dict of arrays (what the converter writes and orbax saves)::

    vision/
      patch_embed/kernel        (p, p, C, Dv)     conv, HWIO
      patch_embed/bias          (Dv,)             SigLIP only
      class_embed               (Dv,)             CLIP only
      pos_embed/embedding       (P + 1, Dv)       P = (image_size / p)^2 (P for SigLIP: no class token)
      pre_norm/{scale,bias}     (Dv,)             CLIP only
      layers/                   every leaf has a leading axis Lv (all CLIP layers, stacked)
        norm1/{scale,bias}      (Lv, Dv)
        attn/{q,k,v,o}/kernel   (Lv, Dv, Dv)      (in, out)
        attn/{q,k,v,o}/bias     (Lv, Dv)
        norm2/{scale,bias}      (Lv, Dv)
        mlp/fc1/{kernel,bias}   (Lv, Dv, Fv), (Lv, Fv)
        mlp/fc2/{kernel,bias}   (Lv, Fv, Dv), (Lv, Dv)
      post_norm/{scale,bias}    (Dv,)             kept for a faithful export; unused by LLaVA
    projector/
      linear_1/{kernel,bias}    (Dv, D), (D,)
      linear_2/{kernel,bias}    (D, D), (D,)      only for mlp2x_gelu
    text/
      embed/embedding           (V, D)
      layers/                   every leaf has a leading axis L (all decoder layers, stacked)
        input_norm/scale        (L, D)
        attn/q/kernel           (L, D, H*d)
        attn/k/kernel           (L, D, Hkv*d)
        attn/v/kernel           (L, D, Hkv*d)
        attn/{q,k,v}/bias       (L, H*d), (L, Hkv*d)   only with text.attention_bias (Qwen2; then k_hr/v_hr too)
        attn/o/kernel           (L, H*d, D)
        attn/k_hr/kernel        (L, D, Hkv*d)     FlexAttention's k_proj_hd (only when flex.enabled)
        attn/v_hr/kernel        (L, D, Hkv*d)     FlexAttention's v_proj_hd (only when flex.enabled)
        post_norm/scale         (L, D)
        mlp/{gate,up}/kernel    (L, D, F)
        mlp/down/kernel         (L, F, D)
      final_norm/scale          (D,)
      lm_head/kernel            (D, V)            absent when tie_word_embeddings

Linear kernels are (in, out): a PyTorch ``weight`` transposed. Heads are split in the forward
pass, not in storage, so the converter's only transforms are ``.T``, the conv transpose and
renames. Decoder layers are stored as one stack; the forward pass scans over slices of it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax import hierarchical, text, vision
from flexattn_jax.config import ModelConfig

Params = dict  # nested dict of arrays, layout above


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random parameters from the Flax modules' own initialisers (stacked layers via vmap)."""
    v, t = cfg.vision, cfg.text
    dt = jnp.dtype(cfg.dtype)
    keys = iter(jax.random.split(key, 8))

    def stacked(module, n, *args, method=None):
        init = lambda k: module.init(k, *args, method=method)["params"]
        return jax.vmap(init)(jax.random.split(next(keys), n))

    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), dt)
    stem = vision.VisionStem(cfg).init(next(keys), pixels)["params"]
    tokens_v = jnp.zeros((1, v.num_patches + 1, v.hidden_size), dt)
    vision_params = {
        **stem,
        "layers": stacked(vision.VisionLayer(cfg), v.num_layers, tokens_v),
        "post_norm": vision._layer_norm(cfg).init(next(keys), tokens_v)["params"],
    }
    projector = vision.Projector(cfg).init(next(keys), jnp.zeros((1, 1, v.hidden_size), dt))["params"]
    h = jnp.zeros((1, 1, t.hidden_size), dt)
    text_params = {
        "embed": nn.Embed(t.vocab_size, t.hidden_size, param_dtype=jnp.dtype(cfg.param_dtype),
                          embedding_init=nn.initializers.normal(0.02)).init(next(keys), jnp.zeros((1,), jnp.int32))["params"],
        "layers": stacked(hierarchical.DecoderLayer(cfg), t.num_layers, h, method="init_all"),
        "final_norm": text.RMSNorm(t.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype)).init(next(keys), h)["params"],
    }
    if not t.tie_word_embeddings:
        text_params["lm_head"] = nn.Dense(t.vocab_size, use_bias=False, param_dtype=jnp.dtype(cfg.param_dtype),
                                          kernel_init=nn.initializers.normal(0.02)).init(next(keys), h)["params"]
    return {"vision": vision_params, "projector": projector, "text": text_params}


def abstract_params(cfg: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` leaves (no memory): the converter's and restore's target."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def flatten(params: Params) -> dict[str, jax.Array]:
    """``{'text/layers/attn/q/kernel': array, ...}``: the slash-joined view used by the converter and sharding."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in flat}


def unflatten(flat: dict[str, object]) -> Params:
    """Inverse of :func:`flatten`."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


HR_INITS = ("copy", "copy-normed", "random")


def add_hr_projections(params: Params, init: str = "copy", key: jax.Array | None = None, std: float = 0.02,
                       feature_rms: float | None = None) -> Params:
    """A FlexAttention tree from a plain LLaVA one: adds ``k_hr`` / ``v_hr`` (FlexAttention's ``k_proj_hd`` / ``v_proj_hd``).

    ``init='copy'`` (default) starts them as copies of ``k`` / ``v``: the HR keys and values then begin as
    what the pretrained layers would compute for those image tokens in the sequence, so fine-tuning
    starts from a model that can already read them (the release's dropped preparation script did this;
    ``bench/hr_init.py`` measures the difference). ``init='copy-normed'`` also folds each layer's input
    RMSNorm in, at the HR features' RMS ``feature_rms`` (:func:`flexattn_jax.model.hr_feature_rms`):
    ``k_hr = diag(norm scale / feature_rms) k``. The hierarchical attention applies ``k_hr`` to the
    projector's output without that norm, so plain copies give HR keys and values at the features' scale
    (RMS 0.06 in the demo's model, against ~1 for the normed rows: the HR path starts mute).
    ``init='random'`` draws N(0, ``std``) from ``key``, the release's HF loader init. Returns a new tree;
    existing ``k_hr`` / ``v_hr`` are an error rather than silently overwritten. Jittable (``init``
    static), e.g. with ``out_shardings`` for a sharded tree. Where ``k`` / ``v`` have biases (Qwen2), ``k_hr`` /
    ``v_hr`` get them too: copied by the copy inits, zero for 'random'.
    """
    if init not in HR_INITS:
        raise ValueError(f"unknown HR projection init {init!r}; choose one of {', '.join(HR_INITS)}")
    attn = params["text"]["layers"]["attn"]
    if "k_hr" in attn or "v_hr" in attn:
        raise ValueError("params already have text/layers/attn/k_hr and v_hr")
    k, v = attn["k"]["kernel"], attn["v"]["kernel"]
    if init == "copy":
        k_hr, v_hr = jnp.array(k), jnp.array(v)
    elif init == "copy-normed":
        if feature_rms is None or not feature_rms > 0:
            raise ValueError(f"init='copy-normed' needs the HR features' RMS (feature_rms > 0), got {feature_rms}")
        fold = params["text"]["layers"]["input_norm"]["scale"][:, :, None].astype(jnp.float32) / feature_rms  # (L, D, 1)
        k_hr, v_hr = (k * fold).astype(k.dtype), (v * fold).astype(v.dtype)
    else:
        if key is None:
            raise ValueError("init='random' needs a key")
        kk, kv = jax.random.split(key)
        k_hr = (std * jax.random.normal(kk, k.shape, jnp.float32)).astype(k.dtype)
        v_hr = (std * jax.random.normal(kv, v.shape, jnp.float32)).astype(v.dtype)
    new_attn = {**attn, "k_hr": {"kernel": k_hr}, "v_hr": {"kernel": v_hr}}
    for name in ("k", "v"):
        if "bias" in attn[name]:
            bias = attn[name]["bias"]
            new_attn[f"{name}_hr"]["bias"] = jnp.zeros_like(bias) if init == "random" else jnp.array(bias)
    layers = {**params["text"]["layers"], "attn": new_attn}
    return {**params, "text": {**params["text"], "layers": layers}}
