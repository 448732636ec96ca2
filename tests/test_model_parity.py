"""LLaVA-1.5 parity against transformers' torch model (issue: foundation), fp32, highest precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flexattn_jax.model import check_image_tokens, forward, merge_image_features
from flexattn_jax.text import rope_cos_sin

from .jax_models import convert_torch_model
from .torch_models import make_tiny_llava


def _batch(cfg, size, b=2, seed=0):
    rng = np.random.default_rng(seed)
    g = cfg.num_image_tokens
    ids = rng.integers(1, 100, (b, 10 + g))
    ids[:, 3 : 3 + g] = cfg.image_token_id
    mask = np.ones_like(ids, bool)
    mask[1, :2] = False  # left padding
    pix = rng.normal(size=(b, 3, size, size)).astype(np.float32)
    return ids, mask, pix


@pytest.mark.parametrize(
    "gqa,tied,size", [(True, False, 56), (False, True, 56), (False, False, 336)], ids=["gqa-4x4", "mha-tied-4x4", "mha-24x24"]
)
def test_logits_and_hidden_states_match_transformers(gqa, tied, size):
    model = make_tiny_llava(gqa=gqa, tied=tied, image_size=size)
    params, cfg = convert_torch_model(model)
    ids, mask, pix = _batch(cfg, size)
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), attention_mask=torch.tensor(mask.astype(np.int64)),
            output_hidden_states=True,
        )
    with jax.default_matmul_precision("highest"):
        out = forward(params, cfg, jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1)), jnp.asarray(mask), return_hidden=True)
    rl = ref.logits.numpy()
    scale = np.abs(rl).max()
    assert np.abs(rl - np.asarray(out.logits))[mask].max() <= 1e-5 * scale
    assert len(ref.hidden_states) == out.hidden_states.shape[0]
    for i, h in enumerate(ref.hidden_states):
        h = h.numpy()
        assert np.abs(h - np.asarray(out.hidden_states[i]))[mask].max() <= 1e-5 * max(1.0, np.abs(h).max()), f"hidden state {i}"


def test_jit_equals_no_jit_and_scan_equals_unrolled():
    import dataclasses

    model = make_tiny_llava()
    params, cfg = convert_torch_model(model)
    ids, mask, pix = _batch(cfg, 56)
    args = (jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    with jax.default_matmul_precision("highest"):
        eager = forward(params, cfg, *args).logits
        jitted = jax.jit(forward, static_argnums=1)(params, cfg, *args).logits
        unrolled = forward(params, dataclasses.replace(cfg, scan_layers=False), *args).logits
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(unrolled), atol=1e-5)


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic"])
def test_rope_matches_transformers(rope_type):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from flexattn_jax.config import TextConfig

    params = {"rope_theta": 500.0, "rope_type": rope_type}
    if rope_type != "default":
        params["factor"] = 2.5
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32, rope_parameters=params)
    ours = TextConfig(hidden_size=64, num_heads=4, head_dim=16, rope_theta=500.0, max_position_embeddings=32,
                      rope_scaling_type=rope_type, rope_scaling_factor=2.5 if rope_type != "default" else 1.0)
    pos = np.arange(70)[None] if rope_type == "dynamic" else np.arange(20)[None] * 3
    emb = LlamaRotaryEmbedding(hf)
    cos, sin = emb(torch.zeros(1, pos.shape[1], 64), torch.tensor(pos))
    c, s = rope_cos_sin(ours, jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=2e-6)


def test_rmsnorm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from flexattn_jax.text import RMSNorm

    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32) * 3
    w = np.random.default_rng(1).normal(size=(32,)).astype(np.float32)
    ref = LlamaRMSNorm(32, eps=1e-6)
    ref.weight.data = torch.tensor(w)
    got = RMSNorm(1e-6).apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref(torch.tensor(x)).detach().numpy(), atol=1e-5)


def test_merge_places_several_images_per_sample_in_order():
    ids = np.array([[5, 9, 9, 6, 9, 9, 7], [9, 9, 1, 2, 3, 9, 9]])
    x = jnp.zeros((2, 7, 1))
    feats = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1) + 1  # 2 images x 2 tokens per sample
    out = np.asarray(merge_image_features(x, jnp.asarray(ids), feats, 9))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 4, 0], [5, 6, 0, 0, 0, 7, 8]])


def test_select_strategy_full_keeps_cls_and_feature_layer_option():
    import dataclasses

    model = make_tiny_llava()
    params, cfg = convert_torch_model(model)
    from flexattn_jax.vision import clip_features

    pix = torch.tensor(np.random.default_rng(0).normal(size=(1, 3, 56, 56)).astype(np.float32))
    with torch.no_grad():
        hs = model.model.vision_tower(pix, output_hidden_states=True).hidden_states
    for layer, strategy in [(-2, "full"), (-1, "default"), (1, "default")]:
        c = dataclasses.replace(cfg, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
        got = np.asarray(clip_features(params["vision"], c, jnp.asarray(pix.numpy().transpose(0, 2, 3, 1))))
        want = hs[layer].numpy()
        want = want if strategy == "full" else want[:, 1:]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = make_tiny_llava()
    params, cfg = convert_torch_model(model)
    ids, mask, pix = _batch(cfg, 56)
    ids_bad = ids.copy()
    ids_bad[0, 3] = 5  # one image token missing
    with pytest.raises(ValueError, match="sample 0: 15 image tokens"):
        check_image_tokens(cfg, ids_bad, 1)
    with pytest.raises(ValueError, match="sample 0"):
        forward(params, cfg, jnp.asarray(ids_bad), jnp.asarray(pix.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    with pytest.raises(ValueError, match="takes 56x56"):
        forward(params, cfg, jnp.asarray(ids), jnp.zeros((2, 64, 64, 3)), jnp.asarray(mask))
    from flexattn_jax.config import ConfigError
    from flexattn_jax.hf_config import from_hf_config

    bad = model.config.to_dict()
    del bad["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        from_hf_config(bad)


def test_flexattention_config_of_a_shallow_model_takes_overrides_before_validation():
    """The release's extra has first_select_layer 8 by default; a 4-layer model needs it overridden first."""
    from flexattn_jax.config import ConfigError
    from flexattn_jax.hf_config import from_hf_config
    from flexattn_jax.overrides import apply_overrides

    d = make_tiny_llava(layers=4).config.to_dict()
    d["extra"] = "zoom_ratio:3#threshold:48"
    with pytest.raises(ConfigError, match="first_select_layer=8"):
        from_hf_config(d)
    cfg = from_hf_config(d, overrides=["flex.first_select_layer=1", "dtype=bfloat16"])
    assert cfg.flex.enabled and cfg.flex.first_select_layer == 1 and cfg.flex.threshold == 48 and cfg.dtype == "bfloat16"
    # several fields that only make sense together change at once
    both = apply_overrides(cfg, {"flex.lowres_size": 28, "vision.image_size": 28, "flex.highres_size": 84})
    assert both.image_size == 84
    with pytest.raises(ConfigError, match="unknown config field 'flex.nope'"):
        apply_overrides(cfg, ["flex.nope=1"])
