"""``attention_impl``: every implementation that runs on CPU equals the dense path, in the model too.

The kernels (``xla_chunked``; ``splash`` in Pallas interpret mode) against the dense einsum on
random q/k/v with left padding, a static causal offset and one decode row against a cache (traced
index), outputs and gradients; then the tiny FlexAttention model with each implementation against
``xla``: prefill logits and per-layer HR masks, training rows with alpha < 1, cached decoding,
and the gradients of the loss. ``auto`` on CPU falls back and logs why.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.common import smoke_config
from flexattn_jax import attention as A
from flexattn_jax import generate as G
from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.model import forward
from flexattn_jax.params import init_params
from train.step import token_loss_sums

CPU_IMPLS = ("xla_chunked", "splash")


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() <= tol * scale, f"max |diff| {np.abs(a - b).max():.3g} > {tol} x scale {scale:.3g}"


# ---- the kernels --------------------------------------------------------------------------------

def _qkv(b=2, t=37, s=37, h=4, hkv=2, d=16):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, s, hkv, d)), jax.random.normal(k3, (b, s, hkv, d)))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_kernel_equals_dense_prefill_and_grad(impl):
    with jax.default_matmul_precision("highest"):
        q, k, v = _qkv()
        key_valid = jnp.ones((2, 37), bool).at[0, :5].set(False)  # sample 0 left-padded
        mask = A.CausalPadding(key_valid, jnp.int32(0), 0)
        rows = mask.has_key(37)[..., None, None]
        w = jax.random.normal(jax.random.key(9), q.shape) * rows  # padding rows carry no cotangent

        def loss(which, q, k, v):
            if which == "xla_chunked":  # a small block: several blocks, one partial
                out = A.chunked_attention(q, k, v, key_valid, mask.start, block=8)
            else:
                out = A.attention(q, k, v, mask, impl=which)
            return jnp.sum(out * w), out

        (_, ref), g_ref = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        (_, out), g = jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        _close(jnp.where(rows, out, 0), jnp.where(rows, ref, 0))
        for a, b in zip(g, g_ref, strict=True):
            _close(a, b)


def test_chunked_rows_with_lse_equal_dense_and_grad():
    """The select rows' recompute by key blocks: output and LSE, and gradients through both (the merge uses the LSE)."""
    with jax.default_matmul_precision("highest"):
        q, k, v = _qkv(t=6, s=37)
        key_valid = jnp.ones((2, 37), bool).at[0, :5].set(False)
        mask = A.CausalPadding(key_valid, jnp.int32(0), 0)
        rows = jnp.asarray([[10, 20, 30, 36, 7, 8], [0, 3, 12, 25, 33, 36]], jnp.int32)
        w_o, w_l = jax.random.normal(jax.random.key(3), q.shape), jax.random.normal(jax.random.key(4), q.shape[:3])

        def loss(chunked, q, k, v):
            if chunked:
                o, lse = A.chunked_attention_with_lse(q, k, v, key_valid, rows, block=8)
            else:
                o, lse = A.rows_attention_with_lse(q, k, v, mask, rows, chunked=False)
            return jnp.sum(o * w_o) + jnp.sum(lse * w_l), (o, lse)

        (_, ref), g_ref = jax.value_and_grad(lambda *a: loss(False, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        (_, out), g = jax.value_and_grad(lambda *a: loss(True, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        for a, b in zip((*out, *g), (*ref, *g_ref), strict=True):
            _close(a, b)


def test_chunked_hr_part_equals_dense_and_grad():
    """The HR part by key blocks (select rows over shared keys under a (B, R, M) mask) equals the dense one:
    outputs, LSE and gradients (through both); rows with no valid HR key get lse = NEG_INF, output 0, no NaN."""
    with jax.default_matmul_precision("highest"):
        q, k, v = _qkv(t=6, s=300)  # M = 300: two full key blocks of 128 and a partial one
        valid = jax.random.bernoulli(jax.random.key(5), 0.3, (2, 6, 300))
        valid = valid.at[0, 2].set(False).at[1, 5].set(False).at[1, 0, 250:].set(True)  # two rows see no HR key
        has = np.asarray(valid).any(-1)
        w_o = jax.random.normal(jax.random.key(3), q.shape)
        w_l = jax.random.normal(jax.random.key(4), q.shape[:3]) * has[..., None]
        o_main, lse_main = A.attention_with_lse(q, k, v, jnp.ones((2, 6, 300), bool))  # a main part to merge with

        def loss(chunked, q, k, v):
            o, lse = A.hr_attention(q, k, v, valid, chunked=chunked)
            merged = A.merge_by_lse(o_main, lse_main, o, lse)
            return jnp.sum(o * w_o) + jnp.sum(lse * w_l) + jnp.sum(merged * w_o), (o, lse, merged)

        (_, ref), g_ref = jax.value_and_grad(lambda *a: loss(False, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        (_, out), g = jax.value_and_grad(lambda *a: loss(True, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        lse, lse_ref = np.asarray(out[1]), np.asarray(ref[1])
        np.testing.assert_array_equal(lse[~has], np.float32(A.NEG_INF))
        np.testing.assert_array_equal(lse_ref[~has], np.float32(A.NEG_INF))
        _close(lse[has], lse_ref[has])
        np.testing.assert_array_equal(np.asarray(out[0])[~has], 0)
        for a, b in zip((out[0], out[2], *g), (ref[0], ref[2], *g_ref), strict=True):
            assert np.isfinite(np.asarray(a)).all()
            _close(a, b)
        _close(out[2][~has], o_main[~has])  # no HR key: the merge is the main part's output
        with pytest.raises(ValueError, match="shared by the rows"):
            A.hr_attention(q, k[:, None].repeat(6, 1), v[:, None].repeat(6, 1), valid, chunked=True)


def test_hr_chunked_rule():
    assert not A.hr_chunked("xla", 2048, 5184) and A.hr_chunked("xla_chunked", 1, 16)
    for impl in ("auto", "cudnn", "splash"):
        assert A.hr_chunked(impl, 2048, 5184) and A.hr_chunked(impl, 2, A.AUTO_CHUNK_MIN_KEYS)
        assert not A.hr_chunked(impl, 2048, A.AUTO_CHUNK_MIN_KEYS - 1) and not A.hr_chunked(impl, 1, 5184)  # small / decode: dense
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        A.hr_chunked("flash", 2, 2)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_kernel_decode_row_masks_by_cache_slots(impl):
    """One row at a traced cache index sees the valid slots up to its own (not is_causal's top-left)."""
    with jax.default_matmul_precision("highest"):
        q, k, v = _qkv(t=1, s=40)
        key_valid = jnp.ones((2, 40), bool).at[1, :3].set(False).at[:, 30:].set(True)  # slots past the row: masked by causality
        mask = A.CausalPadding(key_valid, jnp.int32(29), None)
        ref = A.attention(q, k, v, mask, impl="xla")
        out = jax.jit(lambda q, k, v, kv, i: A.attention(q, k, v, A.CausalPadding(kv, i, None), impl=impl))(q, k, v, key_valid, 29)
        _close(out, ref)
        top_left = A.attention(q, k, v, A.CausalPadding(key_valid, jnp.int32(0), 0), impl="xla")
        assert np.abs(np.asarray(top_left - ref)).max() > 1e-2  # what a top-left causal mask would give


def test_chunked_memory_is_o_t_block():
    """Compiled temp memory of the chunked forward + backward stays far below the dense one at T = S = 2048."""
    q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _qkv(b=1, t=2048, s=2048, h=4, hkv=2, d=64))
    mask = A.CausalPadding(jax.ShapeDtypeStruct((1, 2048), bool), jax.ShapeDtypeStruct((), jnp.int32), 0)

    def temp(impl):
        f = jax.grad(lambda q, k, v, m: jnp.sum(A.attention(q, k, v, m, impl=impl).astype(jnp.float32)), argnums=(0, 1, 2))
        return jax.jit(f).lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    dense, chunked = temp("xla"), temp("xla_chunked")
    assert chunked * 4 <= dense, (chunked, dense)


def test_auto_falls_back_on_cpu_and_says_why(caplog):
    q, k, v = _qkv(t=8, s=1024)
    mask = A.CausalPadding(jnp.ones((2, 1024), bool), jnp.int32(0), 0)
    A._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="flexattn_jax.attention"):
        assert A.choose_impl("auto", q, k, mask) == "xla_chunked"
        assert A.choose_impl("auto", q, k, mask) == "xla_chunked"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "on cpu: no fused kernel" in msgs[0] and "'xla_chunked'" in msgs[0], msgs
    short = dict(backend="cpu", dtype=jnp.float32, head_dim=16, num_rows=8, num_keys=64, static_start=0)
    assert A.resolve_impl("auto", **short)[0] == "xla"  # the reference at the tests' sizes: parity unchanged


def test_resolve_impl_per_backend():
    gpu = dict(backend="gpu", dtype=jnp.bfloat16, head_dim=128, num_rows=2048, num_keys=2048, static_start=0)
    assert A.resolve_impl("auto", **gpu) == ("cudnn", "")
    impl, why = A.resolve_impl("auto", **{**gpu, "dtype": jnp.float32})
    assert impl == "xla_chunked" and "bf16/fp16" in why
    impl, why = A.resolve_impl("cudnn", **{**gpu, "head_dim": 12})
    assert impl == "xla_chunked" and "head dim" in why
    tpu = {**gpu, "backend": "tpu"}
    assert A.resolve_impl("auto", **tpu) == ("splash", "")
    assert A.resolve_impl("auto", **{**tpu, "head_dim": 64})[0] == "xla_chunked"
    impl, why = A.resolve_impl("splash", **{**tpu, "static_start": None})
    assert impl == "xla_chunked" and "static causal offset" in why
    assert A.resolve_impl("auto", **{**tpu, "num_rows": 1, "static_start": None}) == ("xla", "")
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        A.resolve_impl("cudnn", **{**gpu, "backend": "cpu"})
    with pytest.raises(ConfigError, match="attention_impl='flash'"):
        dataclasses.replace(ModelConfig(), attention_impl="flash")


# ---- the model ------------------------------------------------------------------------------------

def _model():
    base = smoke_config("float32")
    cfg = dataclasses.replace(base, flex=dataclasses.replace(base.flex, hr_budget=0.25, threshold=8.0))
    params = init_params(cfg, jax.random.key(0))
    layers = params["text"]["layers"]  # sharper attention than the 0.02 init: selections that vary by row
    attn = {**layers["attn"], "q": {"kernel": layers["attn"]["q"]["kernel"] * 4}, "k": {"kernel": layers["attn"]["k"]["kernel"] * 4}}
    params = {**params, "text": {**params["text"], "layers": {**layers, "attn": attn}}}
    rng = np.random.default_rng(0)
    g = cfg.num_image_tokens
    text = rng.integers(1, 99, size=(2, 12))
    ids = np.concatenate([text[:, :3], np.full((2, g), cfg.image_token_id), text[:, 3:]], axis=1).astype(np.int32)
    mask = np.ones(ids.shape, bool)
    ids[1, :2], mask[1, :2] = 0, False  # sample 1 left-padded
    pixels = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)


@pytest.fixture(scope="module")
def model():
    return _model()


def _with(cfg, impl):
    return dataclasses.replace(cfg, attention_impl=impl)


def _training_batch(ids, mask):
    t = ids.shape[1]
    rows = jnp.asarray(np.tile(np.arange(t - 6, t, dtype=np.int32), (2, 1)))
    labels = jnp.where(jnp.arange(t) >= t - 5, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "select_rows": rows, "select_valid": jnp.ones(rows.shape, bool)}


def _prefill(params, cfg, ids, mask, pixels):
    """Forward with the inference rows, and with training rows at alpha 0.5 (one jitted program)."""
    rows = _training_batch(ids, mask)

    @jax.jit
    def run(params):
        with jax.default_matmul_precision("highest"):
            plain = forward(params, cfg, ids, pixels, mask, return_maps=True)
            train = forward(params, cfg, ids, pixels, mask, return_maps=True, select_rows=rows["select_rows"],
                            select_valid=rows["select_valid"], alpha=0.5)
        return plain, train

    return run(params)


def _decode(params, cfg, ids, mask, pixels, steps=1):
    """Prefill into a cache and ``steps`` greedy decode steps: [(logits, maps)] per step."""
    with jax.default_matmul_precision("highest"):
        state, logits, maps = jax.jit(lambda p: G.prefill(p, cfg, ids, pixels, mask, max_len=ids.shape[1] + steps))(params)
        outs = [(logits, maps)]
        step = jax.jit(lambda p, s, tok: G.decode_step(p, cfg, s, tok))
        for _ in range(steps):
            state, logits, maps = step(params, state, jnp.argmax(outs[-1][0], axis=-1).astype(jnp.int32))
            outs.append((logits, maps))
    return outs


def _grads(params, cfg, ids, mask, pixels):
    batch = {**_training_batch(ids, mask), "pixel_values": pixels}
    loss = lambda text, p: token_loss_sums({**p, "text": text}, cfg, batch, jnp.float32(0.7))[0]
    with jax.default_matmul_precision("highest"):  # the decoder's gradients (the vision tower is frozen in the recipe)
        return jax.jit(jax.grad(loss))(params["text"], params)


@pytest.fixture(scope="module")
def reference(model):
    """The dense path's prefill, decoding and gradients, each computed once when first asked for."""
    params, cfg, *inputs = model
    c, done = _with(cfg, "xla"), {}
    return lambda f: done[f] if f in done else done.setdefault(f, f(params, c, *inputs))


def _slow_splash(impls):
    return [pytest.param(i, marks=pytest.mark.slow) if i == "splash" else i for i in impls]


@pytest.mark.parametrize("impl", _slow_splash(CPU_IMPLS))
def test_model_prefill_and_training_rows_equal_dense(model, reference, impl):
    params, cfg, ids, mask, pixels = model
    valid = np.asarray(mask)[..., None]
    for out, ref in zip(_prefill(params, _with(cfg, impl), ids, mask, pixels), reference(_prefill), strict=True):
        _close(np.where(valid, out.logits, 0), np.where(valid, ref.logits, 0))
        hr = np.asarray(ref.hr_masks)
        assert 0 < hr.mean() < 1, "a degenerate selection would not test the masks"
        np.testing.assert_array_equal(np.asarray(out.hr_masks), hr)
        _close(out.image_attention, ref.image_attention)


@pytest.mark.parametrize("impl", _slow_splash(CPU_IMPLS))
def test_model_cached_decoding_equals_dense(model, reference, impl):
    params, cfg, *inputs = model
    for (lo, mo), (lr, mr) in zip(_decode(params, _with(cfg, impl), *inputs), reference(_decode), strict=True):
        _close(lo, lr)
        np.testing.assert_array_equal(np.asarray(mo.hr_masks), np.asarray(mr.hr_masks))


@pytest.mark.parametrize("impl", _slow_splash(CPU_IMPLS))
def test_train_step_gradients_equal_dense(model, reference, impl):
    """Gradients of one step's loss (select rows with alpha < 1 included) equal the dense path's within 1e-5."""
    params, cfg, *inputs = model
    ref = reference(_grads)
    g = _grads(params, _with(cfg, impl), *inputs)
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = np.asarray(_leaf(ref, path))
        rel = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
        assert rel <= 1e-5, f"{impl} {jax.tree_util.keystr(path)}: relative {rel:.3g}"
    assert np.abs(np.asarray(ref["layers"]["attn"]["k_hr"]["kernel"])).max() > 0  # the HR part has gradient


@pytest.mark.slow  # fast twin: test_chunked_hr_part_equals_dense_and_grad (the kernel, outputs, LSE and gradients)
def test_model_training_rows_chunked_hr_part_equals_dense(model, monkeypatch):
    """The model's training rows (alpha < 1, the HR part over all M shared keys) with the HR part by key blocks
    equal it dense: logits, HR masks and gradients, at K = M (K = 0.25 M, R x K >= M: the xla_chunked tests above)."""
    import flexattn_jax.hierarchical as hier

    params, cfg, *inputs = model
    cfg = dataclasses.replace(cfg, attention_impl="xla_chunked", flex=dataclasses.replace(cfg.flex, hr_budget=None))
    runs = {}
    for chunked in (False, True):
        calls = []
        monkeypatch.setattr(hier, "hr_chunked", lambda impl, r, m, chunked=chunked, calls=calls: calls.append((r, m)) or chunked)
        runs[chunked] = _prefill(params, cfg, *inputs)[1], _grads(params, cfg, *inputs)
        assert calls and all(m == cfg.num_hr_tokens for _, m in calls)  # the shared-key HR part ran, as set
    (train, g), (train_ref, g_ref) = runs[True], runs[False]
    valid = np.asarray(inputs[1])[..., None]
    _close(np.where(valid, train.logits, 0), np.where(valid, train_ref.logits, 0))
    np.testing.assert_array_equal(np.asarray(train.hr_masks), np.asarray(train_ref.hr_masks))
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = np.asarray(_leaf(g_ref, path))
        rel = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
        assert rel <= 1e-5, f"{jax.tree_util.keystr(path)}: relative {rel:.3g}"


def _leaf(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree
