"""FlexAttention's training warm-up: alpha = min(1, epochs done x warmup), epochs counted as the release's Trainer does.

The release's bundled ``transformers`` Trainer (``trainer.py``, inner loop) sets ``inputs["step"] =
self.state.epoch`` before each microbatch and, after each optimizer update (every ``grad_accum``
microbatches), ``self.state.epoch = epoch + (step + 1) / steps_in_epoch`` (``step`` the microbatch
index in the epoch, ``steps_in_epoch`` the microbatches per epoch); ``state.epoch`` starts at 0.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from flexattn_jax.config import ConfigError, ModelConfig, validate
from flexattn_jax.hf_config import from_hf_config
from flexattn_jax.vision import downsample_lowres
from tests.fixtures import random_params, synthetic_batch, tiny_config
from train.step import alpha_at, token_loss_sums

CFG = tiny_config()


def with_warmup(warmup: float, schedule: str = "release") -> ModelConfig:
    return dataclasses.replace(CFG, flex=dataclasses.replace(CFG.flex, warmup=warmup, alpha_schedule=schedule))


def trainer_steps(micro_per_epoch: int, grad_accum: int, epochs: int) -> list[float]:
    """The ``inputs["step"]`` of every microbatch, transcribed from the release Trainer's loop."""
    state_epoch, total_batched, seen = 0.0, 0, []
    for epoch in range(epochs):
        for step in range(micro_per_epoch):
            total_batched += 1
            seen.append(state_epoch)  # inputs["step"] = self.state.epoch
            last_short = micro_per_epoch <= grad_accum and step + 1 == micro_per_epoch
            if total_batched % grad_accum == 0 or last_short:  # optimizer update
                state_epoch = epoch + (step + 1) / micro_per_epoch
    return seen


# Written out from the Trainer's rules (not from the code under test): the step value each microbatch sees.
# 4 updates per epoch, 2 epochs, no accumulation; then the same updates with 2 microbatches each.
TABLE_G1 = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
TABLE_G2 = [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.25, 1.25, 1.5, 1.5, 1.75, 1.75]
# 2 updates per epoch of 3 microbatches, 3 epochs
TABLE_G3 = [0.0] * 3 + [0.5] * 3 + [1.0] * 3 + [1.5] * 3 + [2.0] * 3 + [2.5] * 3


@pytest.mark.parametrize(("micro", "accum", "epochs", "table"), [(4, 1, 2, TABLE_G1), (8, 2, 2, TABLE_G2), (6, 3, 3, TABLE_G3)])
def test_trainer_transcription_matches_the_table(micro, accum, epochs, table):
    assert trainer_steps(micro, accum, epochs) == table


@pytest.mark.parametrize(("micro", "accum", "epochs", "table"), [(4, 1, 2, TABLE_G1), (8, 2, 2, TABLE_G2), (6, 3, 3, TABLE_G3)])
@pytest.mark.parametrize("warmup", [0.4, 3.0])
def test_release_schedule_step_by_step(micro, accum, epochs, table, warmup):
    """Optimizer step k (k updates done) gets the alpha every microbatch of that update saw in the release."""
    per_epoch = micro // accum
    cfg = with_warmup(warmup)
    for k in range(per_epoch * epochs):
        release = [min(1.0, s * warmup) for s in table[k * accum : (k + 1) * accum]]
        assert len(set(release)) == 1  # one value per accumulated update
        assert float(alpha_at(cfg, k, per_epoch)) == pytest.approx(release[0], abs=1e-6), (k, release)
        assert float(alpha_at(cfg, jnp.int32(k), per_epoch)) == pytest.approx(release[0], abs=1e-6)  # traced step
    assert float(alpha_at(cfg, 0, per_epoch)) == 0.0  # the first update: alpha 0, the ordinary rows alone


def test_release_reaches_one_after_a_tenth_epoch_with_the_training_script_warmup():
    cfg = with_warmup(10.0)  # scripts/train: extra "warmup:10"
    assert [float(alpha_at(cfg, k, 100)) for k in (0, 5, 9, 10, 250)] == pytest.approx([0.0, 0.5, 0.9, 1.0, 1.0])
    assert float(alpha_at(with_warmup(10.0, "constant"), 0, 100)) == 1.0


def test_warmup_default_and_schedule_names():
    assert CFG.flex.warmup == 3.0 and CFG.flex.alpha_schedule == "release"  # float(config.extra.get("warmup", 3.0))
    hf = {"architectures": ["LlavaLlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 10, "num_attention_heads": 4, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
          "mm_projector_type": "mlp2x_gelu", "extra": "zoom_ratio:3#lowres_size:336#highres_size:1008"}
    assert from_hf_config(hf).flex.warmup == 3.0
    assert from_hf_config({**hf, "extra": "zoom_ratio:3#warmup:10"}).flex.warmup == 10.0
    with pytest.raises(ConfigError, match="alpha_schedule='warmup'.*'constant'"):
        validate(with_warmup(3.0, "warmup"))


def test_alpha_zero_is_the_model_without_the_hr_path():
    """At alpha 0 the learnable rows are the ordinary rows: the loss is that of plain LLaVA on the LR view."""
    params = random_params(CFG, seed=3)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(CFG, 4, 48, seed=4, answer_len=6).items()}
    off = dataclasses.replace(CFG, flex=dataclasses.replace(CFG.flex, enabled=False))
    lr_batch = dict(batch, pixel_values=downsample_lowres(batch["pixel_values"], CFG.flex.lowres_size),
                    select_rows=None, select_valid=None, margin=None)
    plain = {**params, "text": {**params["text"], "layers": {**params["text"]["layers"], "attn": {
        k: v for k, v in params["text"]["layers"]["attn"].items() if k not in ("k_hr", "v_hr")}}}}

    def loss(p, cfg, b, alpha):
        s, n = token_loss_sums(p, cfg, b, jnp.float32(alpha))
        return s / n

    ref = float(jax.jit(loss, static_argnums=1)(plain, off, lr_batch, 1.0))
    fwd = jax.jit(loss, static_argnums=1)
    l0, l1 = float(fwd(params, CFG, batch, 0.0)), float(fwd(params, CFG, batch, 1.0))
    assert l0 == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert abs(l1 - ref) > 1e-4  # the select output does change the loss once alpha > 0
