"""The HR part as a Pallas kernel: R select rows against M shared HR keys under a run-time per-row mask.

Flash-style (online softmax over key blocks, FlashAttention-2's backward), written for the TPU
(Mosaic: ``PrefetchScalarGridSpec``, VMEM scratch, lane-replicated row statistics as in jax's own
``flash_attention.py``) and run in interpret mode anywhere else (the tests, on CPU). What it adds
over splash / tokamax (``shared/docs/hr-kernel.md``):

* the mask is a run-time ``(B, R, M)`` boolean (int8 in HBM), one per sample, shared by the heads;
* a (query block, key block) pair with no selected key is skipped (``pl.when`` on a block table in
  SMEM), and its K/V/mask DMA is skipped too: the block index maps point a skipped block at the
  last active one, whose buffer the pipeline already holds;
* it returns the output **and the fp32 LSE**, and its custom VJP folds the LSE's cotangent in
  (``di = rowsum(dO * O) - g_lse``), so merging with the causal part by LSE has exact gradients;
* R and M are padded to the block sizes with masked rows / keys (M = 5184 is not a multiple of
  128); rows with no selected key get output 0 and ``lse = NEG_INF`` (the merge weighs them 0);
* GQA: K/V keep their ``Hkv`` heads; query head h reads KV head ``h // (H / Hkv)``.

Cost estimate (:func:`cost_estimates`): ``pl.CostEstimate`` is static, and which blocks are skipped
is known only at run time, so each call reports its executed cost at a static active block share
(``block_share``, from ``flex.hr_kernel_block_share``): the FLOPs and exponentials of that share of the
blocks and the bytes it moves (the skipped blocks' K/V/mask DMA, and in the dK/dV kernel their query side,
removed; what is read or written once per row or key stays). At the default 1.0 that is every block, the
upper bound; ``bench/hr_kernel.py`` measures the share on selection masks (``docs/hr-kernel.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax.attention import NEG_INF

BLOCK = 128  # default query and key block
LANES = 128  # row statistics (m, l, lse, di) are replicated over one vreg's lanes, as in jax's flash_attention.py
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def block_tables(mask: Int[Array, "B Rp Mp"], block_q: int, block_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(active, fetch_k, fetch_q)`` flattened for SMEM: whether each (query block, key block) has a selected key,
    the key block to DMA at each step of the forward / dq grid (the last active one: a skipped step re-uses
    the buffer) and the query block to DMA at each step of the dK/dV grid (likewise, over query blocks)."""
    b, rp, mp = mask.shape
    nq, nk = rp // block_q, mp // block_k
    active = jnp.any(mask.reshape(b, nq, block_q, nk, block_k) != 0, axis=(2, 4))  # (B, nq, nk)

    def last_active(a: jax.Array) -> jax.Array:  # along the last axis: index of the last active <= i, else the first active
        idx = jnp.where(a, jnp.arange(a.shape[-1], dtype=jnp.int32), -1)
        run = jax.lax.cummax(idx, axis=a.ndim - 1)
        first = jnp.argmax(a, axis=-1).astype(jnp.int32)[..., None]
        return jnp.where(run >= 0, run, first)

    fetch_k = last_active(active)  # (B, nq, nk)
    fetch_q = last_active(jnp.swapaxes(active, 1, 2))  # (B, nk, nq)
    return active.astype(jnp.int32).reshape(-1), fetch_k.reshape(-1), fetch_q.reshape(-1)


