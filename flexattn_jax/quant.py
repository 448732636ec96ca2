"""Weight-only quantisation of the decoder's linears: int8 per output channel, int4 per group of inputs, NF4 per block.

What is quantised: the kernels of every decoder linear (``text/layers/attn/{q,k,v,o,k_hr,v_hr}``,
``text/layers/mlp/{gate,up,down}``: 97% of a 7B's parameters). What is not: the token embeddings, the
LM head, the norms, the projector and the CLIP tower (small, and the most sensitive to rounding).

A quantised kernel ``W`` (``(..., in, out)``) is stored as ``kernel`` (int8, or ``jnp.int4``) plus
``kernel_scale`` (fp32, ``(..., groups, out)``): ``W[g*G + j, o] ~= kernel[g*G + j, o] * scale[g, o]``
with ``G = in / groups``; int8 has one group (a scale per output channel), int4 groups of
``group_size`` inputs (128 by default, or the whole input when that does not divide it). The
symmetric scale is ``max |W| / 127`` (int8) or ``/ 7`` (int4) over the group; rounding to nearest.

NF4 (bitsandbytes' 4-bit NormalFloat, QLoRA's base format): each block of :data:`NF4_BLOCK` (64) inputs of an output
channel (bitsandbytes' blocks of a torch ``(out, in)`` weight, row-major) is divided by its absmax and every value
becomes the index (0..15, ``jnp.uint4``) of the nearest entry of :data:`NF4_CODE`; ``kernel_scale`` holds the
blocks' fp32 absmax, and ``W ~= NF4_CODE[kernel] * scale``. The kernel's dtype tells the modes apart (int8, int4,
uint4 = NF4). bitsandbytes' double quantisation (the absmax themselves 8-bit per 256) is not done: the fp32 absmax
cost 0.5 bit per weight against its 0.127.
:class:`flexattn_jax.text.Linear` dequantises in the matmul's operand (convert and multiply, which
XLA fuses into the dot) whenever a ``kernel_scale`` sits next to the kernel.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from flexattn_jax.params import flatten, unflatten

MODES = ("int8", "int4", "nf4")
QUANT_TARGETS = r"^text/layers/(attn/(q|k|v|o|k_hr|v_hr)|mlp/(gate|up|down))/kernel$"
GROUP_SIZE = 128
NF4_BLOCK = 64  # bitsandbytes' (and the release's QLoRA) 4-bit blocksize
_QMAX = {"int8": 127, "int4": 7}
_DTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}
# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")): quantiles of N(0, 1) scaled to [-1, 1], zero exact
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def check_mode(mode: str) -> str:
    """``mode`` if it is a quantisation mode, else a one-line ValueError."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def groups_for(d_in: int, mode: str, group_size: int | None = None) -> int:
    """Number of scale groups along the input axis: 1 for int8, ``d_in / group_size`` for int4 (``group_size`` default
    :data:`GROUP_SIZE`) and NF4 (default :data:`NF4_BLOCK`); 1 where the group size does not divide ``d_in``."""
    size = group_size or (NF4_BLOCK if mode == "nf4" else GROUP_SIZE)
    if mode == "int8" or d_in % size or d_in <= size:
        return 1
    return d_in // size


def quantize_kernel(w: Float[Array, "*L i o"], mode: str, group_size: int | None = None) -> tuple[jax.Array, Float[Array, "*L g o"]]:
    """``(q, scale)`` of a kernel ``(..., in, out)`` (see the module docstring)."""
    check_mode(mode)
    *lead, d_in, d_out = w.shape
    g = groups_for(d_in, mode, group_size)
    x = jnp.asarray(w, jnp.float32).reshape(*lead, g, d_in // g, d_out)
    absmax = jnp.max(jnp.abs(x), axis=-2)
    if mode == "nf4":  # the nearest code: how many midpoints between neighbouring codes lie below x / absmax
        scale = jnp.where(absmax > 0, absmax, 1.0)
        mid = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
        q = jnp.searchsorted(mid, x / scale[..., None, :], side="left").reshape(*lead, d_in, d_out)
        return q.astype(jnp.uint4), scale
    scale = absmax / _QMAX[mode]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None, :]), -_QMAX[mode], _QMAX[mode]).reshape(*lead, d_in, d_out)
    return q.astype(_DTYPE[mode]), scale.astype(jnp.float32)


