"""One analytic FLOP model (flexattn_jax.flops) and one chip table (flexattn_jax.chips): training's MFU and
`flexattn-jax compile`'s agree for the same step, and the model counts what the programs compute."""

import dataclasses

import jax
import pytest

from flexattn_jax import chips
from flexattn_jax import flops as F
from flexattn_jax.app import aot
from flexattn_jax.hf_config import from_hf_config
from train import loop, metrics


def _release_7b():
    return aot.program_config(from_hf_config(aot.PRESETS["llava-flexattn-7b"]), program="train")


def test_train_and_compile_report_the_same_mfu():
    cfg = _release_7b()
    batch, seq_len, rows, seconds = 16, 2048, 256, 3.7
    target = aot.parse_target("h100x8")
    compile_flops = aot.model_flops(cfg, "train", batch, seq_len, rows)
    train_flops = metrics.train_flops(cfg, batch, seq_len, rows)  # what train/loop.py counts for the step
    assert compile_flops == train_flops
    # train/loop.py's record of that step on that many devices of the device's peak
    peak_tflops = metrics.device_peak_tflops(type("Dev", (), {"device_kind": "NVIDIA H100 80GB HBM3"})())
    step_metrics = {"loss": 1.0, "lr": 1e-5, "grad_norm": 1.0, "alpha": 1.0, "answer_tokens": 1, "finite": True}
    step = loop._Pending(1, None, batch * seq_len, train_flops, False, {}, 0.0)
    train_mfu = loop._record(step_metrics, step, seconds, target.chips, peak_tflops * 1e12)["mfu"]
    # compile's estimate with the compiler's time equal to that step (its FLOPs counting every loop body)
    _, compile_mfu = aot.step_estimate(seconds, compile_flops / target.chips, compile_flops / target.chips, target.chip.peak_flops)
    assert compile_mfu == pytest.approx(train_mfu, rel=1e-12)
    assert 0 < train_mfu < 1


def test_model_flops_parts():
    """The training count is 3x the trained forward and 1x the frozen CLIP; the HR path attends over K, not M."""
    cfg = _release_7b()
    fwd = F.model_flops(cfg, 2, 512, 64)
    vision = 2 * F.views(cfg) * F.vision_tower_flops(cfg)
    assert F.train_flops(cfg, 2, 512, 64) == pytest.approx(3 * (fwd - vision) + vision)
    assert F.train_flops(cfg, 2, 512, 64, vision_trains=True) == pytest.approx(3 * fwd)
    small_k = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=0.1))
    per_hr_key = F.hierarchical_layers(cfg) * 2 * F.hr_attention_flops(cfg, 64, 1)
    assert fwd - F.model_flops(small_k, 2, 512, 64) == pytest.approx(per_hr_key * (cfg.hr_budget_tokens - small_k.hr_budget_tokens))
    assert cfg.vision_layers_used < cfg.vision.num_layers  # CLIP's last layer does not run, and is not counted
    assert F.vision_tower_flops(cfg) < F.vision_tower_flops(dataclasses.replace(cfg, vision_feature_layer=-1))


def test_lora_train_flops_drop_the_frozen_weight_gradients():
    """A LoRA step is the full step less one forward of the frozen projections (decoder, LM head, HR K/V), plus 6 r
    (in + out) per token per adapted linear: at the 7B's shapes (T = R = 2048, r = 64) 0.74x the full fine-tune."""
    cfg = _release_7b()
    t = cfg.text
    full, lora = F.train_flops(cfg, 2, 512, 64), F.lora_train_flops(cfg, 2, 512, 64, rank=8)
    hier = F.hierarchical_layers(cfg)
    frozen = 2 * 512 * 2 * t.num_layers * (4 * 4096 * 4096 + 3 * 4096 * t.intermediate_size)  # MHA: q k v o are D x D
    frozen += F.head_flops(cfg, 512) * 2 + 2 * hier * F.hr_kv_flops(cfg, cfg.num_hr_tokens)
    per_rank = 6 * 2 * (t.num_layers * 512 * (4 * 8192 + 3 * (4096 + t.intermediate_size)) + hier * cfg.num_hr_tokens * 2 * 8192)
    assert lora == pytest.approx(full - frozen + 8 * per_rank)
    assert F.lora_train_flops(cfg, 19, 2048, 2048, 64) / F.train_flops(cfg, 19, 2048, 2048) == pytest.approx(0.741, abs=1e-3)


def test_compile_counts_a_lora_step_as_lora():
    """`compile --lora` scales the compiler's estimate and MFU by the LoRA step's model FLOPs, not the full fine-tune's."""
    from flexattn_jax.lora import LoraConfig

    cfg = _release_7b()
    lora = LoraConfig(enabled=True, rank=16)
    assert aot.model_flops(cfg, "train", 4, 512, 64, lora) == F.lora_train_flops(cfg, 4, 512, 64, 16)
    assert aot.model_flops(cfg, "train", 4, 512, 64, LoraConfig()) == F.train_flops(cfg, 4, 512, 64)  # not enabled
    assert aot.model_flops(cfg, "train", 4, 512, 64, lora) < aot.model_flops(cfg, "train", 4, 512, 64)


def test_chip_table():
    assert chips.chip_of("NVIDIA H100 80GB HBM3") is chips.CHIPS["h100"]
    assert chips.chip_of("TPU v5 lite") is chips.CHIPS["v5e"]
    assert chips.chip_of("TPU v5") is chips.CHIPS["v5p"]
    assert chips.chip_of("cpu") is None and chips.peak_flops("cpu") is None
    assert aot.parse_target("v5p-128").chip is chips.CHIPS["v5p"]
    assert metrics.device_peak_tflops(jax.devices()[0]) is None  # the tests run on CPU
