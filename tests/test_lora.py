"""LoRA: the forward against peft's, merge against merge_and_unload, and the LoRA train step (adapters only train,
the base stays bit-identical, the loss falls, resume and gradient accumulation are exact)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flexattn_jax import lora as L
from flexattn_jax.model import forward
from flexattn_jax.params import flatten
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, random_params, small_train_config, synthetic_batch, tiny_config, to_host
from train.loop import train
from train.step import make_step

from . import test_train_step as TS
from .jax_models import convert_torch_model
from .torch_models import make_tiny_llava

PEFT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def peft_model(rank: int = 4, alpha: float = 8.0, seed: int = 3):
    """A tiny llava-hf model with peft LoRA on every language-model linear, B random (not zero) so the adapters act."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llava()
    params, cfg = convert_torch_model(model)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGETS, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pm.eval(), params, cfg


def adapters_from_peft(pm, cfg) -> dict[str, jnp.ndarray]:
    """Our adapter leaves from peft's state dict: lora_a = lora_A.weight.T, lora_b = lora_B.weight.T, stacked by layer."""
    sd = pm.state_dict()
    out = {}
    for ours, hf in L.MODULE_NAMES.items():
        part = "self_attn" if ours.startswith("attn/") else "mlp"
        a_key = f"base_model.model.model.language_model.layers.{{}}.{part}.{hf}.lora_A.default.weight"
        if a_key.format(0) not in sd:
            continue
        n = cfg.text.num_layers
        out[f"text/layers/{ours}/lora_a"] = jnp.asarray(np.stack([sd[a_key.format(i)].numpy().T for i in range(n)]))
        b_key = a_key.replace("lora_A", "lora_B")
        out[f"text/layers/{ours}/lora_b"] = jnp.asarray(np.stack([sd[b_key.format(i)].numpy().T for i in range(n)]))
    return out


def _inputs(cfg, b=2, seed=0):
    rng = np.random.default_rng(seed)
    g = cfg.num_image_tokens
    ids = rng.integers(1, 100, (b, 10 + g))
    ids[:, 3 : 3 + g] = cfg.image_token_id
    pix = rng.normal(size=(b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, pix


def test_forward_and_merge_equal_peft():
    pm, params, cfg = peft_model()
    adapters = adapters_from_peft(pm, cfg)
    assert len(adapters) == 14  # 7 linears x (A, B)
    ids, pix = _inputs(cfg)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix)).logits.numpy()
        base_ref = pm.get_base_model()
    scale = 8.0 / 4
    tree = L.scaled(L.with_adapters(params, adapters), scale)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(forward(tree, cfg, jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1))).logits)
        plain = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1))).logits)
    tol = 1e-5 * np.abs(ref).max()
    assert np.abs(ours - ref).max() <= tol
    assert np.abs(plain - ref).max() > 100 * tol  # the adapters change the output: the comparison is not vacuous
    merged = flatten(L.merge(L.with_adapters(params, adapters), scale))
    unloaded = base_ref.merge_and_unload() if hasattr(base_ref, "merge_and_unload") else pm.merge_and_unload()
    sd = unloaded.state_dict()
    for ours_name, hf in L.MODULE_NAMES.items():
        if f"text/layers/{ours_name}/kernel" not in merged:
            continue
        part = "self_attn" if ours_name.startswith("attn/") else "mlp"
        want = np.stack([sd[f"model.language_model.layers.{i}.{part}.{hf}.weight"].numpy().T for i in range(cfg.text.num_layers)])
        np.testing.assert_allclose(np.asarray(merged[f"text/layers/{ours_name}/kernel"]), want, rtol=1e-6, atol=1e-6)
    assert not any(L.is_adapter(k) for k in merged)


def test_targets_default_and_errors():
    cfg = tiny_config()
    params = random_params(cfg)
    mods = L.target_modules(params)
    assert len(mods) == 9 and "text/layers/attn/k_hr" in mods and not any(m.startswith(("vision", "projector")) for m in mods)
    with pytest.raises(ValueError, match="match no linear"):
        L.target_modules(params, r"^text/layers/attn/nothing$")
    ad = L.init_adapters(params, L.LoraConfig(rank=3), jax.random.key(0))
    assert ad["text/layers/mlp/down/lora_a"].shape == (3, 64, 3) and ad["text/layers/mlp/down/lora_b"].shape == (3, 3, 32)
    assert not np.any(np.asarray(ad["text/layers/mlp/down/lora_b"]))


# ---- the LoRA train step ---------------------------------------------------------------------------------------

CFG = tiny_config()
LORA = L.LoraConfig(enabled=True, rank=4, alpha=32.0, dropout=0.0)
TC = small_train_config(trainable="projector", lora=LORA, lr=1e-2)


params, host_batch, one_device = TS.params, TS.host_batch, TS.one_device  # the full fine-tuning tests' model, batch, mesh