def dequantize(q: jax.Array, scale: Float[Array, "*L g o"], dtype: jnp.dtype = jnp.float32) -> Float[Array, "*L i o"]:
    """The kernel ``q * scale`` (``NF4_CODE[q] * scale`` for NF4's uint4 codes; groups along the input axis) in ``dtype``."""
    *lead, d_in, d_out = q.shape
    g = scale.shape[-2]
    values = jnp.asarray(NF4_CODE)[q.astype(jnp.int32)] if q.dtype == jnp.uint4 else q.astype(jnp.float32)
    w = values.reshape(*lead, g, d_in // g, d_out) * scale[..., :, None, :].astype(jnp.float32)
    return w.reshape(*lead, d_in, d_out).astype(dtype)


def is_quantized(params: PyTree) -> bool:
    """Whether any kernel of ``params`` is stored quantised."""
    return any(name.endswith("/kernel_scale") for name in flatten(params))


def quantize_params(params: PyTree, mode: str, group_size: int | None = None, targets: str = QUANT_TARGETS) -> PyTree:
    """The tree with every decoder linear's kernel quantised (``kernel`` + ``kernel_scale``); the rest unchanged."""
    check_mode(mode)
    rx = re.compile(targets)
    flat = flatten(params)
    if any(name.endswith("/kernel_scale") for name in flat):
        raise ValueError("the parameters are quantised already")
    out = {}
    for name, x in flat.items():
        if rx.search(name):
            q, s = quantize_kernel(x, mode, group_size)
            out[name], out[name + "_scale"] = q, s
        else:
            out[name] = x
    return unflatten(out)


def dequantize_params(params: PyTree, dtype: jnp.dtype = jnp.float32) -> PyTree:
    """The inverse of :func:`quantize_params` up to rounding: plain ``dtype`` kernels."""
    flat = flatten(params)
    out = {}
    for name, x in flat.items():
        if name.endswith("/kernel_scale"):
            continue
        scale = flat.get(name + "_scale")
        out[name] = x if scale is None else dequantize(x, scale, dtype)
    return unflatten(out)


def quantized_abstract(abstract: PyTree, mode: str, group_size: int | None = None, targets: str = QUANT_TARGETS) -> PyTree:
    """``jax.ShapeDtypeStruct`` tree of :func:`quantize_params`'s result for an abstract (or concrete) tree."""
    return jax.eval_shape(lambda p: quantize_params(p, mode, group_size, targets), abstract)


def quant_mode(params: PyTree) -> str | None:
    """``'int8'``, ``'int4'``, ``'nf4'`` or None (not quantised), from the kernels' dtypes."""
    flat = flatten(params)
    for name in flat:
        if name.endswith("/kernel_scale"):
            dtype = jnp.dtype(flat[name[: -len("_scale")]].dtype)
            return next(m for m, d in _DTYPE.items() if jnp.dtype(d) == dtype)
    return None


def storable(params: PyTree) -> PyTree:
    """The tree as a model directory stores it: NF4's uint4 codes (which TensorStore cannot write) as int4 ``code - 8``."""
    return jax.tree.map(lambda x: (x.astype(jnp.int8) - 8).astype(jnp.int4) if x.dtype == jnp.uint4 else x, params)


def stored_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype :func:`storable` writes a leaf of ``dtype`` as."""
    return jnp.dtype(jnp.int4) if dtype == jnp.uint4 else jnp.dtype(dtype)


def from_stored(stored: PyTree, abstract: PyTree) -> PyTree:
    """The inverse of :func:`storable`: leaves whose ``abstract`` dtype is uint4 come back as NF4 codes."""
    return jax.tree.map(lambda x, a: (x.astype(jnp.int8) + 8).astype(jnp.uint4) if a.dtype == jnp.uint4 else x, stored, abstract)


def nbytes(params: PyTree) -> int:
    """Bytes the tree's arrays take (int4 and NF4's uint4 counted at half a byte)."""
    total = 0
    for x in jax.tree.leaves(params):
        n = int(np.prod(x.shape))
        total += n // 2 if x.dtype in (jnp.int4, jnp.uint4) else n * jnp.dtype(x.dtype).itemsize
    return total


__all__ = [
    "GROUP_SIZE", "MODES", "NF4_BLOCK", "NF4_CODE", "QUANT_TARGETS", "check_mode", "dequantize", "dequantize_params", "groups_for",
    "is_quantized", "nbytes", "quant_mode", "quantize_kernel", "quantize_params", "quantized_abstract",
    "storable", "stored_dtype", "from_stored",
]
