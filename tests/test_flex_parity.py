"""FlexAttention against the torch oracle of the release (issue: core), fp32, highest precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flexattn_jax.generate import generate
from flexattn_jax.model import forward
from flexattn_jax.selection import adaptive_pool_bins, margin_patches, nearest_source_index, top_k_pad
from flexattn_jax.text import bicubic_matrix

from .jax_models import convert_torch_model, with_flex
from .oracle import OracleFlexConfig, oracle_forward, oracle_generate
from .torch_models import make_hd_weights, make_images, make_prompt, make_tiny_llava


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_llava(layers=4)
    hd = make_hd_weights(model)
    params, cfg = convert_torch_model(model)
    return model, hd, params, cfg


def _run(tiny, oc, ids, pix, ori, mask=None, labels=None, alpha=1.0):
    model, hd, params, cfg = tiny
    params, cfg = with_flex(params, cfg, hd, oc)
    with torch.no_grad():
        ref = oracle_forward(model, hd, oc, ids, pix, ori, attention_mask=mask, labels=labels, alpha=alpha)
    kw = {}
    if labels is not None:
        rows, valid = _learnable_rows(labels.numpy())
        kw = dict(select_rows=jnp.asarray(rows), select_valid=jnp.asarray(valid), alpha=alpha)
    with jax.default_matmul_precision("highest"):
        out = forward(
            params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
            None if mask is None else jnp.asarray(mask.numpy().astype(bool)),
            margin=jnp.asarray(margin_patches(np.array(ori), cfg.lr_grid)), return_maps=True, **kw,
        )
    return ref, out, cfg


def _learnable_rows(labels):
    rows = np.zeros(labels.shape, np.int32)
    valid = np.zeros(labels.shape, bool)
    for b, lab in enumerate(labels):
        r = np.nonzero(lab[1:] != -100)[0]
        rows[b, : len(r)] = r
        valid[b, : len(r)] = True
    return rows, valid


def _check(ref, out, mask=None):
    rl, ol = ref["logits"].numpy(), np.asarray(out.logits)
    valid = np.ones(rl.shape[:2], bool) if mask is None else mask.numpy().astype(bool)
    assert np.abs(rl - ol)[valid].max() <= 1e-5 * np.abs(rl).max()
    for b, per_layer in enumerate(ref["masks"]):
        for layer, m in per_layer.items():
            ours = np.asarray(out.hr_masks[layer, b])[: m.shape[0]]
            np.testing.assert_array_equal(ours, m.numpy(), err_msg=f"sample {b} layer {layer}")


@pytest.mark.parametrize("ori", [(400, 260), (150, 500), (300, 300)], ids=["wide", "tall", "square"])
def test_inference_matches_oracle_at_k_equals_m(tiny, ori):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1)
    ids, pix = make_prompt(tiny[0]), make_images(1, 168)
    ref, out, _ = _run(tiny, oc, ids, pix, [ori])
    assert sum(m.sum().item() for m in ref["masks"][0].values()) > 0  # something is selected
    _check(ref, out)


def test_batch_with_left_padding_matches_oracle(tiny):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, threshold=100)
    a, b = make_prompt(tiny[0], 5, 6, seed=1), make_prompt(tiny[0], 2, 4, seed=2)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=b.dtype), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ref, out, _ = _run(tiny, oc, ids, make_images(2, 168, seed=3), [(400, 260), (300, 300)], mask=mask)
    _check(ref, out, mask)


def test_budget_k_below_m_matches_oracle_truncation(tiny):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, threshold=30, hr_budget=20)
    ref, out, cfg = _run(tiny, oc, make_prompt(tiny[0]), make_images(1, 168), [(300, 300)])
    assert cfg.hr_budget_tokens == 20
    _check(ref, out)


def test_training_rows_blend_matches_oracle(tiny):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1)
    ids = make_prompt(tiny[0], 4, 10)
    labels = torch.full_like(ids, -100)
    labels[0, -8:-5] = ids[0, -8:-5]
    labels[0, -3:] = ids[0, -3:]
    ref, out, _ = _run(tiny, oc, ids, make_images(1, 168), [(400, 260)], labels=labels, alpha=0.3)
    _check(ref, out)


@pytest.mark.parametrize("mode,selection", [("paper", "attention"), ("release", "all"), ("paper", "all")])
def test_paper_mode_and_xattn_match_oracle(tiny, mode, selection):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, hr_mode=mode, selection=selection)
    ref, out, _ = _run(tiny, oc, make_prompt(tiny[0]), make_images(1, 168), [(400, 260)])
    _check(ref, out)


def test_constant_map_selects_nothing_and_equals_plain(tiny):
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, threshold=256)
    ref, out, _ = _run(tiny, oc, make_prompt(tiny[0]), make_images(1, 168), [(300, 300)])
    assert not np.asarray(out.hr_masks).any()
    _check(ref, out)


@pytest.mark.parametrize("strategy", ["project", "cache", "incremental"])
def test_cached_generation_matches_oracle(tiny, strategy):
    model, hd, params, cfg = tiny
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, threshold=48)
    params, cfg = with_flex(params, cfg, hd, oc)
    ids, pix, ori = make_prompt(model), make_images(1, 168), [(400, 260)]
    with torch.no_grad():
        ref = oracle_generate(model, hd, oc, ids, pix, ori, max_new_tokens=8)
    with jax.default_matmul_precision("highest"):
        out = generate(
            params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)), jnp.ones(ids.shape, bool),
            jnp.asarray(margin_patches(np.array(ori), cfg.lr_grid)), max_new_tokens=8, hr_strategy=strategy,
            return_logits=True, return_step_maps=True,
        )
    assert np.asarray(out.tokens[0]).tolist() == list(ref["tokens"])
    for step, want in enumerate(ref["step_logits"]):
        got = np.asarray(out.step_logits[step, 0])
        assert np.abs(got - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max(), f"step {step}"
    for step, masks in enumerate(ref["step_masks"][1:]):
        for layer, m in masks.items():
            np.testing.assert_array_equal(np.asarray(out.step_maps.hr_masks[step, layer, 0]), m.numpy()[0])


# ---- unit tests of the resampling rules -----------------------------------------------------

@pytest.mark.parametrize("g,p", [(24, 9), (4, 9), (10, 9), (9, 9), (7, 3)])
def test_adaptive_max_pool_bins_match_torch(g, p):
    x = torch.randn(1, 1, g, g)
    member = adaptive_pool_bins(g, p)
    ours = np.array([[x[0, 0][np.ix_(member[i], member[j])].max().item() for j in range(p)] for i in range(p)])
    np.testing.assert_allclose(ours, torch.nn.functional.adaptive_max_pool2d(x, (p, p))[0, 0].numpy())


@pytest.mark.parametrize("n_in,n_out", [(9, 72), (9, 12), (8, 36), (9, 30)])
def test_nearest_upsample_matches_torch(n_in, n_out):
    x = torch.arange(n_in, dtype=torch.float32)[None, None, :, None].expand(1, 1, n_in, 1)
    ref = torch.nn.functional.interpolate(x, size=(n_out, 1), mode="nearest")[0, 0, :, 0].numpy()
    np.testing.assert_array_equal(nearest_source_index(n_in, n_out), ref.astype(int))


@pytest.mark.parametrize("n_in,n_out", [(24, 72), (4, 12), (5, 17)])
def test_bicubic_matches_torch(n_in, n_out):
    x = torch.randn(1, 3, n_in, n_in, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=n_out, mode="bicubic", align_corners=False)[0].numpy()
    u = bicubic_matrix(n_in, n_out)
    ours = np.einsum("ig,jh,cgh->cij", u, u, x[0].numpy())
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_antialiased_lowres_resize_matches_torch():
    from flexattn_jax.vision import downsample_lowres

    x = torch.randn(2, 3, 168, 168)
    ref = torch.nn.functional.interpolate(x, size=56, mode="bilinear", antialias=True).numpy()
    ours = np.asarray(downsample_lowres(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), 56)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_margin_for_wide_tall_and_square():
    m = margin_patches(np.array([[400, 260], [150, 500], [300, 300], [1000, 10]]), 24)
    np.testing.assert_array_equal(m, [[4, 0], [0, 8], [0, 0], [11, 0]])


@pytest.mark.parametrize("n_selected,k", [(3, 5), (5, 5), (9, 5)])
def test_top_k_padding(n_selected, k):
    mask = np.zeros((1, 1, 12), bool)
    chosen = np.arange(12)[::-1][:n_selected]
    mask[0, 0, chosen] = True
    score = np.linspace(0, 1, 12)[None, None].astype(np.float32)
    sel = top_k_pad(jnp.asarray(mask), jnp.asarray(score), k)
    idx, valid = np.asarray(sel.index[0, 0]), np.asarray(sel.valid[0, 0])
    assert idx.shape == (k,) and valid.sum() == min(n_selected, k)
    assert set(idx[valid]) == set(sorted(chosen, key=lambda i: -score[0, 0, i])[:k])


def test_same_bucket_compiles_once(tiny):
    model, hd, params, cfg = tiny
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1)
    params, cfg = with_flex(params, cfg, hd, oc)
    fwd = jax.jit(lambda *a, **k: forward(*a, **k), static_argnums=1)  # a fresh function: its own compile cache
    for seed, ori in [(0, (400, 260)), (1, (200, 500))]:
        ids = make_prompt(model, 5, 6, seed=seed).numpy()
        pix = make_images(1, 168, seed=seed).numpy().transpose(0, 2, 3, 1)
        fwd(params, cfg, jnp.asarray(ids), jnp.asarray(pix), margin=jnp.asarray(margin_patches(np.array([ori]), 4)))
    assert fwd._cache_size() == 1


@pytest.mark.slow  # fast twins: test_paper_mode_and_xattn_match_oracle (paper mode) and the cached-generation oracle tests
def test_paper_mode_cached_generation_equals_full_reforward(tiny):
    model, hd, params, cfg = tiny
    oc = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, hr_mode="paper")
    params, cfg = with_flex(params, cfg, hd, oc)
    ids, pix = jnp.asarray(make_prompt(model).numpy()), jnp.asarray(make_images(1, 168).numpy().transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        out = generate(params, cfg, ids, pix, jnp.ones(ids.shape, bool), max_new_tokens=3)
        seq = ids
        for _ in range(3):  # greedy by re-running the whole forward on the longer sequence (a compile per length)
            nxt = jnp.argmax(forward(params, cfg, seq, pix).logits[:, -1], -1)
            seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    assert np.asarray(out.tokens[0]).tolist() == np.asarray(seq[0, ids.shape[1]:]).tolist()
