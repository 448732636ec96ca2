"""Attention math, in one place: the main (ordinary) part, the high-resolution part, the LSE merge.

A hierarchical layer never builds an N x (N+M) matrix. Its output for a *select* row is
softmax over [N ordinary keys ; K high-resolution keys], which equals merging two softmaxes by
their log-sum-exp (the split-KV / cascade trick of FlashDecoding and ring attention):

    o = (e^{lse_main} o_main + e^{lse_hr} o_hr) / (e^{lse_main} + e^{lse_hr})

The main part is ordinary causal attention over N keys for all rows; the HR part is the R select
rows over their K HR keys (:func:`hr_attention`: a dense einsum, or by key blocks when the logits
would be large, :func:`hr_chunked`). Softmax statistics are fp32.

The main part of all rows goes through one dispatcher, :func:`attention` (``ModelConfig.attention_impl``):
``xla`` (the dense einsum, the reference), ``xla_chunked`` (online softmax over key blocks, a
flash-style custom VJP in pure JAX: memory O(T x block)), ``cudnn`` (``jax.nn.dot_product_attention``
on GPU), ``splash`` (the TPU Pallas kernel; interpret mode elsewhere), ``splash_hr`` (splash, and the HR
part of the select rows by the Pallas HR kernel, :func:`hr_kernel_attention`) and ``auto``. No fused kernel
returns a differentiable log-sum-exp, so the decoder recomputes the select rows
(:func:`rows_attention_with_lse`: dense, or by key blocks with a differentiable LSE) and
overwrites them: exact and differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax.config import ATTENTION_IMPLS
from flexattn_jax.sharding import constrain_logical, logical_to_spec

log = logging.getLogger(__name__)

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
    *,
    chunked: bool = False,
) -> tuple[Float[Array, "B R H d"], Float[Array, "B R H"]]:
    """Attention of R select rows over their HR keys: output and differentiable fp32 LSE.

    ``k``/``v`` are either shared by all rows, ``(B, K, Hkv, d)`` (all M HR tokens, the selection a
    (B, R, M) mask), or per row, ``(B, R, K, Hkv, d)`` (each row's K gathered tokens). Rows with no
    valid key get ``lse = NEG_INF`` (the merge then gives them weight 0) and output 0.

    ``chunked`` (shared keys only; :func:`hr_chunked` decides): an online softmax over key blocks
    (:func:`chunked_attention_with_lse` with the per-row mask), memory O(R x block) instead of the
    dense (B, H, R, K) fp32 logits, which at 7B training (R = 2048, K = M = 5184) are the largest
    temporaries of the step; the output is then in ``q``'s dtype (dense: fp32). Otherwise the dense einsum.
    """
    b, r, h, d = q.shape
    has_key = jnp.any(valid, axis=-1)[..., None]  # (B, R, 1)
    if chunked:
        if k.ndim != 4:
            raise ValueError(f"hr_attention(chunked=True) takes keys shared by the rows, (B, K, Hkv, d), not {k.shape}")
        out, lse = chunked_attention_with_lse(q, k, v, valid, None)
        return jnp.where(has_key[..., None], out, 0), jnp.where(has_key, lse, NEG_INF)
    hkv = k.shape[-2]
    qg = _grouped(q, hkv)
    spec = "brkgd,bskd->bkgrs" if k.ndim == 4 else "brkgd,brskd->bkgrs"
    logits = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(valid[:, None, None], logits, NEG_INF)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out_spec = "bkgrs,bskd->brkgd" if v.ndim == 4 else "bkgrs,brskd->brkgd"
    out = jnp.einsum(out_spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = jnp.where(has_key[..., None], out.reshape(b, r, h, d), 0)
    return out, jnp.where(has_key, lse.reshape(b, h, r).transpose(0, 2, 1), NEG_INF)


def hr_chunked(impl: str, num_rows: int, num_keys: int) -> bool:
    """Whether the HR part of ``num_rows`` select rows over ``num_keys`` shared HR keys runs by key blocks.

    The rule: ``attention_impl`` (as configured) ``xla`` never (the dense reference); ``xla_chunked``
    always; any other (``auto``, ``cudnn``, ``splash``: no fused kernel takes the HR part's per-row
    mask) when the dense logits would be large, i.e. more than one row and at least
    :data:`AUTO_CHUNK_MIN_KEYS` keys (the main part's threshold; one row, decode, stays dense).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: use one of {IMPLS}")
    if impl in ("xla", "xla_chunked"):
        return impl == "xla_chunked"
    return num_rows > 1 and num_keys >= AUTO_CHUNK_MIN_KEYS


def hr_kernel(impl: str, num_rows: int) -> bool:
    """Whether the HR part of ``num_rows`` select rows over the shared HR keys runs by the Pallas kernel
    (:func:`hr_kernel_attention`): ``attention_impl='splash_hr'`` and more than one row (one row, decode, stays dense)."""
    return impl == "splash_hr" and num_rows > 1


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


# ---- the dispatcher over attention implementations ---------------------------------------------

IMPLS = ATTENTION_IMPLS
CHUNK = 128  # key block of 'xla_chunked'
AUTO_CHUNK_MIN_KEYS = 1024  # 'auto' without a fused kernel: dense below this many keys, chunked from it
SPLASH_BLOCK = 128  # splash's q / kv block; sequences are padded to a multiple of it


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key_valid", "start"], meta_fields=["static_start"])
@dataclasses.dataclass(frozen=True)
class CausalPadding:
    """The decoder's mask, structured: row t (cache slot ``start + t``) sees valid key slots <= its own.

    ``static_start`` is ``start`` as a Python int when it is known at trace time (no cache: 0), which
    a kernel with a static causal offset (splash) needs for more than one row; it is pytree metadata,
    so it stays static through ``jit``, ``scan`` and ``checkpoint``.
    """

    key_valid: Bool[Array, "B S"]
    start: Int[Array, ""]
    static_start: int | None = None

    def dense(self, num_rows: int) -> Bool[Array, "B T S"]:
        """The (B, T, S) boolean mask."""
        return self.rows(jnp.arange(num_rows)[None])

    def rows(self, rows: Int[Array, "B R"]) -> Bool[Array, "B R S"]:
        """The mask of the given rows only (the select rows' recompute)."""
        s = self.key_valid.shape[1]
        return self.key_valid[:, None, :] & (jnp.arange(s)[None, None, :] <= (self.start + rows)[..., None])

    def has_key(self, num_rows: int) -> Bool[Array, "B T"]:
        """Rows that see at least one valid key (the others are padding rows)."""
        seen = jnp.cumsum(self.key_valid.astype(jnp.int32), axis=1)
        last = jnp.clip(self.start + jnp.arange(num_rows), 0, self.key_valid.shape[1] - 1)
        return seen[:, last] > 0


def target_platform() -> str:
    """The platform (``cpu``, ``gpu``, ``tpu``) that the program being traced is compiled for.

    It is the platform of the ambient mesh's devices (``jax.set_mesh``; compile-only TPU or GPU
    devices included), else ``jax.default_backend()``. Kernel choices read this, never the default
    backend: a CPU host compiling for a TPU topology must lower the real Mosaic kernels.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


@functools.cache
def _log_once(message: str, level: int) -> None:
    log.log(level, message)


# Where 'auto' may pick a fused kernel: the cases a test or a deviceless compile has lowered (tests/test_aot_tpu.py
# compiles splash for a TPU topology and cuDNN for an H100/H200 description, both at head dim 128). Asked for by name,
# a kernel takes any head dim it supports.
AUTO_KERNEL_HEAD_DIMS = (128,)


def require_platform(impl: str, platform: str) -> None:
    """Raise ValueError if ``impl`` cannot run on ``platform`` at all (cuDNN off a GPU): the one rule, checked by
    :func:`resolve_impl` at trace time and by the commands before anything is loaded."""
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU, and the backend here is {platform!r}: "
                         "use --set attention_impl=auto (or xla, xla_chunked)")


def resolve_impl(
    impl: str, *, backend: str, dtype, head_dim: int, num_rows: int, num_keys: int, static_start: int | None
) -> tuple[str, str]:
    """The implementation that runs for ``impl`` on ``backend`` at these shapes, and why (empty if as asked).

    ``auto``: on GPU cuDNN, on TPU splash, each only for the cases it has been exercised on
    (:data:`AUTO_KERNEL_HEAD_DIMS`, many rows from cache slot 0 for cuDNN, a static causal offset for
    splash; cuDNN in bf16/fp16); otherwise the XLA paths, dense below :data:`AUTO_CHUNK_MIN_KEYS`
    keys or for one row, chunked above. An explicit kernel that cannot take this call falls back the
    same way, with the reason. ``backend`` is the target's platform (:func:`target_platform`).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: use one of {IMPLS}")
    if impl in ("xla", "xla_chunked"):
        return impl, ""
    impl = "splash" if impl == "splash_hr" else impl  # its main part is splash (the HR part: hr_kernel)
    require_platform(impl, backend)
    dense = num_rows == 1 or num_keys < AUTO_CHUNK_MIN_KEYS
    if impl == "auto" and num_rows == 1:
        return "xla", ""  # decode: one row against the cache is O(S) dense; a kernel buys nothing
    plain = "xla" if dense else "xla_chunked"
    why = f"dense below {AUTO_CHUNK_MIN_KEYS} keys" if dense else f"chunked from {AUTO_CHUNK_MIN_KEYS} keys"
    dtype = jnp.dtype(dtype)
    want = impl if impl != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(backend)
    if want is None:
        return plain, f"attention_impl='auto' on {backend}: no fused kernel (cudnn needs a GPU, splash a TPU); using {plain!r} ({why})"
    if impl == "auto" and head_dim not in AUTO_KERNEL_HEAD_DIMS:
        return plain, (f"attention_impl='auto': {want} has been compiled here only at head dims {AUTO_KERNEL_HEAD_DIMS}, "
                       f"not {head_dim}; using {plain!r} (ask for {want!r} by name to use it anyway)")
    if want == "cudnn":
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return plain, f"attention_impl={impl!r}: cuDNN takes bf16/fp16, not {dtype}; using {plain!r}"
        if head_dim % 8 or head_dim > 256:
            return plain, f"attention_impl={impl!r}: cuDNN needs a head dim, a multiple of 8, <= 256, not {head_dim}; using {plain!r}"
        if static_start != 0:
            return plain, (f"attention_impl={impl!r}: cuDNN's causal mask starts at key slot 0; rows at a cache offset "
                           f"(cached prefill, decode) cannot be expressed; using {plain!r}")
        return "cudnn", ""
    if num_rows > 1 and static_start is None:
        return plain, f"attention_impl={impl!r}: splash needs a static causal offset for {num_rows} rows (cached prefill); using {plain!r}"
    return "splash", ""


def choose_impl(impl: str, q: Float[Array, "B T H d"], k: Float[Array, "B S Hkv d"], mask: CausalPadding) -> str:
    """:func:`resolve_impl` for this call on the target platform (:func:`target_platform`); a fallback's
    reason is logged once (info for ``auto``, a warning for a kernel asked for by name)."""
    chosen, reason = resolve_impl(
        impl, backend=target_platform(), dtype=q.dtype, head_dim=q.shape[-1], num_rows=q.shape[1], num_keys=k.shape[1],
        static_start=mask.static_start,
    )
    if reason:  # 'auto' choosing is expected (info); a kernel asked for by name falling back is a warning
        _log_once(reason, logging.INFO if impl == "auto" else logging.WARNING)
    return chosen


def attention(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    mask: CausalPadding,
    *,
    impl: str = "xla",
) -> Float[Array, "B T H d"]:
    """Causal + padding softmax attention (GQA) by the implementation ``impl`` (see :func:`resolve_impl`).

    Every implementation computes the same function; rows that see no valid key (padding rows)
    are whatever the implementation gives (finite), and nothing downstream reads them.
    """
    t = q.shape[1]
    chosen = choose_impl(impl, q, k, mask)
    plain = lambda: (attention_with_lse(q, k, v, mask.dense(t))[0] if k.shape[1] < AUTO_CHUNK_MIN_KEYS
                     else chunked_attention(q, k, v, mask.key_valid, mask.start))
    if chosen == "xla":
        return attention_with_lse(q, k, v, mask.dense(t))[0]
    if chosen == "xla_chunked":
        return chunked_attention(q, k, v, mask.key_valid, mask.start)
    if chosen == "cudnn":
        out = cudnn_attention(q, k, v, mask, fallback=plain)
    else:
        out = splash_attention(q, k, v, mask, interpret=target_platform() != "tpu")
    return jnp.where(mask.has_key(t)[..., None, None], out, 0).astype(q.dtype)  # fully masked rows: 0, never NaN


def same_layout(
    q: Float[Array, "B T H d"], k: Float[Array, "B S Hkv d"], v: Float[Array, "B S Hkv d"]
) -> tuple[Float[Array, "B T H d"], Float[Array, "B S Hkv d"], Float[Array, "B S Hkv d"]]:
    """``q``, ``k`` and ``v`` pinned to one sharding under an ambient mesh: the batch over (data, fsdp), the heads over
    tensor when the KV heads divide it (then the query heads do too), else no head axis split.

    Why: jax's cuDNN backward partitioner refuses operands sharded differently ("Query, key and value should have
    same sharding"), and XLA's propagation can give them different shardings (a small model's train step under
    fsdp=8 for H100s did)."""
    mesh = jax.sharding.get_abstract_mesh()
    tensor = mesh.shape["tensor"] if not mesh.empty and "tensor" in mesh.axis_names else 1
    logical = ("batch", None, "heads" if k.shape[2] % tensor == 0 else None, None)
    return constrain_logical(q, logical), constrain_logical(k, logical), constrain_logical(v, logical)


def cudnn_attention(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    mask: CausalPadding,
    *,
    fallback,
) -> Float[Array, "B T H d"]:
    """cuDNN attention given only what cuDNN takes natively: ``is_causal`` and the key lengths.

    No dense mask (JAX would fold it into a bias: the upper triangle computed anyway and, in
    training, a bias gradient stored per layer). Valid keys must be a prefix of each sample (right
    padding, at least one); a batch where they are not (left padding) runs ``fallback()`` instead,
    chosen at run time by ``lax.cond`` (both are compiled). Rows from cache slot 0 only
    (``mask.static_start == 0``).
    """
    if mask.static_start != 0:
        raise ValueError("cudnn_attention: rows must start at cache slot 0 (mask.static_start == 0)")
    _log_once("attention_impl='cudnn': padding goes to cuDNN as key lengths; a batch that is not right-padded "
              "(left padding) cannot be expressed so and runs the XLA path (chosen at run time)", logging.INFO)
    s = k.shape[1]
    lengths = jnp.sum(mask.key_valid, axis=1, dtype=jnp.int32)
    prefix = jnp.all(mask.key_valid == (jnp.arange(s)[None] < lengths[:, None])) & jnp.all(lengths > 0)

    def fused():
        qs, ks, vs = same_layout(q, k, v)
        return jax.nn.dot_product_attention(qs, ks, vs, scale=q.shape[-1] ** -0.5, is_causal=True, key_value_seq_lengths=lengths,
                                            implementation="cudnn").astype(q.dtype)

    return jax.lax.cond(prefix, fused, lambda: fallback().astype(q.dtype))


# ---- xla_chunked: online softmax over key blocks, flash-style backward ------------------------------

def _blocks(x: jax.Array, block: int, fill, axis: int = 1) -> jax.Array:
    """Blocks of ``block`` along ``axis`` (padded with ``fill``), stacked first: (B, S, ...) -> (S/block, B, block, ...)."""
    s = x.shape[axis]
    n = -(-s // block)
    x = jnp.pad(x, [(0, n * block - s) if i == axis else (0, 0) for i in range(x.ndim)], constant_values=fill)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:]), axis, 0)


