"""The LLaVA-family bases beside LLaVA-1.5 (Llama-3, Mistral, Qwen2 decoders; CLIP and SigLIP towers) against
transformers' ``LlavaForConditionalGeneration``, plain and with FlexAttention added, on tiny random models."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import read_checkpoint
from convert.export import export_hf
from flexattn_jax.config import ConfigError
from flexattn_jax.generate import generate
from flexattn_jax.hf_config import from_hf_config
from flexattn_jax.model import forward
from flexattn_jax.params import add_hr_projections
from flexattn_jax.selection import margin_patches

from .jax_models import convert_torch_model, with_flex
from .oracle import OracleFlexConfig, oracle_forward, oracle_generate
from .torch_models import BASES, grid_side, make_images, make_prompt, make_tiny_base

FAST = ("llama3-clip", "mistral-clip", "qwen2-siglip")  # llama3-siglip: the fourth pairing, slow-marked where heavy
ALL = [*FAST, pytest.param("llama3-siglip", marks=pytest.mark.slow)]
assert set(BASES) == set(FAST) | {"llama3-siglip"}


def one_fast(fast: str = "qwen2-siglip") -> list:
    """Every base, all but ``fast`` slow-marked: for the heavy tests (qwen2-siglip: biases, no class token, a 5 x 5 grid)."""
    return [name if name == fast else pytest.param(name, marks=pytest.mark.slow) for name in BASES]


@pytest.fixture(scope="module", params=ALL)
def base(request):
    """(name, torch model, our params, cfg) of one base, converted through a llava-hf save."""
    model = make_tiny_base(request.param)
    params, cfg = convert_torch_model(model)
    return request.param, model, params, cfg


def _close(got, want, tol=1e-5, valid=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want) if valid is None else np.abs(got - want)[valid]
    assert diff.max() <= tol * np.abs(want).max(), f"max |diff| {diff.max():.3g} > {tol} x {np.abs(want).max():.3g}"


def _left_padded_batch(model, seed=0):
    """Two prompts of different lengths, the shorter left-padded; NCHW pixels of the tower's size."""
    a, b = make_prompt(model, 5, 6, seed=seed + 1)[0], make_prompt(model, 2, 3, seed=seed + 2)[0]
    pad = len(a) - len(b)
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=b.dtype), b])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    size = model.config.vision_config.image_size
    return ids, mask, make_images(2, size, seed=seed + 3)


def test_config_reads_each_family(base):
    name, model, _, cfg = base
    decoder, tower = name.split("-")
    t, v = cfg.text, cfg.vision
    assert t.model_type == {"llama3": "llama"}.get(decoder, decoder) and v.model_type == tower
    assert t.num_kv_heads < t.num_heads  # GQA on every base
    assert (t.rope_scaling_type, t.rope_theta) == (("llama3", 500000.0) if decoder == "llama3" else ("default", t.rope_theta))
    assert t.attention_bias == (decoder == "qwen2") and t.tie_word_embeddings == (decoder == "qwen2")
    assert t.sliding_window == (64 if decoder == "mistral" else None)
    assert t.rms_norm_eps == model.config.text_config.rms_norm_eps
    assert cfg.num_image_tokens == grid_side(model) ** 2 and v.class_token == (tower == "clip")


def test_plain_logits_match_transformers_with_left_padding(base):
    _, model, params, cfg = base
    ids, mask, pix = _left_padded_batch(model)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pix, attention_mask=mask, output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out = forward(params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                      jnp.asarray(mask.numpy().astype(bool)), return_hidden=True)
    valid = mask.numpy().astype(bool)
    _close(out.logits, ref.logits.numpy(), valid=valid)
    for i, h in enumerate(ref.hidden_states):
        _close(out.hidden_states[i], h.numpy(), valid=valid)