def _fwd_kernel(active, fetch_k, fetch_q, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, nq, nk):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(active[(b * nq + qi) * nk + ki] != 0)
    def _block():
        q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]
        valid = mask_ref[0] != 0
        s = jnp.where(valid, jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, LANES)
        p = jnp.where(valid, jnp.exp(s - m_new[:, :1]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = corr * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * corr[:, :1] + pv
        m_sc[...] = m_new

    @pl.when(ki == nk - 1)
    def _finish():
        den = l_sc[...]
        has = den > 0  # rows with no selected key: output 0, lse NEG_INF
        safe = jnp.where(has, den, 1.0)
        o_ref[0, 0] = (acc_sc[...] * jnp.where(has, 1.0 / safe, 0.0)[:, :1]).astype(o_ref.dtype)
        lse_ref[0, 0] = jnp.where(has, m_sc[...] + jnp.log(safe), NEG_INF)


def _probs(q, k, mask_ref, lse, scale):
    """fp32 probabilities of one block from the row LSE (0 where masked), and its validity."""
    valid = mask_ref[0] != 0
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    return jnp.where(valid, jnp.exp(s - lse[:, :1]), 0.0)


def _dq_kernel(active, fetch_k, fetch_q, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *, scale, nq, nk):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(ki == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(active[(b * nq + qi) * nk + ki] != 0)
    def _block():
        q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
        p = _probs(q, k, mask_ref, lse_ref[0, 0], scale)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = (p * (dp - di_ref[0, 0][:, :1]) * scale).astype(k.dtype)
        dq_sc[...] += jax.lax.dot_general(ds, k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(ki == nk - 1)
    def _finish():
        dq_ref[0, 0] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(active, fetch_k, fetch_q, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc,
                *, scale, nq, nk, groups):
    b, ki, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(active[(b * nq + qi) * nk + ki] != 0)
    def _block():
        q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
        p = _probs(q, k, mask_ref, lse_ref[0, 0], scale)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = (p * (dp - di_ref[0, 0][:, :1]) * scale).astype(q.dtype)
        dk_sc[...] += jax.lax.dot_general(ds, q, _TN, preferred_element_type=jnp.float32)

    @pl.when((g == groups - 1) & (qi == nq - 1))
    def _finish():
        dk_ref[0, 0] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[0, 0] = dv_sc[...].astype(dv_ref.dtype)


def cost_estimates(
    b: int, h: int, groups: int, rp: int, mp: int, d: int, itemsize: int, block_q: int = BLOCK, block_k: int = BLOCK,
    share: float = 1.0,
) -> dict[str, pl.CostEstimate]:
    """The static cost estimates of the three kernels (``fwd``, ``dq``, ``dkv``) for padded shapes when a ``share`` of
    the (query block, key block) pairs is active (1.0: every block, the upper bound; which blocks are skipped is known
    only at run time, :func:`active_block_fraction` measures it on masks): the FLOPs and exponentials of the active
    blocks, and the HBM bytes. Per active block the forward and dq kernels read a K, V and mask block (K and V once per
    query block of each query head when all are active), the dK/dV kernel a query-side block (q, dO and the
    lane-replicated fp32 LSE and di); what is read or written once stays whole: the forward's and dq's query side,
    the dK/dV kernel's K and V read and dK and dV written once per KV head."""
    if not 0 <= share <= 1:
        raise ValueError(f"cost_estimates: share={share!r} is not in [0, 1]")
    rows = b * h * rp
    kv = share * b * h * (rp // block_q) * mp * d * itemsize * 2
    mask = share * b * h * rp * mp
    stats = rows * LANES * 4
    flops = lambda matmuls: int(share * 2 * matmuls * rows * mp * d)
    exps = int(share * rows * mp)

    def est(matmuls: int, row_bytes: int) -> pl.CostEstimate:
        return pl.CostEstimate(flops=flops(matmuls), transcendentals=exps, bytes_accessed=int(row_bytes + kv + mask))

    nk = mp // block_k
    kv_once = b * (h // groups) * mp * d * itemsize * 2
    # K, V read and dK, dV written once per KV head; the query side once per active key block
    dkv = pl.CostEstimate(flops=flops(4), transcendentals=exps,
                          bytes_accessed=int(2 * kv_once + mask + share * nk * (rows * d * itemsize * 2 + 2 * stats)))
    return {"fwd": est(2, rows * d * itemsize * 2 + stats),  # q in, o out, lse out
            "dq": est(3, rows * d * itemsize * 3 + 2 * stats),  # q, dO in, dq out, lse and di in
            "dkv": dkv}


def _costs(q, k, block_q, block_k, share):
    b, h, rp, d = q.shape
    return cost_estimates(b, h, h // k.shape[1], rp, k.shape[2], d, q.dtype.itemsize, block_q, block_k, share)


def _specs(block_q: int, block_k: int, d: int, groups: int, nq: int, nk: int):
    """BlockSpecs of the forward / dq grid (b, h, qi, ki): q-side blocks by (b, h, qi), K/V and mask by the fetch table."""
    fk = lambda b, qi, ki, fetch_k: fetch_k[(b * nq + qi) * nk + ki]
    q_spec = pl.BlockSpec((1, 1, block_q, d), lambda b, h, qi, ki, a, fk_, fq: (b, h, qi, 0))
    kv_spec = pl.BlockSpec((1, 1, block_k, d), lambda b, h, qi, ki, a, fk_, fq: (b, h // groups, fk(b, qi, ki, fk_), 0))
    mask_spec = pl.BlockSpec((1, block_q, block_k), lambda b, h, qi, ki, a, fk_, fq: (b, qi, fk(b, qi, ki, fk_)))
    row_spec = pl.BlockSpec((1, 1, block_q, LANES), lambda b, h, qi, ki, a, fk_, fq: (b, h, qi, 0))
    return q_spec, kv_spec, mask_spec, row_spec


def _forward(q, k, v, mask, tables, block_q, block_k, interpret, share):
    b, h, rp, d = q.shape
    hkv, mp = k.shape[1], k.shape[2]
    nq, nk, groups = rp // block_q, mp // block_k, h // hkv
    q_spec, kv_spec, mask_spec, row_spec = _specs(block_q, block_k, d, groups, nq, nk)
    kernel = functools.partial(_fwd_kernel, scale=d**-0.5, nq=nq, nk=nk)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=[q_spec, kv_spec, kv_spec, mask_spec],
        out_specs=[q_spec, row_spec],
        scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                        pltpu.VMEM((block_q, d), jnp.float32)],
    )
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, rp, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_costs(q, k, block_q, block_k, share)["fwd"], interpret=interpret, name="flex_hr_attention_fwd",
    )(*tables, q, k, v, mask)


def _backward(q, k, v, mask, tables, do, lse, di, block_q, block_k, interpret, share):
    b, h, rp, d = q.shape
    hkv, mp = k.shape[1], k.shape[2]
    nq, nk, groups = rp // block_q, mp // block_k, h // hkv
    q_spec, kv_spec, mask_spec, row_spec = _specs(block_q, block_k, d, groups, nq, nk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=d**-0.5, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nq, nk), in_specs=[q_spec, kv_spec, kv_spec, mask_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_costs(q, k, block_q, block_k, share)["dq"], interpret=interpret, name="flex_hr_attention_dq",
    )(*tables, q, k, v, mask, do, lse, di)

    # dK/dV grid (b, kv head, key block, group member, query block): the query side follows fetch_q
    fq = lambda b, ki, qi, fetch_q: fetch_q[(b * nk + ki) * nq + qi]
    qs = pl.BlockSpec((1, 1, block_q, d), lambda b, j, ki, g, qi, a, fk, f: (b, j * groups + g, fq(b, ki, qi, f), 0))
    rs = pl.BlockSpec((1, 1, block_q, LANES), lambda b, j, ki, g, qi, a, fk, f: (b, j * groups + g, fq(b, ki, qi, f), 0))
    ks = pl.BlockSpec((1, 1, block_k, d), lambda b, j, ki, g, qi, a, fk, f: (b, j, ki, 0))
    ms = pl.BlockSpec((1, block_q, block_k), lambda b, j, ki, g, qi, a, fk, f: (b, fq(b, ki, qi, f), ki))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=d**-0.5, nq=nq, nk=nk, groups=groups),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, nk, groups, nq), in_specs=[qs, ks, ks, ms, qs, rs, rs],
            out_specs=[ks, ks], scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=_costs(q, k, block_q, block_k, share)["dkv"], interpret=interpret, name="flex_hr_attention_dkv",
    )(*tables, q, k, v, mask, do, lse, di)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _hr_flash(q, k, v, mask, tables, block_q, block_k, interpret, share):
    o, lse = _forward(q, k, v, mask, tables, block_q, block_k, interpret, share)
    return o, lse[..., 0]


def _hr_flash_fwd(q, k, v, mask, tables, block_q, block_k, interpret, share):
    o, lse = _forward(q, k, v, mask, tables, block_q, block_k, interpret, share)
    return (o, lse[..., 0]), (q, k, v, mask, tables, o, lse)


def _hr_flash_bwd(block_q, block_k, interpret, share, res, cotangents):
    """FlashAttention-2's backward; the LSE's cotangent enters as ``di = rowsum(dO * O) - g_lse`` (d lse / d s = p)."""
    q, k, v, mask, tables, o, lse = res
    g_o, g_lse = cotangents
    di = jnp.sum(g_o.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - g_lse.astype(jnp.float32)  # (B, H, Rp)
    di = jnp.broadcast_to(di[..., None], lse.shape)
    dq, dk, dv = _backward(q, k, v, mask, tables, g_o.astype(q.dtype), lse, di, block_q, block_k, interpret, share)
    return dq, dk, dv, None, None


_hr_flash.defvjp(_hr_flash_fwd, _hr_flash_bwd)


def hr_flash_attention(
    q: Float[Array, "B R H d"],
    k: Float[Array, "B M Hkv d"],
    v: Float[Array, "B M Hkv d"],
    valid: Bool[Array, "B R M"],
    *,
    block_q: int = BLOCK,
    block_k: int = BLOCK,
    interpret: bool = False,
    block_share: float = 1.0,
) -> tuple[Float[Array, "B R H d"], Float[Array, "B R H"]]:
    """The select rows' attention over the shared HR keys under the per-row mask ``valid``: output (``q``'s dtype)
    and differentiable fp32 LSE, by the Pallas kernel. Same function as :func:`flexattn_jax.attention.hr_attention`
    (rows without a selected key: output 0, ``lse = NEG_INF``); ``interpret`` runs it off a TPU. ``block_share``: the
    active block share the compiler's cost estimate assumes (:func:`cost_estimates`; the results do not depend on it)."""
    b, r, h, d = q.shape
    m, hkv = k.shape[1], k.shape[2]
    if h % hkv or valid.shape != (b, r, m) or v.shape != k.shape:
        raise ValueError(f"hr_flash_attention: q {q.shape}, k {k.shape}, v {v.shape}, valid {valid.shape}: "
                         "want (B, R, H, d), (B, M, Hkv, d) twice with H % Hkv == 0, and (B, R, M)")
    if not 0 < block_share <= 1:
        raise ValueError(f"hr_flash_attention: block_share={block_share!r} is not in (0, 1]")
    mask = padded_mask(valid, block_q, block_k)  # padded rows and keys: masked
    rp, mp = mask.shape[1:]
    qt = jnp.pad(q.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, rp - r), (0, 0)])
    kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, mp - m), (0, 0)]) for x in (k, v))
    tables = block_tables(mask, block_q, block_k)
    o, lse = _hr_flash(qt, kt, vt, mask, tables, block_q, block_k, interpret, float(block_share))
    return o[:, :, :r].transpose(0, 2, 1, 3), lse[:, :, :r].transpose(0, 2, 1)


def padded_mask(valid: Bool[Array, "B R M"], block_q: int = BLOCK, block_k: int = BLOCK) -> Int[Array, "B Rp Mp"]:
    """The kernel's int8 mask: ``valid`` padded with masked rows and keys to multiples of the block sizes."""
    b, r, m = valid.shape
    rp, mp = -(-r // block_q) * block_q, -(-m // block_k) * block_k
    return jnp.pad(jnp.asarray(valid), [(0, 0), (0, rp - r), (0, mp - m)]).astype(jnp.int8)


def active_block_fraction(valid: Bool[Array, "B R M"], block_q: int = BLOCK, block_k: int = BLOCK) -> float:
    """Share of the (query block, key block) pairs the kernel computes for a ``(B, R, M)`` mask: the executed share of
    the cost estimate's FLOPs (the roofline's skip measure)."""
    return float(jnp.mean(block_tables(padded_mask(valid, block_q, block_k), block_q, block_k)[0]))