def _key_mask_blocks(key_valid: jax.Array, block: int) -> jax.Array:
    """The mask's key blocks: (B, S) -> (n, B, blk); a per-row (B, T, S) mask -> (n, B, T, blk)."""
    return _blocks(key_valid, block, False, axis=key_valid.ndim - 1)


def _block_logits(qg, kb, valid_b, slots_b, q_slot, scale):
    """fp32 masked logits (B, Hkv, G, T, blk) of one key block.

    ``valid_b``: the block of a (B, S) key mask (B, blk) or of a per-row (B, T, S) mask (B, T, blk);
    ``q_slot`` (B, T) adds causality (row t sees key slots <= q_slot[b, t]); ``None`` adds none.
    """
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
    visible = valid_b if valid_b.ndim == 3 else valid_b[:, None, :]  # (B, T or 1, blk)
    if q_slot is not None:
        visible = visible & (slots_b[None, None, :] <= q_slot[:, :, None])
    return jnp.where(visible[:, None, None], logits, NEG_INF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked(q, k, v, key_valid, q_slot, block):
    return _chunked_fwd(q, k, v, key_valid, q_slot, block)[0]


def _chunked_fwd(q, k, v, key_valid, q_slot, block):
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qg, scale = _grouped(q, hkv), d**-0.5
    kb, vb, valid = _blocks(k, block, 0), _blocks(v, block, 0), _key_mask_blocks(key_valid, block)
    slots = jnp.arange(kb.shape[0] * block).reshape(-1, block)

    def body(carry, xs):
        m, den, acc = carry
        k_j, v_j, valid_j, slots_j = xs
        logits = _block_logits(qg, k_j, valid_j, slots_j, q_slot, scale)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
        return (m_new, den * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv), None

    g = h // hkv
    init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    (m, den, acc), _ = jax.lax.scan(body, init, (kb, vb, valid, slots))
    out = (acc / den[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)
    lse = m + jnp.log(den)  # (B, Hkv, G, T)
    return (out, lse.reshape(b, h, t).transpose(0, 2, 1)), (q, k, v, key_valid, q_slot, out, lse)


def _chunked_bwd(block, res, cotangents):
    """FlashAttention-2's backward per key block; the LSE's cotangent adds ``p * g_lse`` to the logits' (d lse / d s = p)."""
    q, k, v, key_valid, q_slot, out, lse = res
    g_out, g_lse = cotangents
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    qg, scale = _grouped(q, hkv), d**-0.5
    do = _grouped(g_out, hkv).astype(v.dtype)  # (B, T, Hkv, G, d); matmul operands in the input dtype, fp32 accumulation
    delta = jnp.einsum("btkgd,btkgd->bkgt", do, _grouped(out, hkv), preferred_element_type=jnp.float32)
    delta = delta - g_lse.astype(jnp.float32).transpose(0, 2, 1).reshape(delta.shape)
    kb, vb, valid = _blocks(k, block, 0), _blocks(v, block, 0), _key_mask_blocks(key_valid, block)
    slots = jnp.arange(kb.shape[0] * block).reshape(-1, block)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def body(dq, xs):
        k_j, v_j, valid_j, slots_j = xs
        p = jnp.exp(_block_logits(qg, k_j, valid_j, slots_j, q_slot, scale) - lse[..., None])  # (B, Hkv, G, T, blk)
        dv = f32("bkgts,btkgd->bskd", p.astype(v.dtype), do)
        dp = f32("btkgd,bskd->bkgts", do, v_j)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + f32("bkgts,bskd->btkgd", ds, k_j)
        dk = f32("bkgts,btkgd->bskd", ds, qg)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(qg.shape, jnp.float32), (kb, vb, valid, slots))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, -1, hkv, d)[:, :s]
    return dq.reshape(b, t, h, d).astype(q.dtype), unblock(dk), unblock(dv), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention_with_lse(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    key_valid: Bool[Array, "B S"] | Bool[Array, "B T S"],
    q_slot: Int[Array, "B T"] | None,
    block: int = CHUNK,
) -> tuple[Float[Array, "B T H d"], Float[Array, "B T H"]]:
    """Causal + padding attention by an online softmax over key blocks of ``block`` (pure JAX), and its fp32 LSE.

    Row t sits at cache slot ``q_slot[b, t]`` and sees the valid key slots <= it. ``key_valid`` may
    instead be a per-row mask (B, T, S) (the HR part's selection), with ``q_slot=None`` for no
    causality; a row that sees no key then gets a finite output and ``lse ~ NEG_INF``. Forward and
    backward (a custom VJP, FlashAttention-2's recurrences) hold one (T x block) block of fp32
    logits at a time and save only the output and the LSE: memory O(T x block), not O(T x S). The
    LSE is differentiable (unlike any fused kernel's), so the select rows' merge can use it. Equals
    :func:`attention_with_lse` up to float rounding.
    """
    block = max(1, min(block, k.shape[1]))
    return _chunked(q, k, v, key_valid, None if q_slot is None else q_slot.astype(jnp.int32), block)