def test_greedy_generation_with_cache_matches_transformers_generate(base):
    _, model, params, cfg = base
    ids, mask, pix = _left_padded_batch(model, seed=4)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=6, do_sample=False,
                             pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)[:, ids.shape[1]:].numpy()
    with jax.default_matmul_precision("highest"):
        out = generate(params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                       jnp.asarray(mask.numpy().astype(bool)), max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def _flex(base, **oracle_kwargs):
    """FlexAttention added with k_hr/v_hr copied from k/v (``add_hr_projections``), and the oracle's HR weights: the same copies."""
    _, model, params, cfg = base
    lr = model.config.vision_config.image_size
    oc = OracleFlexConfig(lowres_size=lr, highres_size=3 * lr, first_select_layer=1, **{"threshold": 48, **oracle_kwargs})
    copied = add_hr_projections(params, "copy")
    layers = model.model.language_model.layers
    hd = {}
    for i, layer in enumerate(layers):
        k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
        hd[i] = tuple(w.detach() for w in (k.weight, v.weight) + (() if k.bias is None else (k.bias, v.bias)))
    flex_params, flex_cfg = with_flex(params, cfg, hd, oc)
    for name in ("k_hr", "v_hr"):  # add_hr_projections made exactly what the oracle is given
        for leaf, x in copied["text"]["layers"]["attn"][name].items():
            np.testing.assert_array_equal(np.asarray(x), np.asarray(flex_params["text"]["layers"]["attn"][name][leaf]))
    return model, hd, oc, copied, flex_cfg


def _flex_forward(params, cfg, ids, pix, ori, mask=None, **kw):
    with jax.default_matmul_precision("highest"):
        return forward(params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                       None if mask is None else jnp.asarray(mask.numpy().astype(bool)),
                       margin=jnp.asarray(margin_patches(np.array(ori), cfg.lr_grid)), return_maps=True, **kw)


def _check_masks(ref, out):
    for b, per_layer in enumerate(ref["masks"]):
        for layer, m in per_layer.items():
            np.testing.assert_array_equal(np.asarray(out.hr_masks[layer, b])[: m.shape[0]], m.numpy(), err_msg=f"sample {b} layer {layer}")


def test_hierarchical_attention_matches_the_dense_reference(base):
    """Inference on a left-padded batch and training rows at alpha 0.3: logits and every layer's HR mask equal the oracle's."""
    model, hd, oc, params, cfg = _flex(base)
    size = oc.highres_size
    a, b = make_prompt(model, 5, 6, seed=1), make_prompt(model, 2, 4, seed=2)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=b.dtype), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pix, ori = make_images(2, size, seed=3), [(400, 260), (300, 300)]
    with torch.no_grad():
        ref = oracle_forward(model, hd, oc, ids, pix, ori, attention_mask=mask)
    assert sum(m.sum().item() for per in ref["masks"] for m in per.values()) > 0  # something is selected
    out = _flex_forward(params, cfg, ids, pix, ori, mask)
    _close(out.logits, ref["logits"].numpy(), valid=mask.numpy().astype(bool))
    _check_masks(ref, out)

    ids = make_prompt(model, 4, 10)
    labels = torch.full_like(ids, -100)
    labels[0, -8:-5], labels[0, -3:] = ids[0, -8:-5], ids[0, -3:]
    pix, ori = make_images(1, size, seed=5), [(150, 500)]
    with torch.no_grad():
        ref = oracle_forward(model, hd, oc, ids, pix, ori, labels=labels, alpha=0.3)
    rows = np.nonzero(labels[0, 1:].numpy() != -100)[0].astype(np.int32)[None]
    out = _flex_forward(params, cfg, ids, pix, ori, select_rows=jnp.asarray(rows), alpha=0.3)
    _close(out.logits, ref["logits"].numpy())
    _check_masks(ref, out)


@pytest.mark.parametrize("strategy", ["project", pytest.param("incremental", marks=pytest.mark.slow)])
def test_flex_cached_generation_matches_the_reference(base, strategy):
    model, hd, oc, params, cfg = _flex(base)
    ids, pix, ori = make_prompt(model), make_images(1, oc.highres_size), [(400, 260)]
    with torch.no_grad():
        ref = oracle_generate(model, hd, oc, ids, pix, ori, max_new_tokens=5)
    with jax.default_matmul_precision("highest"):
        out = generate(params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                       jnp.ones(ids.shape, bool), jnp.asarray(margin_patches(np.array(ori), cfg.lr_grid)), max_new_tokens=5,
                       hr_strategy=strategy, return_logits=True)
    assert np.asarray(out.tokens[0]).tolist() == list(ref["tokens"])
    for step, want in enumerate(ref["step_logits"]):
        _close(out.step_logits[step, 0], want.numpy())


