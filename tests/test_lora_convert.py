"""Porting LoRA runs: a release-style PEFT output (+ non_lora_trainables.bin) converts to the merged torch model's
logits; kept adapters give the same; export-lora writes a PEFT directory peft loads; our own run merges; bad LoRA
directories are one-line errors naming file and field, with nothing written."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.cli import main as convert_main
from flexattn_jax import lora as L
from flexattn_jax.checkpoint import load_converted
from flexattn_jax.model import forward
from flexattn_jax.params import flatten

from .test_lora import PEFT_TARGETS, _inputs
from .torch_models import make_tiny_llava

RELEASE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _release_run(tmp_path, seed: int = 3):
    """BASE (a llava-hf save), LORA (peft save_pretrained + the release's non_lora_trainables.bin) and the merged torch
    model's logits on the test inputs."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llava()
    base = tmp_path / "base"
    model.save_pretrained(base)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, lora_dropout=0.05))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    lora_dir = tmp_path / "llava-lora"
    pm.save_pretrained(lora_dir)
    conf = json.loads((lora_dir / "adapter_config.json").read_text())
    conf["target_modules"] = RELEASE_TARGETS  # as the release writes it: find_all_linear_names' list
    (lora_dir / "adapter_config.json").write_text(json.dumps(conf))
    merged = pm.merge_and_unload().eval()
    proj = {k: v.clone() for k, v in merged.model.multi_modal_projector.state_dict().items()}
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in proj.items()}
    with torch.no_grad():  # the trained projector, saved under the release's PEFT-prefixed original names
        for k, v in new.items():
            merged.model.multi_modal_projector.get_parameter(k).copy_(v)
    names = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias", "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}
    torch.save({f"base_model.model.model.mm_projector.{names[k]}": v for k, v in new.items()}, lora_dir / "non_lora_trainables.bin")
    cfg = load_cfg_for_inputs(base)
    ids, pix = _inputs(cfg)
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    return base, lora_dir, ref, (ids, pix)


def load_cfg_for_inputs(base):
    from convert.importer import read_checkpoint

    return read_checkpoint(base, progress=False).cfg


def _logits(directory, ids, pix):
    params, cfg = load_converted(directory)
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1))).logits)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return _release_run(tmp_path_factory.mktemp("release"))


def test_release_lora_run_converts_to_merged_logits(tmp_path, release):
    base, lora_dir, ref, (ids, pix) = release
    assert convert_main([str(lora_dir), str(tmp_path / "merged"), "--model-base", str(base)]) == 0
    tol = 1e-5 * np.abs(ref).max()
    assert np.abs(_logits(tmp_path / "merged", ids, pix) - ref).max() <= tol
    assert convert_main([str(lora_dir), str(tmp_path / "kept"), "--model-base", str(base), "--keep-adapters"]) == 0
    assert np.abs(_logits(tmp_path / "kept", ids, pix) - ref).max() <= tol
    # export the kept adapters as PEFT: peft loads them on the untouched base and computes the same logits
    assert convert_main(["export-lora", str(tmp_path / "kept"), str(tmp_path / "peft")]) == 0
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    torch_base = LlavaForConditionalGeneration.from_pretrained(base).float().eval()
    torch_base.set_attn_implementation("eager")
    loaded = PeftModel.from_pretrained(torch_base, tmp_path / "peft").eval()
    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and sorted(conf["target_modules"]) == sorted(RELEASE_TARGETS)
    ours_kept = _logits(tmp_path / "kept", ids, pix)
    with torch.no_grad():  # the exported adapters only (the projector update lives in the model directory, not in PEFT)
        proj = load_converted(tmp_path / "kept")[0]["projector"]
        loaded.base_model.model.model.multi_modal_projector.linear_1.weight.copy_(torch.tensor(np.asarray(proj["linear_1"]["kernel"]).T))
        loaded.base_model.model.model.multi_modal_projector.linear_1.bias.copy_(torch.tensor(np.asarray(proj["linear_1"]["bias"])))
        loaded.base_model.model.model.multi_modal_projector.linear_2.weight.copy_(torch.tensor(np.asarray(proj["linear_2"]["kernel"]).T))
        loaded.base_model.model.model.multi_modal_projector.linear_2.bias.copy_(torch.tensor(np.asarray(proj["linear_2"]["bias"])))
        got = loaded(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
    assert np.abs(got - ours_kept).max() <= tol


def test_release_prefix_handling():
    from convert.lora import strip_release_prefixes

    keys = ["base_model.model.model.mm_projector.0.weight", "base_model.model.lm_head.weight"]
    assert strip_release_prefixes(keys) == {keys[0]: "model.mm_projector.0.weight", keys[1]: "lm_head.weight"}
    assert strip_release_prefixes(["model.mm_projector.0.weight"]) == {"model.mm_projector.0.weight": "model.mm_projector.0.weight"}


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    conf = json.loads((dst / "adapter_config.json").read_text())
    conf.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("case", ["missing-config", "rank", "unknown-target", "base-shape"])
def test_bad_lora_directories(case, tmp_path, release, capsys):
    import shutil

    base, lora_dir, _, _ = release
    if case == "missing-config":
        bad = tmp_path / "bad"
        shutil.copytree(lora_dir, bad)
        (bad / "adapter_config.json").unlink()
        want = ["adapter_config.json", "missing"]
    elif case == "rank":
        bad = _edit_config(lora_dir, tmp_path / "bad", r=8)
        want = ["adapter_config.json", "field 'r' is 8", "rank 4"]
    elif case == "unknown-target":
        bad = _edit_config(lora_dir, tmp_path / "bad", target_modules=["q_proj", "foo_proj"])
        want = ["adapter_config.json", "target_modules", "foo_proj"]
    else:
        small = make_tiny_llava(hidden_size=32)
        base = tmp_path / "other-base"
        small.save_pretrained(base)
        bad = lora_dir
        want = ["adapter_model.safetensors", "another base model"]
    out = tmp_path / "out"
    capsys.readouterr()
    assert convert_main([str(bad), str(out), "--model-base", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in want), err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_our_lora_run_merges_and_exports(tmp_path):
    from tests.checkpoints import write_tiny_checkpoint
    from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, small_train_config, synthetic_batch
    from train.loop import train

    base = write_tiny_checkpoint(tmp_path / "base")
    params, cfg = load_converted(base)
    lcfg = L.LoraConfig(enabled=True, rank=4, alpha=32.0, dropout=0.0)
    tcfg = small_train_config(trainable="projector", lora=lcfg, steps=2, save_every=2, async_save=False)
    batches = [synthetic_batch(cfg, TEST_BATCH, TEST_SEQ_LEN, seed=s) for s in range(2)]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    trained, _ = train(cfg, params, batches, tcfg, mesh, out_dir=tmp_path / "run", log=False)
    ids = jnp.asarray(batches[0]["input_ids"][:2])
    want = np.asarray(forward(L.scaled(trained, lcfg.scale), dataclasses.replace(cfg, param_dtype="float32"), ids).logits)
    assert convert_main(["merge-lora", "--base", str(base), "--lora", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged, mcfg = load_converted(tmp_path / "merged")
    assert not any(L.is_adapter(k) for k in flatten(merged))
    got = np.asarray(forward(merged, mcfg, ids).logits)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    assert convert_main(["export-lora", str(tmp_path / "run"), str(tmp_path / "peft"), "--layout", "original"]) == 0
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj_hd.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, cfg.text.hidden_size)