def chunked_attention(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    key_valid: Bool[Array, "B S"],
    start: Int[Array, ""],
    block: int = CHUNK,
) -> Float[Array, "B T H d"]:
    """:func:`chunked_attention_with_lse` of rows ``start + t``, the output only."""
    q_slot = jnp.broadcast_to(start + jnp.arange(q.shape[1]), q.shape[:2])
    return chunked_attention_with_lse(q, k, v, key_valid, q_slot, block)[0]


def rows_attention_with_lse(
    q_rows: Float[Array, "B R H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    mask: CausalPadding,
    rows: Int[Array, "B R"],
    *,
    chunked: bool,
) -> tuple[Float[Array, "B R H d"], Float[Array, "B R H"]]:
    """Output and differentiable fp32 LSE of the rows ``rows`` (their queries ``q_rows``) over the keys.

    ``chunked``: by key blocks (memory O(R x block)); otherwise the dense einsum (O(R x S)).
    """
    if chunked:
        return chunked_attention_with_lse(q_rows, k, v, mask.key_valid, mask.start + rows)
    return attention_with_lse(q_rows, k, v, mask.rows(rows))


# ---- splash (TPU Pallas; interpret mode elsewhere) ------------------------------------------------

@functools.cache
def _splash_kernel(heads: int, rows: int, keys: int, offset: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.FullMask((rows, keys)) if offset is None else sm.CausalMask((rows, keys), offset=offset)
    bq = bk = SPLASH_BLOCK
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():  # the kernel's mask tables are constants, never tracers (it is cached)
        return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(
    q: Float[Array, "B T H d"],
    k: Float[Array, "B S Hkv d"],
    v: Float[Array, "B S Hkv d"],
    mask: CausalPadding,
    *,
    interpret: bool = False,
) -> Float[Array, "B T H d"]:
    """Causal + padding attention by the Pallas splash kernel (GQA), one call per sample (vmapped).

    Under an ambient mesh (``jax.set_mesh``) the kernel runs inside ``shard_map`` (Mosaic kernels
    are never partitioned automatically): the batch over the mesh's batch axes (data, fsdp) and
    the heads over ``tensor``, each where it divides (else replicated). Padding is segment ids
    (valid keys 1, invalid 0, queries 1); causality is the static ``CausalMask(offset=static_start)``;
    one row (decode) folds its causal bound into the key segment ids instead, so a traced cache
    index works. Sequences are padded to multiples of :data:`SPLASH_BLOCK` (padded keys invalid,
    padded rows dropped). Rows without a valid key are undefined here (the dispatcher zeroes them).
    """
    b, t, h, d = q.shape
    if t > 1 and mask.static_start is None:
        raise ValueError("splash_attention: more than one row needs mask.static_start (a static causal offset)")
    body = functools.partial(_splash_local, static_start=mask.static_start, interpret=interpret)
    axes = kernel_mesh_axes(b, k.shape[2])
    if axes is None:
        return body(q, k, v, mask.key_valid, mask.start)
    bx, hx = axes
    qkv = P(bx, None, hx, None)
    return jax.shard_map(body, in_specs=(qkv, qkv, qkv, P(bx, None), P()), out_specs=qkv, check_vma=False)(
        q, k, v, mask.key_valid, mask.start)


def kernel_mesh_axes(batch: int, kv_heads: int) -> tuple[str | tuple | None, str | tuple | None] | None:
    """Mesh axes of a Pallas kernel's ``shard_map`` under the ambient mesh (Mosaic kernels are never partitioned
    automatically): the batch over the batch axes (data, fsdp) and the heads over ``tensor``, each where it divides
    (else replicated); ``None`` without a mesh (or one device). Heads go by ``kv_heads``: it divides Hkv, so H too
    (H = G Hkv), and GQA groups stay whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    spec_b = logical_to_spec(("batch",), (batch,), mesh)
    spec_h = logical_to_spec(("kv_heads",), (kv_heads,), mesh)
    return (spec_b[0] if len(spec_b) else None), (spec_h[0] if len(spec_h) else None)


def _splash_local(q, k, v, key_valid, start, *, static_start: int | None, interpret: bool):
    """:func:`splash_attention` on the arrays one device holds."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    s = k.shape[1]
    tp, sp = (-(-n // SPLASH_BLOCK) * SPLASH_BLOCK for n in (t, s))
    valid = key_valid
    if t == 1:
        valid = valid & (jnp.arange(s)[None] <= start)
    kernel = _splash_kernel(h, tp, sp, None if t == 1 else static_start, interpret)
    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)  # splash takes no scale
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)])
    seg_kv = jnp.pad(valid, [(0, 0), (0, sp - s)]).astype(jnp.int32)
    seg_q = jnp.ones((b, tp), jnp.int32)

    def one(qb, kb, vb, sq, skv):
        return kernel(qb.transpose(1, 0, 2), kb.transpose(1, 0, 2), vb.transpose(1, 0, 2), sk.SegmentIds(q=sq, kv=skv))

    out = jax.vmap(one)(pad(qs, tp), pad(k, sp), pad(v, sp), seg_q, seg_kv)  # (B, H, Tp, d)
    return out.transpose(0, 2, 1, 3)[:, :t]


