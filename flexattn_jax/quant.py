"""Weight-only quantisation of the decoder's linears: int8 per output channel, int4 per group of inputs.

What is quantised: the kernels of every decoder linear (``text/layers/attn/{q,k,v,o,k_hr,v_hr}``,
``text/layers/mlp/{gate,up,down}``: 97% of a 7B's parameters). What is not: the token embeddings, the
LM head, the norms, the projector and the CLIP tower (small, and the most sensitive to rounding).

A quantised kernel ``W`` (``(..., in, out)``) is stored as ``kernel`` (int8, or ``jnp.int4``) plus
``kernel_scale`` (fp32, ``(..., groups, out)``): ``W[g*G + j, o] ~= kernel[g*G + j, o] * scale[g, o]``
with ``G = in / groups``; int8 has one group (a scale per output channel), int4 groups of
``group_size`` inputs (128 by default, or the whole input when that does not divide it). The
symmetric scale is ``max |W| / 127`` (int8) or ``/ 7`` (int4) over the group; rounding to nearest.
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

MODES = ("int8", "int4")
QUANT_TARGETS = r"^text/layers/(attn/(q|k|v|o|k_hr|v_hr)|mlp/(gate|up|down))/kernel$"
GROUP_SIZE = 128
_QMAX = {"int8": 127, "int4": 7}
_DTYPE = {"int8": jnp.int8, "int4": jnp.int4}


def check_mode(mode: str) -> str:
    """``mode`` if it is a quantisation mode, else a one-line ValueError."""
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def groups_for(d_in: int, mode: str, group_size: int = GROUP_SIZE) -> int:
    """Number of scale groups along the input axis: 1 for int8, ``d_in / group_size`` for int4 (1 if it does not divide)."""
    if mode == "int8" or d_in % group_size or d_in <= group_size:
        return 1
    return d_in // group_size


def quantize_kernel(w: Float[Array, "*L i o"], mode: str, group_size: int = GROUP_SIZE) -> tuple[jax.Array, Float[Array, "*L g o"]]:
    """``(q, scale)`` of a kernel ``(..., in, out)`` (see the module docstring)."""
    check_mode(mode)
    *lead, d_in, d_out = w.shape
    g = groups_for(d_in, mode, group_size)
    x = jnp.asarray(w, jnp.float32).reshape(*lead, g, d_in // g, d_out)
    scale = jnp.max(jnp.abs(x), axis=-2) / _QMAX[mode]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None, :]), -_QMAX[mode], _QMAX[mode]).reshape(*lead, d_in, d_out)
    return q.astype(_DTYPE[mode]), scale.astype(jnp.float32)


def dequantize(q: jax.Array, scale: Float[Array, "*L g o"], dtype: jnp.dtype = jnp.float32) -> Float[Array, "*L i o"]:
    """The kernel ``q * scale`` (groups along the input axis) in ``dtype``."""
    *lead, d_in, d_out = q.shape
    g = scale.shape[-2]
    w = q.astype(jnp.float32).reshape(*lead, g, d_in // g, d_out) * scale[..., :, None, :].astype(jnp.float32)
    return w.reshape(*lead, d_in, d_out).astype(dtype)


def is_quantized(params: PyTree) -> bool:
    """Whether any kernel of ``params`` is stored quantised."""
    return any(name.endswith("/kernel_scale") for name in flatten(params))


def quantize_params(params: PyTree, mode: str, group_size: int = GROUP_SIZE, targets: str = QUANT_TARGETS) -> PyTree:
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


def quantized_abstract(abstract: PyTree, mode: str, group_size: int = GROUP_SIZE, targets: str = QUANT_TARGETS) -> PyTree:
    """``jax.ShapeDtypeStruct`` tree of :func:`quantize_params`'s result for an abstract (or concrete) tree."""
    return jax.eval_shape(lambda p: quantize_params(p, mode, group_size, targets), abstract)


def quant_mode(params: PyTree) -> str | None:
    """``'int8'``, ``'int4'`` or None (not quantised), from the kernels' dtypes."""
    flat = flatten(params)
    for name in flat:
        if name.endswith("/kernel_scale"):
            return "int4" if flat[name[: -len("_scale")]].dtype == jnp.int4 else "int8"
    return None


def nbytes(params: PyTree) -> int:
    """Bytes the tree's arrays take (int4 counted at half a byte)."""
    total = 0
    for x in jax.tree.leaves(params):
        n = int(np.prod(x.shape))
        total += n // 2 if x.dtype == jnp.int4 else n * jnp.dtype(x.dtype).itemsize
    return total


__all__ = [
    "GROUP_SIZE", "MODES", "QUANT_TARGETS", "check_mode", "dequantize", "dequantize_params", "groups_for", "is_quantized",
    "nbytes", "quant_mode", "quantize_kernel", "quantize_params", "quantized_abstract",
]
