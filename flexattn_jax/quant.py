"""Weight-only quantisation of the decoder's linears: int8 per output channel, int4 per group of inputs, NF4 per block.

What is quantised: the kernels of every decoder linear (``text/layers/attn/{q,k,v,o,k_hr,v_hr}``,
``text/layers/mlp/{gate,up,down}``: 97% of a 7B's parameters). What is not: the token embeddings, the
LM head, the norms, the projector and the CLIP tower (small, and the most sensitive to rounding).

A quantised kernel ``W`` (``(..., in, out)``) is stored as ``kernel`` (int8, or ``jnp.int4``) plus
``kernel_scale`` (fp32, ``(..., groups, out)``): ``W[g*G + j, o] ~= kernel[g*G + j, o] * scale[g, o]``
with ``G = in / groups``; int8 has one group (a scale per output channel), int4 groups of
``group_size`` inputs (128 by default, or the whole input when that does not divide it). The
symmetric scale is ``max |W| / 127`` (int8) or ``/ 7`` (int4) over the group; rounding to nearest.

NF4 (bitsandbytes' 4-bit NormalFloat with double quantisation, the release's QLoRA base format: ``--bits 4`` with
``bnb_4bit_quant_type="nf4"``, ``bnb_4bit_use_double_quant=True``): each block of :data:`NF4_BLOCK` (64) inputs of an
output channel (bitsandbytes' blocks of a torch ``(out, in)`` weight, row-major) is multiplied by the reciprocal of its
fp32 absmax and every value becomes the index (0..15, ``jnp.uint4``) of the nearest entry of :data:`NF4_CODE`. The
absmax themselves are quantised again (:func:`double_quantize`): their mean (``kernel_scale_offset``, one fp32 a
matrix) is subtracted, and in bitsandbytes' order (the torch weight's blocks, row-major) each run of :data:`DQ_BLOCK`
(256) becomes 8-bit indices (``kernel_scale``, uint8) into bitsandbytes' dynamic map :data:`DYNAMIC_CODE`, scaled by
the run's fp32 absmax (``kernel_scale_absmax``). So ``W ~= NF4_CODE[kernel] * (DYNAMIC_CODE[kernel_scale] *
kernel_scale_absmax + kernel_scale_offset)``: 4 + 8/64 + 32/16384 bits a weight. The kernel's dtype tells the modes
apart (int8, int4, uint4 = NF4).
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
DQ_BLOCK = 256  # bitsandbytes' blocksize for the absmax's 8-bit double quantisation (quantize_4bit, compress_statistics)
SCALE_LEAVES = ("kernel_scale", "kernel_scale_absmax", "kernel_scale_offset")  # the leaves beside a quantised kernel
_QMAX = {"int8": 127, "int4": 7}
_DTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4}
# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")): quantiles of N(0, 1) scaled to [-1, 1], zero exact
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``functional.create_dynamic_map()``: for exponents 1e-6 .. 1, the
    midpoints of 2**i + 1 fp32 points from 0.1 to 1 times the fp32 power of ten, both signs, then 0 and 1; sorted; the
    lowest entry is -0.99297, so -1 rounds to it). The fp32 points are torch's ``linspace``: each one ``start + i * step``
    (the first half) or ``end - (n - 1 - i) * step`` rounded once, as its fused multiply-add does."""
    data: list[float] = []
    start, end = np.float32(0.1), np.float32(1.0)
    for i in range(7):
        n = 2**i + 1
        step = np.float32((end - start) / np.float32(n - 1))
        k = np.arange(n, dtype=np.float64)
        points = np.where(k < n // 2, np.float64(start) + k * np.float64(step), np.float64(end) - (n - 1 - k) * np.float64(step))
        points = points.astype(np.float32)
        means = (points[:-1] + points[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))  # torch multiplies the fp32 means by the fp32-rounded power of ten
        data += [*(scale * means).tolist(), *(-scale * means).tolist()]
    return np.array(sorted([*data, 0.0, 1.0]), np.float32)


DYNAMIC_CODE = _dynamic_code()


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


def _nearest(code: np.ndarray, v: Float[Array, "*S"]) -> jax.Array:
    """Index of the ``code`` entry nearest to each ``v``: how many midpoints between neighbouring entries (fp32) lie
    below ``v`` (bitsandbytes' reference rule for its NF4 and dynamic maps; its CUDA kernels compare the same midpoints)."""
    mid = jnp.asarray((code[1:] + code[:-1]) / np.float32(2))
    return jnp.searchsorted(mid, v, side="left")


def _run_of(g: int, o: int) -> jax.Array:
    """``(g, o)`` index of the :data:`DQ_BLOCK` run each scale of a ``(g, o)`` scale array falls in: bitsandbytes counts
    the absmax in the torch weight's order, output channel major (``o * g + group``). Iotas, not a constant: the
    program stays small and XLA fuses the index into the lookup."""
    group = jax.lax.broadcasted_iota(jnp.int32, (g, o), 0)
    out = jax.lax.broadcasted_iota(jnp.int32, (g, o), 1)
    return (out * g + group) // DQ_BLOCK


def double_quantize(absmax: Float[Array, "*L g o"]) -> dict[str, jax.Array]:
    """bitsandbytes' ``compress_statistics``: NF4's fp32 absmax as ``kernel_scale`` (uint8 :data:`DYNAMIC_CODE` indices,
    ``(..., g, o)``), ``kernel_scale_absmax`` (fp32 ``(..., ceil(g * o / 256))``) and ``kernel_scale_offset`` (fp32
    ``(...,)``, the absmax's mean). Runs of :data:`DQ_BLOCK` follow the torch weight's order; the last run is shorter
    when 256 does not divide ``g * o`` (padded with zeros, which never raise a run's absmax, and dropped). An all-zero run
    stores absmax 0, so its scales come back as the offset exactly."""
    *lead, g, o = absmax.shape
    n = g * o
    runs = -(-n // DQ_BLOCK)
    flat = jnp.swapaxes(absmax.astype(jnp.float32), -1, -2).reshape(*lead, n)
    # the mean as torch takes it, the fp32 sum divided by the count (XLA would multiply by a constant's reciprocal)
    offset = jnp.sum(flat, axis=-1) / jax.lax.optimization_barrier(jnp.float32(n))
    centred = flat - offset[..., None]
    padded = jnp.pad(centred, [(0, 0)] * len(lead) + [(0, runs * DQ_BLOCK - n)]).reshape(*lead, runs, DQ_BLOCK)
    amax = jnp.max(jnp.abs(padded), axis=-1)
    # times the reciprocal, as bitsandbytes
    idx = _nearest(DYNAMIC_CODE, padded * (1.0 / jnp.maximum(amax, 1e-38))[..., None]).astype(jnp.uint8)
    codes = jnp.swapaxes(idx.reshape(*lead, runs * DQ_BLOCK)[..., :n].reshape(*lead, o, g), -1, -2)
    return {"kernel_scale": codes, "kernel_scale_absmax": amax, "kernel_scale_offset": offset}


def dequantize_scale(codes: jax.Array, amax: Float[Array, "*L r"], offset: Float[Array, "*L"]) -> Float[Array, "*L g o"]:
    """The fp32 absmax :func:`double_quantize` stored: ``DYNAMIC_CODE[codes] * amax[run] + offset``."""
    g, o = codes.shape[-2:]
    run = jnp.take(amax, _run_of(g, o), axis=-1)
    return jnp.asarray(DYNAMIC_CODE)[codes.astype(jnp.int32)] * run + offset[..., None, None]


def quantize_kernel(w: Float[Array, "*L i o"], mode: str, group_size: int | None = None) -> dict[str, jax.Array]:
    """The leaves a quantised kernel ``(..., in, out)`` is stored as: ``kernel`` and its :data:`SCALE_LEAVES` (NF4 all
    three, int8/int4 ``kernel_scale`` only; see the module docstring)."""
    check_mode(mode)
    *lead, d_in, d_out = w.shape
    g = groups_for(d_in, mode, group_size)
    x = jnp.asarray(w, jnp.float32).reshape(*lead, g, d_in // g, d_out)
    absmax = jnp.max(jnp.abs(x), axis=-2)
    if mode == "nf4":  # bitsandbytes: x * (1 / absmax), then how many midpoints between neighbouring codes lie below it
        inv = 1.0 / jnp.maximum(absmax, 1e-38)
        q = _nearest(NF4_CODE, x * inv[..., None, :]).reshape(*lead, d_in, d_out)
        return {"kernel": q.astype(jnp.uint4), **double_quantize(absmax)}
    scale = absmax / _QMAX[mode]
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None, :]), -_QMAX[mode], _QMAX[mode]).reshape(*lead, d_in, d_out)
    return {"kernel": q.astype(_DTYPE[mode]), "kernel_scale": scale.astype(jnp.float32)}


