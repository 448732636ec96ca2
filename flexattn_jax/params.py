"""The parameter tree: its layout, shapes, random initialisation and abstract (shape-only) form.

Parameters are a plain nested dict of arrays (what the converter writes and orbax saves)::

    vision/
      patch_embed/kernel        (p, p, C, Dv)     conv, HWIO, no bias
      class_embed               (Dv,)
      pos_embed/embedding       (P + 1, Dv)       P = (image_size / p)^2
      pre_norm/{scale,bias}     (Dv,)
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

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax.config import ModelConfig

Params = dict  # nested dict of arrays, layout above


def param_shapes(cfg: ModelConfig) -> dict:
    """The tree of shapes (tuples) for ``cfg``: the single source of the layout above."""
    v, t = cfg.vision, cfg.text
    dv, fv, lv, p = v.hidden_size, v.intermediate_size, v.num_layers, v.patch_size
    d, f, lt = t.hidden_size, t.intermediate_size, t.num_layers
    hq, hkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim

    def dense(n_in, n_out, stack=None, bias=True):
        pre = () if stack is None else (stack,)
        out = {"kernel": pre + (n_in, n_out)}
        if bias:
            out["bias"] = pre + (n_out,)
        return out

    def ln(n, stack=None, bias=True):
        pre = () if stack is None else (stack,)
        return {"scale": pre + (n,), "bias": pre + (n,)} if bias else {"scale": pre + (n,)}

    vision = {
        "patch_embed": {"kernel": (p, p, v.num_channels, dv)},
        "class_embed": (dv,),
        "pos_embed": {"embedding": (v.num_patches + 1, dv)},
        "pre_norm": ln(dv),
        "layers": {
            "norm1": ln(dv, lv),
            "attn": {name: dense(dv, dv, lv) for name in ("q", "k", "v", "o")},
            "norm2": ln(dv, lv),
            "mlp": {"fc1": dense(dv, fv, lv), "fc2": dense(fv, dv, lv)},
        },
        "post_norm": ln(dv),
    }
    pb = cfg.projector.bias
    projector = {"linear_1": dense(dv, d, bias=pb)}
    if cfg.projector.type == "mlp2x_gelu":
        projector["linear_2"] = dense(d, d, bias=pb)
    attn = {
        "q": dense(d, hq, lt, bias=False),
        "k": dense(d, hkv, lt, bias=False),
        "v": dense(d, hkv, lt, bias=False),
        "o": dense(hq, d, lt, bias=False),
    }
    if cfg.flex.enabled:
        attn["k_hr"] = dense(d, hkv, lt, bias=False)
        attn["v_hr"] = dense(d, hkv, lt, bias=False)
    text = {
        "embed": {"embedding": (t.vocab_size, d)},
        "layers": {
            "input_norm": ln(d, lt, bias=False),
            "attn": attn,
            "post_norm": ln(d, lt, bias=False),
            "mlp": {"gate": dense(d, f, lt, bias=False), "up": dense(d, f, lt, bias=False), "down": dense(f, d, lt, bias=False)},
        },
        "final_norm": ln(d, bias=False),
    }
    if not t.tie_word_embeddings:
        text["lm_head"] = dense(d, t.vocab_size, bias=False)
    return {"vision": vision, "projector": projector, "text": text}


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` leaves in ``cfg.param_dtype``: the converter's and restore's target."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(cfg), is_leaf=_is_shape)


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(std) weights, unit norm scales, zero biases), for tests and the demo."""
    shapes = param_shapes(cfg)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(paths))
    dtype = jnp.dtype(cfg.param_dtype)
    leaves = []
    for (path, shape), k in zip(paths, keys):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith("scale"):
            leaves.append(jnp.ones(shape, dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


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
