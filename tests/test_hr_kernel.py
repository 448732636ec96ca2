"""The HR part by the Pallas kernel (interpret mode on CPU) against the XLA HR path, and in the model.

The kernel alone: outputs, LSE and the gradients of q, k, v (through the output, the LSE and the LSE merge with a
causal part) within 1e-5 of scale, for rows with no selected key, rows with every key, a padded M, several heads,
GQA and MHA; its block tables (skipped blocks, the DMA redirect). In the model: ``attention_impl='splash_hr'``
against ``xla`` in the full train step on a 1-device and an fsdp mesh (loss, gradient norm, updated parameters),
and the release's torch oracle (training rows, paper mode: the cases with more than one select row).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexattn_jax import attention as A
from flexattn_jax import sharding as S
from flexattn_jax.kernels.hr_attention import active_block_fraction, block_tables, hr_flash_attention, padded_mask
from flexattn_jax.selection import _upsample_nearest, cell_order
from flexattn_jax.sharding import make_mesh
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, random_params, small_train_config, synthetic_batch, tiny_config
from train.step import BATCH_KEYS, global_batch, make_step, split_microbatches, token_loss_sums

from .oracle import OracleFlexConfig
from .test_flex_parity import _check, _run, tiny  # noqa: F401  (tiny: the oracle's module fixture)
from .torch_models import make_images, make_prompt

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= tol * scale, f"max |diff| {np.abs(a - b).max():.3g} > {tol} x scale {scale:.3g}"


def _inputs(b, r, h, hkv, d, m, case):
    ks = jax.random.split(jax.random.key(len(case) + m), 4)
    q = jax.random.normal(ks[0], (b, r, h, d))
    k, v = jax.random.normal(ks[1], (b, m, hkv, d)), jax.random.normal(ks[2], (b, m, hkv, d))
    if case == "all":
        valid = jnp.ones((b, r, m), bool)
    else:  # a random selection, one row with no key, one with every key, and a key range no row selects (skipped blocks)
        valid = jax.random.bernoulli(ks[3], 0.3, (b, r, m)).at[0, 2].set(False).at[1, 1].set(True)
        valid = valid.at[:, :, m // 3: 2 * m // 3].set(False).at[1, 1].set(True)
    return q, k, v, valid


CASES = [  # (b, r, h, hkv, d, m, block_q, block_k, mask)
    pytest.param(2, 12, 4, 2, 16, 300, 8, 64, "mixed", id="gqa-padded-M-and-R"),
    pytest.param(1, 8, 2, 2, 8, 128, 8, 32, "all", id="mha-all-keys", marks=pytest.mark.slow),  # ~40 s each interpreted
    pytest.param(2, 6, 4, 1, 16, 96, 8, 32, "mixed", id="mqa-rows-without-keys", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("b,r,h,hkv,d,m,bq,bk,case", CASES)
def test_kernel_equals_xla_hr_part_with_gradients(b, r, h, hkv, d, m, bq, bk, case):
    with jax.default_matmul_precision("highest"):
        q, k, v, valid = _inputs(b, r, h, hkv, d, m, case)
        has = np.asarray(valid).any(-1)
        w_o = jax.random.normal(jax.random.key(3), q.shape)
        w_l = jax.random.normal(jax.random.key(4), q.shape[:3]) * has[..., None]
        km, vm = jax.random.normal(jax.random.key(5), (b, 7, hkv, d)), jax.random.normal(jax.random.key(6), (b, 7, hkv, d))
        o_main, lse_main = A.attention_with_lse(q, km, vm, jnp.ones((b, r, 7), bool))  # a causal part to merge with

        def loss(kernel, q, k, v):
            if kernel:
                o, lse = hr_flash_attention(q, k, v, valid, block_q=bq, block_k=bk, interpret=True)
            else:
                o, lse = A.hr_attention(q, k, v, valid)
            merged = A.merge_by_lse(o_main, lse_main, o, lse)
            return jnp.sum(o * w_o) + jnp.sum(jnp.where(has[..., None], lse, 0) * w_l) + jnp.sum(merged * w_o), (o, lse, merged)

        grads = lambda kernel: jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2), has_aux=True))
        (_, ref), g_ref = grads(False)(q, k, v)
        (_, out), g = grads(True)(q, k, v)
    lse, lse_ref = np.asarray(out[1]), np.asarray(ref[1])
    np.testing.assert_array_equal(lse[~has], np.float32(A.NEG_INF))
    np.testing.assert_array_equal(np.asarray(out[0])[~has], 0)
    _close(lse[has], lse_ref[has])
    for a, b_ in zip((out[0], out[2], *g), (ref[0], ref[2], *g_ref), strict=True):
        assert np.isfinite(np.asarray(a)).all()
        _close(a, b_)
    if case == "mixed":  # the unselected key range is whole skipped blocks
        assert active_block_fraction(valid, bq, bk) < 1


def test_masked_keys_do_not_leak():
    """Keys outside the selection change nothing (a mask silently turned all-True would fail here)."""
    q, k, v, valid = _inputs(2, 12, 4, 2, 16, 300, "mixed")
    run = jax.jit(lambda k, v: hr_flash_attention(q, k, v, valid, block_q=8, block_k=64, interpret=True))
    noise = jnp.where(jnp.any(valid, axis=1)[..., None, None], 0.0, 100.0)  # keys no row of the sample selects
    for a, b in zip(run(k, v), run(k + noise, v + noise), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_tables_skip_and_redirect():
    valid = np.zeros((1, 16, 32), bool)  # 2 query blocks x 4 key blocks of 8
    valid[0, 0, 9] = True  # (q0, k1)
    valid[0, 15, 30] = True  # (q1, k3)
    valid[0, 3, 25] = True  # (q0, k3)
    active, fetch_k, fetch_q = (np.asarray(t) for t in block_tables(padded_mask(valid, 8, 8), 8, 8))
    np.testing.assert_array_equal(active.reshape(2, 4), [[0, 1, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(fetch_k.reshape(2, 4), [[1, 1, 1, 3], [3, 3, 3, 3]])  # a skipped step re-uses a fetched block
    np.testing.assert_array_equal(fetch_q.reshape(4, 2), [[0, 0], [0, 0], [0, 0], [0, 1]])
    assert active_block_fraction(valid, 8, 8) == 3 / 8


@pytest.mark.parametrize("hr,pool", [(72, 9), (12, 9), (6, 9)])
def test_cell_order_makes_each_cell_a_run(hr, pool):
    """Cell order is a permutation under which every pooled cell's tokens are one contiguous run; at 1008 px
    (72 x 72, 9 x 9) runs of 64, so 128-key blocks are whole cells and fewer blocks are active than row-major."""
    order = cell_order(hr, pool)
    np.testing.assert_array_equal(np.sort(order), np.arange(hr * hr))
    for c in range(pool * pool):
        one = np.asarray(_upsample_nearest(jnp.zeros((pool, pool), bool).at[c // pool, c % pool].set(True), hr)).ravel()
        where = np.flatnonzero(one[order])
        assert where.size == 0 or where[-1] - where[0] + 1 == where.size, f"cell {c} is not contiguous"
    if hr == 72:
        cells = jax.random.bernoulli(jax.random.key(0), 0.2, (1, 1, pool, pool))  # one selection of ~20% for 128 rows
        mask = np.asarray(_upsample_nearest(jnp.broadcast_to(cells, (1, 128, pool, pool)), hr)).reshape(1, 128, hr * hr)
        assert active_block_fraction(mask[..., order]) < 0.6 * active_block_fraction(mask)


def test_cell_ordered_keys_equal_row_major():
    """Permuting keys, values and mask columns together (each key keeps its RoPE) changes nothing but float order."""
    q, k, v, valid = _inputs(2, 12, 4, 2, 16, 144, "mixed")
    order = cell_order(12, 9)
    run = jax.jit(lambda k, v, m: hr_flash_attention(q, k, v, m, block_q=8, block_k=32, interpret=True))
    for a, b in zip(run(k[:, order], v[:, order], valid[..., order]), A.hr_attention(q, k, v, valid), strict=True):
        _close(jnp.where(b > -1e29, a, 0) if b.ndim == 3 else a, jnp.where(b > -1e29, b, 0) if b.ndim == 3 else b)


def test_bad_shapes_one_line_error():
    q, k, v, valid = _inputs(1, 4, 3, 2, 8, 32, "all")
    with pytest.raises(ValueError, match=r"hr_flash_attention: q \(1, 4, 3, 8\)"):
        hr_flash_attention(q, k, v, valid, interpret=True)


def test_rule():
    assert A.hr_kernel("splash_hr", 2) and not A.hr_kernel("splash_hr", 1)  # one row (decode): dense
    assert not any(A.hr_kernel(i, 2048) for i in ("xla", "xla_chunked", "splash", "auto", "cudnn"))
    tpu = dict(backend="tpu", dtype=jnp.bfloat16, head_dim=128, num_rows=2048, num_keys=2048, static_start=0)
    assert A.resolve_impl("splash_hr", **tpu) == ("splash", "")  # the main part of splash_hr is splash


# ---- the train step ------------------------------------------------------------------------------

CFG = tiny_config(flex=dataclasses.replace(tiny_config().flex, alpha_schedule="constant"))  # alpha 1: the HR part has gradients


def _mesh(spec):
    return make_mesh(spec, devices=jax.devices()[: 1 if spec.startswith("data=1,fsdp=1") else 8])


def _step(impl, spec, params, batch):
    """One full train step (make_step): its metrics."""
    mesh, tc = _mesh(spec), small_train_config()
    with jax.default_matmul_precision("highest"):
        fns = make_step(dataclasses.replace(CFG, attention_impl=impl), tc, mesh, tc.steps)
        _, metrics = fns.step(fns.init_state(params), global_batch(fns, split_microbatches(batch, 1)))
    return jax.device_get(metrics)


def _mesh_grads(impl, spec, params, batch):
    """Gradients of the step's loss sum, jitted with the mesh ambient and params / batch placed as the step places them."""
    mesh, cfg = _mesh(spec), dataclasses.replace(CFG, attention_impl=impl)
    with S.target_mesh(mesh), jax.default_matmul_precision("highest"):
        p = jax.device_put(params, S.param_shardings(params, mesh))
        b = {k: jax.device_put(v, S.batch_sharding(mesh, v.shape)) for k, v in batch.items() if k in BATCH_KEYS}
        return jax.device_get(jax.jit(jax.grad(lambda p, b: token_loss_sums(p, cfg, b, jnp.float32(1.0))[0]))(p, b))


