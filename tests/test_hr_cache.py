"""The incremental HR K/V cache: the same tokens and logits as projecting the K selected tokens per step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexattn_jax.generate import generate
from flexattn_jax.selection import margin_patches

from .jax_models import tiny_flex_model
from .torch_models import make_images, make_prompt

STEPS = 10


@pytest.fixture(scope="module")
def flex_model():
    model, _, params, cfg = tiny_flex_model()
    ids = np.concatenate([make_prompt(model).numpy()] * 2)
    pix = make_images(2, 168).numpy().transpose(0, 2, 3, 1)
    margin = margin_patches(np.array([(400, 260), (200, 300)]), cfg.lr_grid)
    return params, cfg, (jnp.asarray(ids), jnp.asarray(pix), jnp.ones(ids.shape, bool), jnp.asarray(margin))


def _generate(params, cfg, inputs, strategy):
    with jax.default_matmul_precision("highest"):
        return generate(params, cfg, *inputs, max_new_tokens=STEPS, hr_strategy=strategy, return_logits=True, return_step_maps=True)


def _new_tokens_per_step(out, cfg) -> np.ndarray:
    """(steps, hierarchical layers): most tokens any sample's layer saw selected for the first time."""
    masks = np.concatenate([np.asarray(out.prefill_maps.hr_masks)[None], np.asarray(out.step_maps.hr_masks)])  # (S+1, L, B, M)
    first = cfg.flex.first_select_layer
    used = masks[:, first:-1]  # hierarchical layer j uses the mask made by layer j - 1
    seen = np.zeros(used.shape[1:], bool)
    counts = []
    for step in used:
        counts.append((step & ~seen).sum(-1).max(-1))
        seen |= step
    return np.array(counts)


@pytest.mark.parametrize("budget", [pytest.param(None, marks=pytest.mark.slow), 0.25])  # the fast twin: K < M
def test_incremental_equals_per_step_projection(flex_model, budget):
    params, cfg, inputs = flex_model
    cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=budget, hr_step_cells=1))
    ref = _generate(params, cfg, inputs, "project")
    out = _generate(params, cfg, inputs, "incremental")
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    want = np.asarray(ref.step_logits)
    assert np.abs(np.asarray(out.step_logits) - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_array_equal(np.asarray(out.step_maps.hr_masks), np.asarray(ref.step_maps.hr_masks))
    # the run covers all three cases of a decode step's layer: nothing new, a few new (fast path), too many (fallback)
    new = _new_tokens_per_step(ref, cfg)[1:]
    fast = cfg.hr_step_tokens
    assert (new == 0).any() and ((new > 0) & (new <= fast)).any() and (new > fast).any(), new


def test_incremental_cache_holds_exactly_the_selected_tokens(flex_model):
    """After generation, each layer's cache has projected exactly the union of the tokens it attended to."""
    from flexattn_jax.generate import prefill

    params, cfg, (ids, pix, mask, margin) = flex_model
    state, _, maps = prefill(params, cfg, ids, pix, mask, margin, max_len=ids.shape[1] + 1, hr_strategy="incremental")
    first = cfg.flex.first_select_layer
    projected = np.asarray(state.hr_kv.projected)  # (Lh, B, M)
    used = np.asarray(maps.hr_masks)[first:-1]  # masks feeding the hierarchical layers
    np.testing.assert_array_equal(projected, used)
    full = jax.device_get(prefill(params, cfg, ids, pix, mask, margin, max_len=ids.shape[1] + 1, hr_strategy="cache")[0].hr_kv)
    k = np.asarray(state.hr_kv.k)
    np.testing.assert_allclose(k[projected], np.asarray(full.k)[projected], rtol=1e-5, atol=1e-5)
    assert not np.abs(k[~projected]).any()  # never written
