"""Attention math, in one place: the main (ordinary) part, the high-resolution part, the LSE merge.

A hierarchical layer never builds an N x (N+M) matrix. Its output for a *select* row is
softmax over [N ordinary keys ; K high-resolution keys], which equals merging two softmaxes by
their log-sum-exp (the split-KV / cascade trick of FlashDecoding and ring attention):

    o = (e^{lse_main} o_main + e^{lse_hr} o_hr) / (e^{lse_main} + e^{lse_hr})

The main part is ordinary causal attention over N keys for all rows; the HR part is a small dense
einsum for the R select rows over their K gathered HR keys. Softmax statistics are fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

NEG_INF = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def attention_with_lse(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    mask: Bool[Array, "B T S"] | None,
) -> tuple[Float[Array, "B T H d"], Float[Array, "B T H"]]:
    """Softmax attention with GQA, returning the output and the fp32 log-sum-exp per row and head.

    The LSE is differentiable (``jax.nn.dot_product_attention`` stops its gradient), which the
    training path needs because the merge weights depend on it.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg = _grouped(q, hkv)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype), lse.reshape(b, h, t).transpose(0, 2, 1)


def hr_attention(
    q: Float[Array, "B R H d"],
    k: Float[Array, "B *Rk K Hkv d"],
    v: Float[Array, "B *Rk K Hkv d"],
    valid: Bool[Array, "B R K"],
) -> tuple[Float[Array, "B R H d"], Float[Array, "B R H"]]:
    """Dense attention of R select rows over their HR keys.

    ``k``/``v`` are either shared by all rows, ``(B, K, Hkv, d)`` (all M HR tokens, the mask as a
    bias), or per row, ``(B, R, K, Hkv, d)`` (each row's K gathered tokens). Rows with no valid key
    get ``lse = NEG_INF`` so that the merge ignores them.
    """
    b, r, h, d = q.shape
    hkv = k.shape[-2]
    qg = _grouped(q, hkv)
    spec = "brkgd,bskd->bkgrs" if k.ndim == 4 else "brkgd,brskd->bkgrs"
    logits = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(valid[:, None, None], logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out_spec = "bkgrs,bskd->brkgd" if v.ndim == 4 else "bkgrs,brskd->brkgd"
    out = jnp.einsum(out_spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(jnp.any(valid, axis=-1)[:, None, None], lse, NEG_INF)
    return out.reshape(b, r, h, d), lse.reshape(b, h, r).transpose(0, 2, 1)


def merge_by_lse(
    o1: Float[Array, "B R H d"], lse1: Float[Array, "B R H"], o2: Float[Array, "B R H d"], lse2: Float[Array, "B R H"]
) -> Float[Array, "B R H d"]:
    """Combine two softmax-attention outputs over disjoint key sets into the joint softmax output."""
    m = jnp.maximum(lse1, lse2)
    w1 = jnp.exp(lse1 - m)[..., None]
    w2 = jnp.exp(lse2 - m)[..., None]
    return (w1 * o1.astype(jnp.float32) + w2 * o2.astype(jnp.float32)) / (w1 + w2)


def row_probabilities(
    q: Float[Array, "B R H d"], k: Float[Array, "B S Hkv d"], lse: Float[Array, "B R H"]
) -> Float[Array, "B R H S"]:
    """Softmax probabilities of R rows over the keys ``k`` (a subset of the row's keys), from the LSE.

    Exact because ``lse`` is the normaliser of the main pass over the same row's keys: this is
    how the selection map is read without materialising the N x N probabilities.
    """
    hkv, d = k.shape[2], q.shape[-1]
    b, r, h, _ = q.shape
    qg = _grouped(q, hkv)
    logits = jnp.einsum("brkgd,bskd->bkgrs", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    lse_g = lse.transpose(0, 2, 1).reshape(b, hkv, h // hkv, r)
    probs = jnp.exp(logits - lse_g[..., None])
    return probs.reshape(b, h, r, -1).transpose(0, 2, 1, 3)