@pytest.mark.slow  # ~3 min interpreted; fast twins: test_kernel_equals_xla_hr_part_with_gradients, the oracle's training rows
@pytest.mark.parametrize("spec", ["data=1,fsdp=1,tensor=1", "data=1,fsdp=8,tensor=1"])
def test_train_step_with_kernel_equals_xla(spec):
    """The full step's loss and gradient norm, and the loss's gradients (every parameter) on the same mesh, with the
    HR part by the kernel equal the dense XLA path's within 1e-5."""
    params = random_params(CFG, seed=0)
    batch = synthetic_batch(CFG, TEST_BATCH, TEST_SEQ_LEN, seed=1, text_only=2)
    ref_m, m = _step("xla", spec, params, batch), _step("splash_hr", spec, params, batch)
    for key in ("loss", "grad_norm"):
        _close(m[key], ref_m[key])
    g_ref, g = _mesh_grads("xla", spec, params, batch), _mesh_grads("splash_hr", spec, params, batch)
    assert np.abs(g_ref["text"]["layers"]["attn"]["k_hr"]["kernel"]).max() > 0  # the HR projections have gradients
    top = max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(g_ref))
    for path, a in jax.tree_util.tree_leaves_with_path(g):  # a leaf whose gradient is float noise (< 1e-3 of the
        b = np.asarray(_leaf(g_ref, path), np.float64)  # largest) is held to 1e-5 of 1e-3 of the largest instead
        err, scale = np.abs(np.asarray(a, np.float64) - b).max(), max(np.abs(b).max(), 1e-3 * top)
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: |diff| {err:.3g} > 1e-5 x {scale:.3g}"


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


