"""Text-only batches skip the vision tower (``lax.cond`` in ``embed_inputs``), in training too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexattn_jax.params import init_params
from tests.fixtures import tiny_config
from train.step import token_loss_sums


@pytest.mark.slow
def test_text_only_batch_does_not_run_clip():
    """NaN pixels in a text-only batch: had CLIP run, its gradients would be NaN (0 x NaN); they are zero, and
    the loss and decoder gradients equal those with blank pixels. A batch with an image still encodes it."""
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(cfg.image_token_id + 1, 99, size=(2, 24)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones(ids.shape, bool), "labels": ids,
             "select_rows": jnp.zeros((2, 2), jnp.int32), "select_valid": jnp.ones((2, 2), bool)}
    shape = (2, cfg.image_size, cfg.image_size, 3)
    run = jax.jit(jax.value_and_grad(lambda p, b: token_loss_sums(p, cfg, b, jnp.float32(1.0))[0]))
    loss_nan, g_nan = run(params, {**batch, "pixel_values": jnp.full(shape, jnp.nan, jnp.float32)})
    loss_zero, g_zero = run(params, {**batch, "pixel_values": jnp.zeros(shape)})
    assert np.isfinite(float(loss_nan)) and float(loss_nan) == float(loss_zero)
    for a, b in zip(jax.tree.leaves(g_nan), jax.tree.leaves(g_zero), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_nan["vision"]))
    with_image = ids.at[0, 2:2 + cfg.num_image_tokens].set(cfg.image_token_id)
    loss_img, _ = run(params, {**batch, "input_ids": with_image, "pixel_values": jnp.full(shape, jnp.nan, jnp.float32)})
    assert np.isnan(float(loss_img))  # an image in the batch: the tower runs on its (NaN) pixels