@pytest.mark.parametrize("name", one_fast())
def test_every_attention_impl_agrees(name):
    """xla (dense, the reference), xla_chunked and splash (interpret on CPU): inference and training rows."""
    model, _, oc, params, cfg = _flex((name, *_converted(name)))
    ids, pix, ori = make_prompt(model), make_images(1, oc.highres_size), [(400, 260)]
    rows = jnp.asarray(np.arange(ids.shape[1] - 6, ids.shape[1] - 1, dtype=np.int32)[None])
    outs = {}
    for impl in ("xla", "xla_chunked", "splash"):
        c = dataclasses.replace(cfg, attention_impl=impl)
        outs[impl] = (_flex_forward(params, c, ids, pix, ori), _flex_forward(params, c, ids, pix, ori, select_rows=rows, alpha=0.5))
    for impl in ("xla_chunked", "splash"):
        for got, want in zip(outs[impl], outs["xla"], strict=True):
            _close(got.logits, want.logits)
            np.testing.assert_array_equal(np.asarray(got.hr_masks), np.asarray(want.hr_masks))


@pytest.mark.parametrize("name", one_fast())
def test_train_step_on_an_fsdp_mesh(name):
    """Three steps of the sharded train step (fsdp=8) on a converted base with FlexAttention: finite, loss falls, sharded."""
    from flexattn_jax.sharding import make_mesh
    from tests.fixtures import small_train_config, synthetic_batch
    from train.step import global_batch, make_step, split_microbatches

    model, _, _, params, cfg = _flex((name, *_converted(name)))
    cfg = dataclasses.replace(cfg, image_token_id=1, pad_token_id=0)  # synthetic_batch draws text ids above both
    batch = synthetic_batch(cfg, 8, cfg.num_image_tokens + 16, seed=1)
    tcfg = small_train_config(steps=3)
    fns = make_step(cfg, tcfg, make_mesh("data=1,fsdp=8,tensor=1"), tcfg.steps)
    state = fns.init_state(params)
    losses = []
    for _ in range(3):
        state, m = fns.step(state, global_batch(fns, split_microbatches(batch, 1)))
        m = jax.device_get(m)
        assert bool(m["finite"])
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses
    k_hr = state.params["text"]["layers"]["attn"]["k_hr"]["kernel"]
    assert k_hr.sharding.spec == fns.param_shardings["text"]["layers"]["attn"]["k_hr"]["kernel"].spec
    assert "fsdp" in str(k_hr.sharding.spec)


def _converted(name):
    model = make_tiny_base(name)
    params, cfg = convert_torch_model(model)
    return model, params, cfg


@pytest.mark.parametrize("layout", ["hf5", "hf4"])
def test_round_trip_convert_export_transformers(base, layout, tmp_path):
    """convert -> export -> transformers loads it (strictly: no missing or unexpected keys) with the same logits;
    the FlexAttention model exports too, its k/v_proj_hd (and biases) read back by the converter."""
    from transformers import LlavaForConditionalGeneration

    _, model, params, cfg = base
    export_hf(jax.tree.map(np.asarray, params), cfg, tmp_path / "hf", layout=layout)
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back.model.language_model) is type(model.model.language_model)
    assert type(back.model.vision_tower) is type(model.model.vision_tower)
    back = back.float().eval()
    back.set_attn_implementation("eager")
    ids, mask, pix = _left_padded_batch(model)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pix, attention_mask=mask).logits.numpy()
        got = back(input_ids=ids, pixel_values=pix, attention_mask=mask).logits.numpy()
    np.testing.assert_array_equal(got, want)
    if layout == "hf5":
        _, _, _, fparams, fcfg = _flex(base)
        export_hf(jax.tree.map(np.asarray, fparams), fcfg, tmp_path / "flex", layout=layout,
                  image_token_id=cfg.image_token_id)
        again = read_checkpoint(tmp_path / "flex", progress=False, overrides=["flex.first_select_layer=1"])
        assert again.cfg.flex.enabled and again.cfg.text == fcfg.text and again.cfg.vision == fcfg.vision
        for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(fparams), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- refusals -----------------------------------------------------------------------------------