# ---- the release's oracle with the kernel ----------------------------------------------------------

def _kernel(tiny):  # noqa: F811
    model, hd, params, cfg = tiny
    return model, hd, params, dataclasses.replace(cfg, attention_impl="splash_hr")


def test_training_rows_match_oracle_with_kernel(tiny):  # noqa: F811
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1)
    ids = make_prompt(tiny[0], 4, 10)
    labels = torch.full_like(ids, -100)
    labels[0, -8:-5] = ids[0, -8:-5]
    labels[0, -3:] = ids[0, -3:]
    ref, out, cfg = _run(_kernel(tiny), oc, ids, make_images(1, 168), [(400, 260)], labels=labels, alpha=0.3)
    assert cfg.attention_impl == "splash_hr"
    _check(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["attention", "all"])
def test_paper_mode_matches_oracle_with_kernel(tiny, selection):  # noqa: F811
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, hr_mode="paper", selection=selection)
    ref, out, _ = _run(_kernel(tiny), oc, make_prompt(tiny[0]), make_images(1, 168), [(400, 260)])
    _check(ref, out)


# ---- selected-only training (flex.train_hr_budget) ---------------------------------------------------

SPARSE = dict(pool_size=4, threshold=180.0, hr_budget=None)  # unions of 72..117 of M = 144 tokens on the test model


@pytest.mark.parametrize("impl,fits", [("xla", True), pytest.param("xla", False, marks=pytest.mark.slow),
                                       pytest.param("splash_hr", True, marks=pytest.mark.slow),
                                       pytest.param("xla", "packed-only", marks=pytest.mark.slow)])