def _steps(params, batches, tcfg=TC, grad_accum=1):
    return TS.run_steps(one_device(), params, batches, tcfg, grad_accum)


@pytest.mark.parametrize("steps", [30, pytest.param(100, marks=pytest.mark.slow)])
def test_only_adapters_and_projector_train_base_bit_identical(steps, params, host_batch):
    """The frozen LM head of the random base keeps its logits small: the loss falls slowly, but steadily."""
    tcfg = dataclasses.replace(TC, steps=steps)
    state, metrics, fns = _steps(params, [host_batch] * steps, tcfg)
    losses = [float(m["loss"]) for m in metrics]
    assert all(bool(m["finite"]) for m in metrics)
    assert losses[-1] < losses[0] - 0.4 and losses[steps // 2] < losses[0], losses[::10]
    new, old = flatten(to_host(state.params)), flatten(params)
    adapters = [k for k in new if L.is_adapter(k)]
    assert len(adapters) == 18
    for name, x in old.items():
        if name.startswith("projector/"):
            assert not np.array_equal(new[name], x), name
        else:
            assert np.array_equal(new[name], x), name  # the frozen base: bit-identical after 100 steps
    assert all(np.any(new[k]) for k in adapters if k.endswith("lora_b"))
    opt_paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
                 jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    moments = [p for p in opt_paths if "/mu/" in p]
    assert len(moments) == 18 + 4 and all(("lora_" in p) or ("projector" in p) for p in moments)


@pytest.mark.slow
def test_lora_grad_accumulation_exact(params, host_batch):
    state1, (m1,), _ = _steps(params, [host_batch])
    state4, (m4,), _ = _steps(params, [host_batch], grad_accum=4)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-5
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-5
    for a, b in zip(jax.tree.leaves(to_host(state1.params)), jax.tree.leaves(to_host(state4.params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_lora_checkpoint_holds_trainables_and_resume_is_exact(tmp_path, params, host_batch):
    tcfg = dataclasses.replace(TC, steps=6, save_every=3, async_save=False)
    batches = [synthetic_batch(CFG, TEST_BATCH, TEST_SEQ_LEN, seed=s) for s in range(6)]
    full, rec_full = train(CFG, params, batches, tcfg, one_device(), out_dir=tmp_path / "a", log=False)
    half, _ = train(CFG, params, batches, dataclasses.replace(tcfg, stop_at=3), one_device(), out_dir=tmp_path / "b", log=False)
    from train.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "b" / "checkpoints") as ck:
        stored = ck.stored_shapes(3)
    names = [k for k in stored if k.startswith("params/")]
    assert names and all("lora_" in k or k.startswith("params/projector/") for k in names), names
    resumed, rec = train(CFG, params, batches, tcfg, one_device(), out_dir=tmp_path / "b", log=False)
    assert [r["step"] for r in rec] == [4, 5, 6]
    assert [r["loss"] for r in rec] == [r["loss"] for r in rec_full[3:]]
    for a, b in zip(jax.tree.leaves(to_host(full)), jax.tree.leaves(to_host(resumed)), strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="base model's parameters"):
        train(CFG, None, batches, dataclasses.replace(tcfg, steps=7), one_device(), out_dir=tmp_path / "b", log=False)


def test_lora_dropout_is_random_in_training_only(params, host_batch):
    """Dropout 0.5 changes the training loss from one step key to the next; the plain forward has no dropout."""
    tcfg = dataclasses.replace(TC, lora=dataclasses.replace(LORA, dropout=0.5))
    fns = make_step(CFG, tcfg, one_device(), tcfg.steps)
    state = fns.init_state(params)
    p = flatten(to_host(state.params))
    p = {k: (np.full_like(v, 0.1) if k.endswith("lora_b") else v) for k, v in p.items()}
    from flexattn_jax.params import unflatten

    tree = L.scaled(unflatten(p), LORA.scale)
    ids = jnp.asarray(host_batch["input_ids"][:2])
    cfg_d = dataclasses.replace(CFG, lora_dropout=0.5)
    a = forward(tree, cfg_d, ids, rng=jax.random.key(0)).logits
    b = forward(tree, cfg_d, ids, rng=jax.random.key(1)).logits
    c = forward(tree, cfg_d, ids).logits
    d = forward(tree, CFG, ids, rng=jax.random.key(0)).logits
    assert float(jnp.abs(a - b).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_lora_config_errors():
    with pytest.raises(ValueError, match="adapters"):
        small_train_config(lora=LORA)  # default trainable 'projector,llm'
    with pytest.raises(ValueError, match="QLoRA"):
        small_train_config(trainable="projector", lora=L.LoraConfig(base_quant="int8"))
    with pytest.raises(ValueError, match="rank"):
        L.LoraConfig(rank=0)


def test_dropout_mask_is_its_own_kernel():
    """The dropout mask goes behind an optimization barrier (one per adapted linear) so XLA cannot fuse threefry's
    ~100 ops a draw into the matmul operand (that made a LoRA step's TPU compile ~5x slower); the dropout itself holds:
    about p of the adapter path's inputs are zeroed, the rest scaled by 1 / (1 - p)."""
    from flexattn_jax.text import Linear

    cfg = dataclasses.replace(CFG, lora_dropout=0.25, dtype="float32")
    x = jnp.ones((4, 64, 32), jnp.float32)
    lin = Linear(16, cfg)
    p = lin.init(jax.random.key(0), x)["params"]
    p = {**p, "kernel": jnp.zeros_like(p["kernel"]), "lora_a": jnp.eye(32, 32, dtype=jnp.float32), "lora_b": jnp.ones((32, 16))}
    run = jax.jit(lambda p, k: lin.apply({"params": p}, x, rngs={"lora_dropout": k}))
    assert run.lower(p, jax.random.key(1)).as_text().count("optimization_barrier") == 1
    y = np.asarray(run(p, jax.random.key(1)))  # each output: sum over the 32 inputs of keep / (1 - p)
    kept = y * (1 - 0.25)
    np.testing.assert_allclose(kept, np.round(kept), atol=1e-4)
    assert abs(kept.mean() / 32 - 0.75) < 0.02
    assert not np.array_equal(y, np.asarray(run(p, jax.random.key(2))))


@pytest.mark.parametrize("base_quant", ["none", "int8"])
def test_remat_scan_keeps_no_copy_of_the_frozen_base(base_quant):
    """Under remat the decoder scan's residuals are its inputs: a LoRA step stacks no second copy of the frozen
    layers' kernels (with per-branch checkpoints inside the layer-kind switch the forward scan stacked every kernel
    again, a copy of the frozen base per chip). A full fine-tune's step stacks its kernels' gradients, so not it."""
    import re

    cfg = dataclasses.replace(CFG, remat_policy="full")
    tcfg = small_train_config(trainable="projector", lora=dataclasses.replace(LORA, base_quant=base_quant), lr=1e-2)
    fns = make_step(cfg, tcfg, one_device(), tcfg.steps)
    from train.step import make_example_batch

    batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in make_example_batch(cfg, 2, TEST_SEQ_LEN, 8).items()}
    text = fns.step.lower(fns.abstract_state, batch).as_text()
    t = cfg.text
    stacked = [f"{t.num_layers}x{t.hidden_size}x{t.intermediate_size}", f"{t.num_layers}x{t.intermediate_size}x{t.hidden_size}"]
    copies = [s for s in stacked if re.search(rf"dynamic_update_slice.*-> tensor<{s}x(bf16|f32|i4|i8)>", text)]
    assert copies == [], copies


def test_remat_keeps_the_gradients(params, host_batch):
    """The decoder under ``remat_policy='full'`` (one checkpoint around the layer-kind switch) gives the loss and the
    gradients of no remat, for the base kernels and the adapters alike (the select and hierarchical layers included)."""
    from flexattn_jax.params import unflatten
    from train.step import loss_sums

    flat = flatten(L.with_adapters(params, L.init_adapters(params, LORA, jax.random.key(5))))
    tree = unflatten({k: (jnp.full_like(v, 0.05) if k.endswith("lora_b") else v) for k, v in flat.items()})
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    def grads(policy):
        cfg = dataclasses.replace(CFG, remat_policy=policy)
        return jax.jit(jax.value_and_grad(lambda p: loss_sums(p, cfg, batch, jnp.float32(0.5)).ce))(tree)

    (l0, g0), (l1, g1) = grads("none"), grads("full")
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for (k, a), b in zip(flatten(g0).items(), flatten(g1).values(), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * float(np.abs(np.asarray(a)).max() + 1), err_msg=k)


def test_a_lora_run_counts_the_lora_steps_flops(params):
    """The training loop's FLOPs per step (its TFLOP/s and MFU) for a LoRA run are the LoRA step's
    (:func:`flexattn_jax.flops.lora_train_flops`), not the full fine-tune's."""
    from flexattn_jax import flops as F

    batch = synthetic_batch(CFG, TEST_BATCH, TEST_SEQ_LEN, seed=0)
    _, rec = train(CFG, params, [batch], dataclasses.replace(TC, steps=1, log_every=1), one_device(), log=False)
    b, t = batch["input_ids"].shape
    images = int((batch["input_ids"] == CFG.image_token_id).any(axis=1).sum())
    rows = batch["select_rows"].shape[1]
    assert rec[0]["flops_per_step"] == F.lora_train_flops(CFG, b, t, rows, LORA.rank, images=images)
    assert rec[0]["flops_per_step"] < F.train_flops(CFG, b, t, rows, images=images)