def _hf_dict(name="llama3-clip"):
    return make_tiny_base(name, layers=1).config.to_dict()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["text_config"].update(model_type="gemma"), r"decoder model_type='gemma' is not supported \(llama, mistral, qwen2\)"),
    (lambda d: d["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     r"rope scaling type 'yarn' is not supported"),
    (lambda d: d["text_config"].update(rope_parameters=None, rope_scaling={"type": "longrope"}), r"rope scaling type 'longrope'"),
    (lambda d: d["vision_config"].update(model_type="dinov2"), r"vision tower model_type='dinov2' is not supported"),
    (lambda d: d["vision_config"].update(model_type="siglip_vision_model", vision_use_head=True), r"vision_use_head=true"),
    (lambda d: d["text_config"].update(attention_bias=True), r"attention_bias/mlp_bias are not supported for llama"),
])
def test_unsupported_configs_are_one_line_errors_naming_the_field(edit, match):
    d = _hf_dict()
    edit(d)
    with pytest.raises(ConfigError, match=match) as e:
        from_hf_config(d)
    assert "\n" not in str(e.value)


def test_a_context_beyond_the_sliding_window_is_refused():
    model = make_tiny_base("mistral-clip", layers=1)
    params, cfg = convert_torch_model(model)
    assert cfg.text.sliding_window == 64
    ids = jnp.asarray(make_prompt(model, 30, 30).numpy())  # 76 tokens
    with pytest.raises(ValueError, match=r"context of 76 tokens exceeds text.sliding_window=64 \(sliding_window in config.json\)"):
        forward(params, cfg, ids, jnp.zeros((1, 56, 56, 3)))
    with pytest.raises(ValueError, match="exceeds text.sliding_window=64"):  # a cache longer than the window, too
        generate(params, cfg, ids[:, :40], jnp.zeros((1, 56, 56, 3)), jnp.ones((1, 40), bool), max_new_tokens=30)
    d = model.config.to_dict()
    d["text_config"]["sliding_window"] = -3
    with pytest.raises(ConfigError, match=r"text.sliding_window=-3"):
        from_hf_config(d)


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from flexattn_jax.config import TextConfig
    from flexattn_jax.text import rope_cos_sin

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
    ours = from_hf_config({"model_type": "llava", "text_config": {**hf.to_dict(), "vocab_size": 8, "intermediate_size": 8,
                                                                  "num_hidden_layers": 1},
                           "vision_config": {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                             "num_attention_heads": 1, "image_size": 28, "patch_size": 14},
                           "vision_feature_layer": -1}).text
    assert isinstance(ours, TextConfig) and ours.rope_original_max_position_embeddings == 64
    pos = np.arange(0, 400, 7)[None]
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, pos.shape[1], 256), torch.tensor(pos))
    c, s = rope_cos_sin(ours, jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(c), cos.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(s), sin.numpy(), atol=2e-5)
    plain = rope_cos_sin(dataclasses.replace(ours, rope_scaling_type="default"), jnp.asarray(pos))[0]
    assert np.abs(np.asarray(plain) - cos.numpy()).max() > 0.1  # the scaling changes the table


# ---- adding FlexAttention to a base --------------------------------------------------------------