# ---- the HR part by the Pallas kernel (TPU; interpret mode elsewhere) -------------------------------

def hr_kernel_attention(
    q: Float[Array, "B R H d"],
    k: Float[Array, "B M Hkv d"],
    v: Float[Array, "B M Hkv d"],
    valid: Bool[Array, "B R M"],
    block_share: float = 1.0,
) -> tuple[Float[Array, "B R H d"], Float[Array, "B R H"]]:
    """:func:`hr_attention` over shared keys by :func:`flexattn_jax.kernels.hr_attention.hr_flash_attention`: the
    same output (``q``'s dtype) and differentiable fp32 LSE, fully masked (query, key) blocks skipped. Under a mesh
    it runs inside ``shard_map`` like :func:`splash_attention` (batch over data/fsdp, heads over tensor; the mask
    follows the batch); interpret mode unless the target is a TPU. ``block_share``: the active block share the
    kernel's cost estimate counts (``flex.hr_kernel_block_share``)."""
    from flexattn_jax.kernels.hr_attention import hr_flash_attention

    body = functools.partial(hr_flash_attention, interpret=target_platform() != "tpu", block_share=block_share)
    axes = kernel_mesh_axes(q.shape[0], k.shape[2])
    if axes is None:
        return body(q, k, v, valid)
    bx, hx = axes
    qkv = P(bx, None, hx, None)
    return jax.shard_map(body, in_specs=(qkv, qkv, qkv, P(bx, None, None)), out_specs=(qkv, P(bx, None, hx)),
                         check_vma=False)(q, k, v, valid)