def dequantize(leaves: dict[str, jax.Array], dtype: jnp.dtype = jnp.float32) -> Float[Array, "*L i o"]:
    """The kernel :func:`quantize_kernel`'s ``leaves`` stand for, in ``dtype``: ``q * scale`` (int8/int4), NF4's
    ``NF4_CODE[q] * scale`` with the scale from :func:`dequantize_scale` (groups along the input axis)."""
    q, scale = leaves["kernel"], leaves["kernel_scale"]
    *lead, d_in, d_out = q.shape
    if q.dtype == jnp.uint4:
        values = jnp.asarray(NF4_CODE)[q.astype(jnp.int32)]
        scale = dequantize_scale(scale, leaves["kernel_scale_absmax"], leaves["kernel_scale_offset"])
    else:
        values = q.astype(jnp.float32)
    g = scale.shape[-2]
    w = values.reshape(*lead, g, d_in // g, d_out) * scale[..., :, None, :].astype(jnp.float32)
    return w.reshape(*lead, d_in, d_out).astype(dtype)


def is_scale(path: str) -> bool:
    """Whether ``path`` (``flatten``'s slash-joined name) is one of a quantised kernel's :data:`SCALE_LEAVES`."""
    return path.rsplit("/", 1)[-1] in SCALE_LEAVES


def is_quantized(params: PyTree) -> bool:
    """Whether any kernel of ``params`` is stored quantised."""
    return any(name.endswith("/kernel_scale") for name in flatten(params))


def quantize_params(params: PyTree, mode: str, group_size: int | None = None, targets: str = QUANT_TARGETS) -> PyTree:
    """The tree with every decoder linear's kernel quantised (``kernel`` + its scale leaves); the rest unchanged."""
    check_mode(mode)
    rx = re.compile(targets)
    flat = flatten(params)
    if any(is_scale(name) for name in flat):
        raise ValueError("the parameters are quantised already")
    out = {}
    for name, x in flat.items():
        if rx.search(name):
            module = name[: -len("kernel")]
            out.update({module + leaf: v for leaf, v in quantize_kernel(x, mode, group_size).items()})
        else:
            out[name] = x
    return unflatten(out)


def dequantize_params(params: PyTree, dtype: jnp.dtype = jnp.float32) -> PyTree:
    """The inverse of :func:`quantize_params` up to rounding: plain ``dtype`` kernels."""
    flat = flatten(params)
    out = {}
    for name, x in flat.items():
        if is_scale(name):
            continue
        module = name[: -len("kernel")]
        if name.endswith("/kernel") and module + "kernel_scale" in flat:
            out[name] = dequantize({leaf: flat[module + leaf] for leaf in ("kernel", *SCALE_LEAVES) if module + leaf in flat}, dtype)
        else:
            out[name] = x
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
    "DQ_BLOCK", "DYNAMIC_CODE", "GROUP_SIZE", "MODES", "NF4_BLOCK", "NF4_CODE", "QUANT_TARGETS", "SCALE_LEAVES", "check_mode",
    "dequantize", "dequantize_params", "dequantize_scale", "double_quantize", "groups_for", "is_quantized", "is_scale", "nbytes",
    "quant_mode", "quantize_kernel", "quantize_params", "quantized_abstract",
    "storable", "stored_dtype", "from_stored",
]