def test_convert_add_flex_copies_k_v_and_records_the_base(tmp_path, capsys):
    """``convert --add-flex``: FlexAttention on (release recipe, --set applied first), k_hr/v_hr and their biases = k/v's;
    the metadata names the base; the model answers like the oracle with those copies (test above); a second add is refused."""
    from convert.cli import main
    from flexattn_jax.checkpoint import load_converted, read_metadata

    model = make_tiny_base("qwen2-siglip")
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert main([str(tmp_path / "hf"), str(tmp_path / "plain-fails"), "--add-flex", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--add-flex: flex.first_select_layer=8 is not a layer of a 3-layer decoder" in err and err.count("\n") == 1
    assert not (tmp_path / "plain-fails").exists()
    out = tmp_path / "flex"
    assert main([str(tmp_path / "hf"), str(out), "--add-flex", "--set", "flex.first_select_layer=1", "--no-progress"]) == 0
    meta = read_metadata(out)
    assert meta["base"] == {"decoder": "qwen2", "tower": "siglip", "flexattention": "added: k_hr/v_hr copied from k/v (convert --add-flex)"}
    params, cfg = load_converted(out)
    f = cfg.flex
    assert f.enabled and (f.zoom_ratio, f.highres_size, f.threshold, f.first_select_layer) == (3, 210, 48.0, 1)
    attn = params["text"]["layers"]["attn"]
    for hr, plain in (("k_hr", "k"), ("v_hr", "v")):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(attn[hr][leaf]), np.asarray(attn[plain][leaf]))
    assert main([str(tmp_path / "hf"), str(tmp_path / "plain"), "--no-progress"]) == 0
    assert read_metadata(tmp_path / "plain")["base"]["flexattention"] is None
    from convert.export import export_hf

    export_hf(params, cfg, tmp_path / "flex-hf", image_token_id=cfg.image_token_id)
    capsys.readouterr()
    assert main([str(tmp_path / "flex-hf"), str(tmp_path / "again"), "--add-flex", "--set", "flex.first_select_layer=1",
                 "--no-progress"]) == 2
    assert "already has FlexAttention" in capsys.readouterr().err


@pytest.mark.slow  # a train step's compile (~60 s on CPU); test_train_step_on_an_fsdp_mesh is the fast twin of the step
def test_train_hr_init_copy_normed_on_a_converted_base(tmp_path, capsys, caplog):
    """``train --hr-init copy-normed`` on a converted plain Qwen2 + SigLIP checkpoint: FlexAttention added with the
    biases (4 leaves), the RMS measured on the training images, one finite step."""
    import json

    from convert.cli import main as convert_main
    from tests.fixtures import write_llava_dataset
    from train.cli import main

    model = make_tiny_base("qwen2-siglip", vocab=512)  # the demo tokenizer's 484 tokens fit
    model.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "plain"), "--no-progress"]) == 0
    from flexattn_jax.app.demo_data import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(str(tmp_path / "tok"))
    write_llava_dataset(tmp_path / "data", seed=0, n=8, hr_size=210, obj_px=12)
    out = tmp_path / "run"
    argv = ["--checkpoint", str(tmp_path / "plain"), "--tokenizer", str(tmp_path / "tok"), "--data",
            str(tmp_path / "data" / "data.json"), "--images", str(tmp_path / "data"), "--max-len", "128", "--batch-size", "8",
            "--steps", "2", "--stop-at", "1", "--mesh", "fsdp=8", "--hr-init", "copy-normed", "--set", "flex.first_select_layer=1",
            "--out", str(out), "--no-progress", "--no-tensorboard"]
    caplog.set_level(logging.INFO, logger="train")
    assert main(argv) == 0, capsys.readouterr().err
    said = caplog.text  # train logs what it did (flexattn_jax.logs); stdout keeps the results
    assert "initialised 4 FlexAttention kernels as copies of k/v with the input norm folded in at the HR features' RMS" in said
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and np.isfinite(rec["loss"])


def test_siglip_images_are_normalised_as_its_processor_does():
    from PIL import Image
    from transformers import SiglipImageProcessor

    from flexattn_jax.config import VisionConfig
    from flexattn_jax.preprocess import image_normalization, preprocess_image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 70, 3), dtype=np.uint8))
    want = SiglipImageProcessor(size={"height": 70, "width": 70})(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got, _ = preprocess_image(img, 70, *image_normalization(VisionConfig(model_type="siglip")))
    np.testing.assert_allclose(got, want, atol=1e-5)
    clip, _ = preprocess_image(img, 70, *image_normalization(VisionConfig()))
    assert np.abs(clip - want).max() > 0.1


def test_presets_of_the_new_bases_and_their_hr_side():
    """The fit table's Llama-3-8B and Qwen2-7B FlexAttention presets load; GQA shrinks their HR K/V against Vicuna-7B's."""
    from bench.bases import rows

    by = {r["model"]: r for r in rows()}
    llama3, qwen2 = by["llava-flexattn-llama3-8b"], by["llava-flexattn-qwen2-7b"]
    assert (llama3["decoder"], llama3["tower"], llama3["kv_heads"], llama3["hr_tokens"]) == ("llama", "clip", 8, 5184)
    assert (qwen2["decoder"], qwen2["tower"], qwen2["kv_heads"]) == ("qwen2", "siglip", 4)
    assert (qwen2["lr_tokens"], qwen2["hr_tokens"]) == (729, 6561)
    assert llama3["hr_kv_vs_7b"] == 0.25  # 8 of 32 kv heads, the same M and layers
    assert qwen2["hr_kv_vs_7b"] == pytest.approx(6561 * 19 * 512 / (5184 * 23 * 4096))
    assert 7.5e9 < llama3["params"] < 9e9 and 7.5e9 < qwen2["params"] < 9e9
