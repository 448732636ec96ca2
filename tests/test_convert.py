"""Converter tests on tiny random transformers models: every layout x format, round trips, logit parity, bad input."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import CLIPVisionModel, LlavaForConditionalGeneration

from convert import ConvertError, convert_checkpoint, export_hf, read_checkpoint
from convert.cli import main
from convert.mapping import BY_OURS, RULES, lookup, to_torch
from flexattn_jax.checkpoint import CheckpointError, load_converted, read_metadata, write_model
from flexattn_jax.config import FlexConfig, ModelConfig
from flexattn_jax.model import forward
from flexattn_jax.params import abstract_params, flatten, init_params
from flexattn_jax.presets import release_extra
from tests.fixtures import tiny_config
from tests.oracle import OracleFlexConfig, oracle_forward
from tests.torch_models import make_hd_weights, make_images, make_prompt, make_tiny_llava

LAYOUTS = ("hf4", "hf5", "original", "flexattn")
FORMATS = ("safetensors", "sharded", "bin")
FLEX_LAYERS = 10  # FlexConfig.first_select_layer defaults to 8; layer 9 is then hierarchical
EXTRA = release_extra(56)  # the release recipe at the tiny CLIP input
V, P, T = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."


# ---- building source checkpoints (written here independently of convert.mapping) -------------------

@pytest.fixture(scope="module")
def models():
    """The llava-hf model (2 decoder layers) and the FlexAttention one (10 layers + k/v_proj_hd)."""
    plain = make_tiny_llava(gqa=True, layers=2, seed=0)
    flex = make_tiny_llava(gqa=True, layers=FLEX_LAYERS, seed=1)
    return {"plain": plain, "flex": flex, "hd": make_hd_weights(flex, seed=2)}


def canonical_sd(models, layout: str) -> dict[str, torch.Tensor]:
    """The torch tensors in transformers 5.x names (plus k/v_proj_hd for the FlexAttention layout)."""
    model = models["flex" if layout == "flexattn" else "plain"]
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout == "flexattn":
        for i, (k, v) in models["hd"].items():
            sd[f"{T}layers.{i}.self_attn.k_proj_hd.weight"] = k.clone()
            sd[f"{T}layers.{i}.self_attn.v_proj_hd.weight"] = v.clone()
    return sd


def _rename(sd: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                k = k2
                break
        out[k] = v
    return out


def layout_sd(sd: dict, layout: str, vision_inside: bool = False) -> tuple[dict, dict]:
    """(main state dict, separate CLIP state dict in 4.x names) as the layout stores them."""
    if layout == "hf5":
        return dict(sd), {}
    if layout == "hf4":
        rules = [
            (r"^model\.language_model\.", "language_model.model."),
            (r"^lm_head\.", "language_model.lm_head."),
            (r"^model\.vision_tower\.", "vision_tower.vision_model."),
            (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        ]
        return _rename(sd, rules), {}
    main_sd = {k: v for k, v in sd.items() if not k.startswith(V)}
    rules = [
        (r"^model\.language_model\.", "model."),
        (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    ]
    main_sd = _rename(main_sd, rules)
    main_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # a 4.x-era buffer: ignored
    vision = {"vision_model." + k[len(V):]: v for k, v in sd.items() if k.startswith(V)}
    if vision_inside:
        main_sd.update({"model.vision_tower.vision_tower." + k: v for k, v in vision.items()})
        return main_sd, {}
    vision["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # an old buffer: ignored
    vision["text_model.final_layer_norm.weight"] = torch.ones(8)  # a full CLIPModel directory: ignored
    vision["logit_scale"] = torch.tensor(2.0)
    return main_sd, vision


def write_weights(directory: Path, sd: dict, fmt: str, shards: int = 3) -> None:
    """Write ``sd`` as model.safetensors, sharded safetensors + index, or pytorch_model(.bin | shards + index)."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
    else:
        keys = list(sd)
        ext = "bin" if fmt == "bin-sharded" else "safetensors"
        stem = "pytorch_model" if ext == "bin" else "model"
        weight_map = {}
        for s in range(shards):
            name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
            part = {k: sd[k] for k in keys[s::shards]}
            weight_map.update(dict.fromkeys(part, name))
            if ext == "bin":
                torch.save(part, directory / name)
            else:
                safetensors.torch.save_file(part, directory / name, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def original_config(model, flex: bool, vision_tower: str = "openai/clip-vit-large-patch14-336") -> dict:
    tc = model.config.text_config
    d = {k: getattr(tc, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act")}
    d.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", rope_theta=10000.0, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, mm_vision_tower=vision_tower, mm_projector_type="mlp2x_gelu",
             mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_hidden_size=model.config.vision_config.hidden_size,
             torch_dtype="float32")
    if flex:
        d["extra"] = EXTRA
    return d


def make_source(root: Path, models, layout: str, fmt: str, vision_inside: bool = False) -> tuple[Path, Path | None, dict]:
    """Write a checkpoint of ``layout`` in ``fmt``; returns (dir, CLIP dir or None, canonical state dict)."""
    sd = canonical_sd(models, layout)
    main_sd, vision = layout_sd(sd, layout, vision_inside)
    src = root / f"{layout}-{fmt}"
    write_weights(src, main_sd, fmt)
    model = models["flex" if layout == "flexattn" else "plain"]
    clip_dir = None
    if layout in ("hf4", "hf5"):
        model.config.to_json_file(src / "config.json")
    else:
        (src / "config.json").write_text(json.dumps(original_config(model, layout == "flexattn")))
        clip_dir = root / f"clip-{layout}-{fmt}"
        clip_dir.mkdir()
        model.config.vision_config.to_json_file(clip_dir / "config.json")
        if vision:
            write_weights(clip_dir, vision, "safetensors")
    return src, clip_dir, sd


def check_tensors(params: dict, sd: dict[str, torch.Tensor]) -> None:
    """Every source tensor is exactly at the leaf (slice) the table names, and every leaf slice is covered."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    covered = set()
    for key, t in sd.items():
        target = lookup(key)
        assert target is not None, key
        x = flat[target.leaf] if target.index is None else flat[target.leaf][target.index]
        np.testing.assert_array_equal(to_torch(target.rule.kind)(x).astype(np.float32), t.float().numpy(), err_msg=key)
        covered.add((target.leaf, target.index))
    want = {(leaf, i) for leaf, x in flat.items() for i in (range(x.shape[0]) if BY_OURS[leaf].stacked else [None])}
    assert covered == want
    # a few placements spelled out by hand
    def w(key: str) -> np.ndarray:
        return sd[key].float().numpy()

    f = {k: v.astype(np.float32) for k, v in flat.items()}
    np.testing.assert_array_equal(f["text/layers/attn/q/kernel"][1], w(f"{T}layers.1.self_attn.q_proj.weight").T)
    conv = w(V + "embeddings.patch_embedding.weight")
    np.testing.assert_array_equal(f["vision/patch_embed/kernel"], conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(f["vision/layers/attn/o/bias"][1], w(V + "encoder.layers.1.self_attn.out_proj.bias"))
    np.testing.assert_array_equal(f["projector/linear_2/kernel"], w(P + "linear_2.weight").T)
    np.testing.assert_array_equal(f["text/lm_head/kernel"], w("lm_head.weight").T)
    np.testing.assert_array_equal(f["vision/class_embed"], w(V + "embeddings.class_embedding"))
    if f"{T}layers.0.self_attn.k_proj_hd.weight" in sd:
        np.testing.assert_array_equal(f["text/layers/attn/v_hr/kernel"][3], w(f"{T}layers.3.self_attn.v_proj_hd.weight").T)


def no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---- the table ---------------------------------------------------------------------------------

def test_table_covers_the_tree():
    """Every leaf of the full trees (flex, mlp2x, untied lm_head; CLIP + Llama and SigLIP + Qwen2's biases) has exactly
    one rule, and nothing else does."""
    import dataclasses

    from flexattn_jax.config import TextConfig, VisionConfig

    full = ModelConfig(flex=FlexConfig(enabled=True))
    other = dataclasses.replace(full, vision=VisionConfig(model_type="siglip"), text=TextConfig(model_type="qwen2", attention_bias=True),
                                vision_feature_select_strategy="full")
    leaves = set(flatten(abstract_params(full))) | set(flatten(abstract_params(other)))
    assert leaves == {r.ours for r in RULES}
    assert len(RULES) == len(leaves)


# ---- every layout x every format ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_import_layout_format(tmp_path, models, layout, fmt):
    src, clip_dir, sd = make_source(tmp_path, models, layout, fmt)
    conv = read_checkpoint(src, vision_tower=clip_dir, progress=False)
    assert conv.layout == layout
    assert conv.cfg.flex.enabled == (layout == "flexattn")
    check_tensors(conv.params, sd)


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_import_transformers_save_pretrained(tmp_path, models, shard):
    """What transformers 5.x save_pretrained writes (4.x-style names, `vision_tower.` without `vision_model.`)."""
    kw = {} if shard is None else {"max_shard_size": shard}
    models["plain"].save_pretrained(tmp_path / "hf", **kw)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    conv = read_checkpoint(tmp_path / "hf", progress=False)
    check_tensors(conv.params, canonical_sd(models, "hf5"))


def test_import_vision_inside_and_clip_save_pretrained(tmp_path, models):
    """Original layout with `model.vision_tower.vision_tower.vision_model.*` inside; a 5.x CLIPVisionModel dir; .bin shards."""
    src, clip_dir, sd = make_source(tmp_path, models, "original", "bin-sharded", vision_inside=True)
    conv = read_checkpoint(src, vision_tower=clip_dir, progress=False)  # clip_dir has only config.json
    check_tensors(conv.params, sd)
    assert conv.vision_source is None
    # the CLIP tower from a transformers CLIPVisionModel.save_pretrained directory (5.x: keys without `vision_model.`)
    src2, _, _ = make_source(tmp_path / "b", models, "original", "safetensors")
    clip = CLIPVisionModel(models["plain"].config.vision_config)
    clip.load_state_dict({k[len(V):]: v for k, v in sd.items() if k.startswith(V)})
    clip.save_pretrained(tmp_path / "clip5")
    check_tensors(read_checkpoint(src2, vision_tower=tmp_path / "clip5", progress=False).params, sd)


def test_dtypes(tmp_path, models):
    """bf16 source -> bf16 (exact) and -> f32 (exact); fp16 .bin source -> f32 (exact)."""
    sd = canonical_sd(models, "hf5")
    for name, dt, fmt in (("bf16", torch.bfloat16, "safetensors"), ("f16", torch.float16, "bin")):
        src = tmp_path / name
        write_weights(src, {k: v.to(dt) for k, v in sd.items()}, fmt)
        models["plain"].config.to_json_file(src / "config.json")
        want = {k: v.to(dt) for k, v in sd.items()}
        check_tensors(read_checkpoint(src, progress=False).params, want)
        if dt == torch.bfloat16:
            conv = read_checkpoint(src, dtype="bfloat16", progress=False)
            assert conv.cfg.param_dtype == "bfloat16"
            assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(conv.params))
            check_tensors(conv.params, want)


# ---- orbax output, metadata, round trips -------------------------------------------------------------

def _logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits.numpy()


def test_roundtrip_hf(tmp_path, models):
    """torch -> ours (orbax) -> HF export (hf5, hf4) -> transformers loads it: identical tensors and logits."""
    model = models["plain"]
    src, _, sd = make_source(tmp_path, models, "hf4", "sharded")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    out = convert_checkpoint(src, tmp_path / "conv", progress=False)
    meta = read_metadata(out)
    assert meta["source_layout"] == "hf4" and meta["converter_version"] and meta["source"] == str(src.resolve())
    assert ModelConfig.from_dict(meta["model_config"]) == read_checkpoint(src, progress=False).cfg
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    params, cfg = load_converted(out)
    check_tensors(params, sd)
    ids, px = make_prompt(model), make_images(1, 56)
    ref = _logits(model, ids, px)
    for layout in ("hf5", "hf4"):
        export_hf(params, cfg, tmp_path / layout, layout=layout, tokenizer_dir=out)
        keys = safetensors.torch.load_file(tmp_path / layout / "model.safetensors")
        assert any(k.startswith("language_model.model." if layout == "hf4" else T) for k in keys)
        m2, info = LlavaForConditionalGeneration.from_pretrained(
            tmp_path / layout, output_loading_info=True, attn_implementation="eager"
        )
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        sd2 = m2.state_dict()
        assert set(sd2) == set(sd)
        for k, v in sd.items():
            assert torch.equal(sd2[k], v), k
        np.testing.assert_array_equal(_logits(m2.eval(), ids, px), ref)
        assert (tmp_path / layout / "tokenizer.json").exists()


def test_roundtrip_bf16_export(tmp_path, models):
    """A bf16 conversion exports bf16 tensors that transformers loads unchanged."""
    sd = {k: v.to(torch.bfloat16) for k, v in canonical_sd(models, "hf5").items()}
    src = tmp_path / "src"
    write_weights(src, sd, "safetensors")
    models["plain"].config.to_json_file(src / "config.json")
    conv = read_checkpoint(src, dtype="bfloat16", progress=False)
    export_hf(conv.params, conv.cfg, tmp_path / "hf", layout="hf5")
    m2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    sd2 = m2.state_dict()
    for k, v in sd.items():
        assert sd2[k].dtype == torch.bfloat16 and torch.equal(sd2[k], v), k


def test_roundtrip_tied(tmp_path):
    """tie_word_embeddings: no lm_head leaf; a stray lm_head.weight in the source is ignored; the export loads tied."""
    model = make_tiny_llava(gqa=False, tied=True, layers=1, seed=4)
    model.save_pretrained(tmp_path / "src")
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    on_disk = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    on_disk["language_model.lm_head.weight"] = sd[T + "embed_tokens.weight"].clone()
    safetensors.torch.save_file(on_disk, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    conv = read_checkpoint(tmp_path / "src", progress=False)
    assert conv.cfg.text.tie_word_embeddings and "lm_head" not in conv.params["text"]
    export_hf(conv.params, conv.cfg, tmp_path / "hf", layout="hf4")
    m2, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert m2.lm_head.weight.data_ptr() == m2.model.language_model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("layout", ["original", "flexattn"])
def test_roundtrip_original(tmp_path, models, layout):
    """original / FlexAttention -> ours -> 'original' export -> the same keys and tensors -> ours again."""
    src, clip_dir, sd = make_source(tmp_path, models, layout, "safetensors")
    conv = read_checkpoint(src, vision_tower=clip_dir, progress=False)
    export_hf(conv.params, conv.cfg, tmp_path / "exp", layout="original")
    main_sd, vision = layout_sd(sd, layout)
    main_sd.pop("model.layers.0.self_attn.rotary_emb.inv_freq")
    for k in ("vision_model.embeddings.position_ids", "text_model.final_layer_norm.weight", "logit_scale"):
        vision.pop(k)
    for path, want in (("model.safetensors", main_sd), ("vision_tower/model.safetensors", vision)):
        got = safetensors.torch.load_file(tmp_path / "exp" / path)
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
    clip, info = CLIPVisionModel.from_pretrained(tmp_path / "exp" / "vision_tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again = read_checkpoint(tmp_path / "exp", progress=False)  # mm_vision_tower points at ./vision_tower
    assert again.cfg == conv.cfg and again.layout == layout
    check_tensors(again.params, sd)


# ---- logit parity with our forward ---------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_logit_parity(tmp_path, models, layout):
    """Our forward on the converted params matches the torch model (fp32; FlexAttention: the torch oracle)."""
    src, clip_dir, _ = make_source(tmp_path, models, layout, "safetensors")
    conv = read_checkpoint(src, vision_tower=clip_dir, progress=False)
    model = models["flex" if layout == "flexattn" else "plain"]
    ids = make_prompt(model)
    if layout == "flexattn":
        px = make_images(1, 168, seed=3)
        ocfg = OracleFlexConfig(lowres_size=56, highres_size=168, zoom_ratio=3, threshold=48.0, first_select_layer=8)
        ref = oracle_forward(model, models["hd"], ocfg, ids, px, [(168, 168)])["logits"].numpy()
    else:
        px = make_images(1, 56, seed=3)
        ref = _logits(model, ids, px)
    ours_ids = ids.numpy().copy()
    ours_ids[ours_ids == model.config.image_token_id] = conv.cfg.image_token_id  # -200 for the original layouts
    with jax.default_matmul_precision("highest"):
        got = forward(conv.params, conv.cfg, jnp.asarray(ours_ids), jnp.asarray(px.permute(0, 2, 3, 1).numpy())).logits
    err = float(np.max(np.abs(np.asarray(got) - ref)))
    assert err <= 1e-5 * float(np.max(np.abs(ref))), err


# ---- load_converted options -----------------------------------------------------------------------

def test_load_converted_dtype_and_sharding(tmp_path, models):
    src, _, sd = make_source(tmp_path, models, "hf5", "safetensors")
    out = convert_checkpoint(src, tmp_path / "conv", progress=False)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, cfg = load_converted(out, dtype="bfloat16", sharding=sharding)
    assert cfg.param_dtype == "bfloat16"
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.bfloat16 and x.sharding == sharding for x in leaves)
    want = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    check_tensors(jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32)), params), {k: v.float() for k, v in want.items()})


def test_truncated_params_fail_in_one_message_and_leave_no_echoes(tmp_path, caplog):
    """Orbax's sibling reads of a failed restore are never retrieved: asyncio would log each (a page of TensorStore
    specs) whenever they are collected, into the output of whatever runs next in the process (CI saw one in a later
    test's one-line stderr)."""
    cfg = tiny_config()
    d = write_model(init_params(cfg, jax.random.key(0)), cfg, tmp_path / "m", {"source_format": "test"}, lambda p: [])
    data = max((p for p in (d / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])

    def fail() -> str:  # the error, its traceback and the read tasks it holds are dropped on return
        with pytest.raises(CheckpointError) as e:
            load_converted(d)
        return str(e.value)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(3):
            assert re.fullmatch(rf"{re.escape(str(d.resolve()))}/params: cannot restore the parameters .*", fail())
        gc.collect()
    assert not [r.getMessage()[:200] for r in caplog.records if r.name == "asyncio"]


_MESH_SCRIPT = """
import sys
import numpy as np
from convert import convert_checkpoint, read_checkpoint
from flexattn_jax.checkpoint import load_converted
from flexattn_jax.params import flatten
from flexattn_jax.sharding import make_mesh
src, out = sys.argv[1], sys.argv[2]
convert_checkpoint(src, out, mesh="data=1,fsdp=2,tensor=1", progress=False)
mesh = make_mesh("data=1,fsdp=2,tensor=1")
params, _ = load_converted(out, sharding=mesh)
want = flatten(read_checkpoint(src, progress=False).params)
sharded = 0
for k, x in flatten(params).items():
    assert x.sharding.mesh.shape == mesh.shape, k
    sharded += len({str(s.index) for s in x.addressable_shards}) > 1
    np.testing.assert_array_equal(np.asarray(x), want[k], err_msg=k)
assert sharded > 0
print("OK", sharded)
"""


def test_mesh(tmp_path, models):
    """--mesh places the params on a 2-device (host) mesh before saving; load_converted(sharding=mesh) restores them."""
    import os
    import subprocess
    import sys

    src, _, _ = make_source(tmp_path, models, "hf5", "safetensors")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(src), str(tmp_path / "conv")], capture_output=True,
                          text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ---- bad input --------------------------------------------------------------------------------------

def _fails(src: Path, out: Path, *needles: str, vision_tower: Path | None = None) -> str:
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(src, out, vision_tower=vision_tower, progress=False)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    no_leftovers(out.parent, out.name)
    return msg


def test_bad_truncated(tmp_path, models):
    src, _, _ = make_source(tmp_path, models, "hf5", "safetensors")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(src, tmp_path / "out", str(f), "truncated")
    f.write_bytes(f.read_bytes()[:20])
    _fails(src, tmp_path / "out", str(f), "truncated")


def test_bad_keys_one_error(tmp_path, models):
    """A missing, an extra, an out-of-range layer and a misshaped key: one error listing all of them."""
    sd = canonical_sd(models, "hf5")
    sd.pop(f"{T}layers.1.mlp.up_proj.weight")
    sd[f"{T}layers.0.self_attn.bogus.weight"] = torch.zeros(3)
    sd[f"{T}layers.7.input_layernorm.weight"] = torch.zeros(64)
    sd[V + "encoder.layers.0.mlp.fc1.weight"] = torch.zeros(64, 31)
    src = tmp_path / "src"
    write_weights(src, sd, "safetensors")
    models["plain"].config.to_json_file(src / "config.json")
    msg = _fails(src, tmp_path / "out", "missing (1)", f"{T}layers.1.mlp.up_proj.weight [128, 64]", "unexpected (2)",
                 f"{T}layers.0.self_attn.bogus.weight [3]", "layer 7, but the config has 2 layers", "wrong shape (1)",
                 f"{V}encoder.layers.0.mlp.fc1.weight: expected [64, 32], found [64, 31]", str(src / "model.safetensors"))
    assert msg.count("\n") < 20


def test_bad_index_missing_shard(tmp_path, models):
    src, _, _ = make_source(tmp_path, models, "hf4", "sharded")
    (src / "model-00002-of-00003.safetensors").unlink()
    _fails(src, tmp_path / "out", "model.safetensors.index.json", "model-00002-of-00003.safetensors")


def test_bad_pickle(tmp_path, models):
    src, _, _ = make_source(tmp_path, models, "hf5", "bin")
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd["evil"] = ModelConfig  # a class: refused by weights_only=True
    torch.save(sd, src / "pytorch_model.bin")
    _fails(src, tmp_path / "out", str(src / "pytorch_model.bin"), "weights_only")


def test_bad_layout_specific(tmp_path, models):
    """FlexAttention weights without `extra`; no vision tower for the original layout; an existing OUT."""
    src, clip_dir, _ = make_source(tmp_path, models, "flexattn", "safetensors")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["extra"]
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(src, tmp_path / "out", "k_proj_hd.weight", "no 'extra' with zoom_ratio", vision_tower=clip_dir)
    src2, _, _ = make_source(tmp_path, models, "original", "safetensors")
    _fails(src2, tmp_path / "out", "--vision-tower")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConvertError, match="already exists"):
        convert_checkpoint(src2, tmp_path / "exists", progress=False)


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli(tmp_path, models, capsys):
    src, clip_dir, sd = make_source(tmp_path, models, "original", "safetensors")
    assert main([str(src), str(tmp_path / "conv"), "--vision-tower", str(clip_dir), "--no-progress", "--dtype", "float32",
                 "--to-hf", str(tmp_path / "orig"), "--layout", "original"]) == 0
    assert "source layout original" in capsys.readouterr().out
    check_tensors(read_checkpoint(tmp_path / "orig", progress=False).params, sd)
    assert main(["export", str(tmp_path / "conv"), str(tmp_path / "hf"), "--image-token-id", "127"]) == 0
    m2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in sd.items())
    assert main(["export", str(tmp_path / "conv"), str(tmp_path / "hf2")]) == 2  # -200 is no vocabulary id
    assert "image_token_id=-200" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "conv")
    assert main([str(src), str(tmp_path / "conv"), "--no-progress"]) == 2
    assert "--vision-tower" in capsys.readouterr().err
    no_leftovers(tmp_path, "conv")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export CONVERTED OUT_HF" in capsys.readouterr().out