def test_selected_only_training_equals_all_m(monkeypatch, impl, fits):
    """Projecting only the union of the rows' selections (U slots) gives the all-M gradients of the training loss
    when every union fits (the packed branch forced, or compiled alone: ``train_hr_fallback=False``, the cost-analysis
    program) and when one does not (U below a union: the all-M fallback)."""
    from .test_attention_impl import _grads, _model, _prefill

    params, cfg, *inputs = _model()
    cfg = dataclasses.replace(cfg, attention_impl=impl, flex=dataclasses.replace(cfg.flex, **SPARSE))
    layers = cfg.mask_layers
    union = np.asarray(_prefill(params, cfg, *inputs)[1].hr_masks)[layers.start:layers.stop].any(axis=2).sum(axis=-1)
    u = int(union.max())  # (layers, B) tokens per sample's union
    assert 0 < u < cfg.num_hr_tokens and union.min() < u, union  # a real union, smaller than M, varying
    c = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, train_hr_budget=u if fits else u - 1,
                                                          train_hr_fallback=fits != "packed-only"))
    assert c.train_hr_tokens == (u if fits else u - 1)
    with monkeypatch.context() as mp:
        if fits is True:  # every lax.cond takes its first branch: the packed U-slot path (the batch has images: encode runs)
            mp.setattr(jax.lax, "cond", lambda pred, a, b, *ops: a(*ops))
        g = _grads(params, c, *inputs)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(_grads(params, cfg, *inputs)), strict=True):
        _close(a, b)


def test_train_hr_budget_config():
    from flexattn_jax.config import ConfigError

    cfg = tiny_config()
    assert cfg.train_hr_tokens is None
    assert dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, train_hr_budget=0.25)).train_hr_tokens == 9  # M = 36
    with pytest.raises(ConfigError, match="flex.train_hr_budget=0"):
        dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, train_hr_budget=0))
    for share in (0, 1.5, True):
        with pytest.raises(ConfigError, match=f"flex.hr_kernel_block_share={share!r}"):
            dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_kernel_block_share=share))


def test_selected_only_model_flops():
    """Training's model FLOPs with ``train_hr_budget``: each hierarchical layer projects and attends U, not M, HR tokens
    (forward + backward: 3x); inference counts are unchanged."""
    from flexattn_jax import flops as F

    cfg = tiny_config()
    sel = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, train_hr_budget=0.25))
    m, u, rows = cfg.num_hr_tokens, sel.train_hr_tokens, 10
    saved = 3 * 2 * F.hierarchical_layers(cfg) * (F.hr_kv_flops(cfg, m) - F.hr_kv_flops(cfg, u)
                                                  + F.hr_attention_flops(cfg, rows, m) - F.hr_attention_flops(cfg, rows, u))
    assert F.train_flops(cfg, 2, 64, rows) - F.train_flops(sel, 2, 64, rows) == pytest.approx(saved) and saved > 0
    assert F.model_flops(sel, 2, 64, 1) == F.model_flops(cfg, 2, 64, 1)


# ---- Mosaic: compiled by libtpu for compile-only TPU chips ---------------------------------------------

@needs_libtpu
@pytest.mark.parametrize("share", [1.0, pytest.param(0.25, marks=pytest.mark.slow)])
def test_kernel_and_gradient_lower_to_mosaic_for_v5e(share):
    """The kernel's forward, dq and dK/dV compile for v5e (bf16, head dim 128, M = 1296 padded to 1408, fsdp=4 under
    shard_map): three Mosaic custom calls, and the compiler's FLOPs are the cost estimates' at the block share
    (every block, or the share ``block_share`` says is active)."""
    from flexattn_jax.app import aot
    from flexattn_jax.kernels.hr_attention import cost_estimates

    mesh = aot.target_mesh_for(aot.parse_target("v5e:2x2"), "fsdp=4")
    b, r, h, d, m = 4, 256, 2, 128, 1296
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P("fsdp")))
    q, k, valid = sds((b, r, h, d), jnp.bfloat16), sds((b, m, h, d), jnp.bfloat16), sds((b, r, m), jnp.bool_)

    def loss(q, k, v, valid):
        o, lse = A.hr_kernel_attention(q, k, v, valid, share)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(lse > -1e29, lse, 0))

    with S.target_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, valid)
        compiled = lowered.compile()
    text = lowered.as_text()
    assert text.count("tpu_custom_call") == 3 and all(f"flex_hr_attention_{n}" in text for n in ("fwd", "dq", "dkv"))
    est = cost_estimates(1, h, 1, 256, 1408, d, 2, share=share)  # one sample per chip
    kernel_flops = sum(e.flops for e in est.values())
    assert kernel_flops <= compiled.cost_analysis()["flops"] <= 1.01 * kernel_flops


@needs_libtpu
@pytest.mark.slow  # ~5 min: the whole train program
def test_train_program_compiles_for_tpu_with_the_hr_kernel():
    from .test_aot_tpu import _compile

    r = _compile("train", "fsdp=4", "splash_hr")
    assert {f"mosaic:flex_hr_attention_{n}" for n in ("fwd", "dq", "dkv")} <= set(r.kernels), r.kernels
    assert r.fits
