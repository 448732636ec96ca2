"""Compiling for real targets from this CPU host: the target platform from the mesh, splash under shard_map,
FlexAttention's programs compiled by libtpu for compile-only v5e chips (Mosaic kernels lowered, per-chip bytes),
the release presets' sizes, and the GPU path when the CUDA plugin is installed."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexattn_jax import attention as A
from flexattn_jax import presets
from flexattn_jax import sharding as S
from flexattn_jax.config import FlexConfig, TextConfig, VisionConfig

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = any(importlib.util.find_spec(p) for p in ("jax_cuda13_plugin", "jax_cuda12_plugin"))
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install 'flexattn-jax[tpu]')")


def tiny_flex_config():
    """A 3-layer FlexAttention model (plain, select, hierarchical) with head dim 128, the kernels' width."""
    from flexattn_jax.app import aot

    base = aot.load_model_config("llava-flexattn-7b")
    return dataclasses.replace(
        base,
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=56, patch_size=14),
        text=TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=128),
        flex=FlexConfig(**{**dataclasses.asdict(base.flex), "lowres_size": 56, "highres_size": 168, "first_select_layer": 1}),
        image_token_id=255,
    )


# ---- the platform and splash under a mesh (CPU, interpreted) ------------------------------------------

def test_target_platform_is_the_meshs():
    assert A.target_platform() == jax.default_backend() == "cpu"
    with S.target_mesh(S.make_mesh("data=2,fsdp=2,tensor=2")):
        assert A.target_platform() == "cpu"
    if HAS_LIBTPU:
        from flexattn_jax.app import aot

        with S.target_mesh(aot.target_mesh_for(aot.parse_target("v5e:2x2"), "fsdp=4")):
            assert A.target_platform() == "tpu"
            assert A.resolve_impl("auto", backend=A.target_platform(), dtype=jnp.bfloat16, head_dim=128, num_rows=512,
                                  num_keys=512, static_start=0) == ("splash", "")


@pytest.mark.parametrize("rows", [256, 1])
def test_interpreted_splash_under_shard_map_equals_dense(rows):
    """On an 8-device CPU mesh (data 2, fsdp 2, tensor 2) splash runs per shard under shard_map: same as the dense path."""
    mesh = S.make_mesh("data=2,fsdp=2,tensor=2")
    b, s, h, hkv, d = 4, 256, 4, 2, 128
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, rows, h, d), jnp.float32)
    k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32)
    lengths = np.array([256, 200, 17, 130])
    valid = jnp.asarray(np.arange(s)[None] < lengths[:, None])
    valid = valid.at[1].set(valid[1][::-1])  # sample 1 left-padded
    start = jnp.int32(0 if rows > 1 else 150)
    mask = A.CausalPadding(valid, start, 0 if rows > 1 else None)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    qs, ks, vs = (put(x, P(("data", "fsdp"), None, "tensor")) for x in (q, k, v))
    mask_s = A.CausalPadding(put(valid, P(("data", "fsdp"))), start, mask.static_start)
    with S.target_mesh(mesh):
        lowered = jax.jit(lambda q, k, v, m: A.attention(q, k, v, m, impl="splash")).lower(qs, ks, vs, mask_s)
        out = lowered.compile()(qs, ks, vs, mask_s)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    ref = A.attention(q, k, v, mask, impl="xla")
    seen = np.asarray(mask.has_key(rows))[..., None, None]  # rows without a valid key (left padding) are defined by neither
    np.testing.assert_allclose(np.asarray(out) * seen, np.asarray(ref) * seen, atol=2e-5, rtol=2e-5)
    assert rows == 1 or seen.sum() < seen.size  # the left-padded sample's first rows were among them


# ---- targets, meshes, presets -----------------------------------------------------------------------

def test_target_spellings_and_errors():
    from flexattn_jax.app import aot

    got = {n: (t.chips, t.topology) for n in ("v5p-128", "v5e-256", "v6e-64", "v4-32", "v5p:4x4x4", "v5e-8", "v5litepod-4", "h100x8")
           for t in [aot.parse_target(n)]}
    assert got == {"v5p-128": (64, "v5p:4x4x4"), "v5e-256": (256, "v5e:16x16"), "v6e-64": (64, "v6e:8x8"), "v4-32": (16, "v4:2x2x4"),
                   "v5p:4x4x4": (64, "v5p:4x4x4"), "v5e-8": (8, "v5e:2x4"), "v5litepod-4": (4, "v5e:2x2"), "h100x8": (8, "1x1x8")}
    for bad, msg in (("v9-8", "unknown --target"), ("v5p-3", "multiple"), ("v5e:2x2x2", "2 dimensions"), ("h100x16", "1 to 8")):
        with pytest.raises(aot.AotError, match=msg):
            aot.parse_target(bad)


@needs_libtpu
def test_mesh_must_cover_the_slice_and_cli_errors(capsys):
    from flexattn_jax.app import aot

    with pytest.raises(aot.AotError, match="must cover them all"):
        aot.target_mesh_for(aot.parse_target("v5e:2x2"), "fsdp=2")
    with pytest.raises(aot.AotError, match="could not describe the topology"):
        aot.target_mesh_for(aot.parse_target("v5e:3x3"), None)
    assert aot.main(["--target", "v9-8"]) == 2
    assert "unknown --target 'v9-8'" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.parametrize("name,chips", [("v4-32", 16), ("v5p-8", 4), ("v6e-8", 8)])
def test_tpu_slices_give_one_device_per_chip(name, chips):
    """v4 and v5p chips have two TensorCores; libtpu's default v4 topology has a device per core, which jax's
    TPU meshes refuse ("requires one device per chip"): the targets ask for megacore devices."""
    from flexattn_jax.app import aot

    target = aot.parse_target(name)
    mesh = aot.target_mesh_for(target, None)
    assert mesh.devices.size == chips == target.chips
    assert {getattr(d, "core_on_chip", 0) for d in mesh.devices.flat} == {0}


def test_cuda_target_without_plugin_names_the_extra():
    from flexattn_jax.app import aot

    if HAS_CUDA:
        pytest.skip("the CUDA plugin is installed")
    with pytest.raises(aot.AotError, match=r"flexattn-jax\[cuda\]"):
        aot.target_devices(aot.parse_target("h100x8"))


def _hf_count(text: dict) -> int:
    """Parameters of the LLaVA-1.5 towers as transformers builds them (on the meta device: nothing allocated)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**{k: text[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}))
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                                image_size=336, patch_size=14, projection_dim=768))
    d = text["hidden_size"]
    projector = 1024 * d + d + d * d + d  # mlp2x_gelu
    return sum(p.numel() for p in llama.parameters()) + sum(p.numel() for p in clip.parameters()) + projector


@pytest.mark.parametrize("size,vicuna", [("7b", 6_738_415_616), ("13b", 13_015_864_320)])
def test_presets_have_the_release_parameter_counts(size, vicuna):
    """LLaVA-1.5 = Vicuna v1.5 + CLIP ViT-L/14-336 + the MLP projector; FlexAttention adds k/v_proj_hd to every layer."""
    from flexattn_jax.app import aot

    text = presets.HF_CONFIGS[f"llava-1.5-{size}"]
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    llava = vicuna + 303_507_456 + (1024 * d + d + d * d + d)
    assert aot.param_counts(aot.load_model_config(f"llava-1.5-{size}"))["total"] == llava == _hf_count(text)
    assert aot.param_counts(aot.load_model_config(f"llava-flexattn-{size}"))["total"] == llava + 2 * layers * d * d


# ---- programs compiled by libtpu for compile-only v5e chips ------------------------------------------------

@functools.cache
def _compile(program: str, mesh: str, attention_impl: str = "splash"):
    """The tiny model's ``program`` compiled for v5e:2x2 under ``mesh`` (once per session)."""
    from flexattn_jax.app import aot

    return aot.compile_program("v5e:2x2", tiny_flex_config(), program, mesh=mesh, seq_len=256, select_rows=64,
                               attention_impl=attention_impl)


def _assert_mosaic(report, want: tuple[str, ...]):
    kinds = {k.split(":")[1].split("_segmented")[0] for k in report.kernels}
    assert set(want) <= kinds, report.kernels
    assert all(k.startswith("mosaic:splash") for k in report.kernels), report.kernels
    assert report.fits and report.per_chip_bytes["peak"] > 0 and report.compile_seconds > 0


@needs_libtpu
def test_prefill_compiles_for_v5e_with_the_mosaic_kernel():
    r = _compile("prefill", "fsdp=4", attention_impl="auto")  # auto on a TPU target: splash, not the CPU path
    _assert_mosaic(r, ("splash_mha_fwd",))
    assert r.optimal_seconds and 0 < r.mfu_estimate < 1 and r.step_seconds_estimate >= r.optimal_seconds
    assert r.bytes_accessed_per_chip > 0 and r.while_loops >= 0  # the cost analysis' HBM bytes, HLO loops (bench/hr_goals.py)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=4", "data=2,tensor=2"])
@pytest.mark.parametrize("program,kernels", [
    ("train", ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv")), ("prefill", ("splash_mha_fwd",)),
    ("decode", ("splash_mha_fwd",)), ("likelihood", ("splash_mha_fwd",)),
])
def test_programs_compile_for_v5e_meshes(program, kernels, mesh):
    _assert_mosaic(_compile(program, mesh), kernels)


@needs_libtpu
@pytest.mark.parametrize("program", ["prefill", pytest.param("train", marks=pytest.mark.slow)])
def test_per_chip_argument_bytes_shrink_with_fsdp(program):
    """Parameters (and the train step's fp32 masters and AdamW moments) split over fsdp, the batch over both:
    per chip, fsdp=4 holds about a quarter of what data=4 holds (the parameters dominate the tiny model's inputs)."""
    data, fsdp = _compile(program, "data=4", "auto"), _compile(program, "fsdp=4", "auto")
    ratio = fsdp.per_chip_bytes["arguments"] / data.per_chip_bytes["arguments"]
    assert 0.2 < ratio < 0.35, ratio


@needs_libtpu
@pytest.mark.slow  # ~1-2 min per slot count on 2 shared cores (libtpu compiles the engine's four programs)
def test_serve_program_sizes_the_slots_for_v5e():
    """``--program serve``: the engine's step, insert, encode and prefill compiled for v5e:2x2 (data 2 x tensor 2); the slot
    state per chip is the slots' bytes over data, the K/V caches' also over tensor, and it doubles with the slots."""
    from flexattn_jax import slots as SL
    from flexattn_jax.app import aot

    cfg = tiny_flex_config()
    at = {n: aot.compile_program("v5e:2x2", cfg, "serve", mesh="data=2,tensor=2", seq_len=64, slots=n, attention_impl="xla")
          for n in (4, 8)}
    r = at[4]
    assert r.fits and r.global_batch == 4 and r.per_device_batch == 2
    assert set(r.serve_peaks) == {"step", "insert", "encode", "prefill", "slot_state"}
    assert r.per_chip_bytes["peak"] == max(v for k, v in r.serve_peaks.items() if k != "slot_state")
    shapes = SL.slot_shapes(aot.abstract_params(aot.program_config(cfg, program="serve", attention_impl="xla")),
                            aot.program_config(cfg, program="serve", attention_impl="xla"), 4, 64 + aot.ANSWER_ROOM)
    kv = {id(a) for a in (shapes.decode.cache.k, shapes.decode.cache.v)}
    want = sum(np.prod(a.shape) * a.dtype.itemsize // (4 if id(a) in kv else 2) for a in jax.tree.leaves(shapes))
    assert r.serve_peaks["slot_state"] == want
    assert at[8].serve_peaks["slot_state"] == 2 * want
    assert at[8].per_chip_bytes["arguments"] > r.per_chip_bytes["arguments"]
    assert at[8].serve_peaks["prefill"] - r.serve_peaks["prefill"] == want  # the prefill runs beside the resident slots


@needs_libtpu
def test_serve_program_flags_are_checked(capsys):
    from flexattn_jax.app import aot

    with pytest.raises(aot.AotError, match=r"--slots 3: a positive multiple of the mesh's data x fsdp \(2\)"):
        aot.compile_program("v5e:2x2", tiny_flex_config(), "serve", mesh="data=2,tensor=2", seq_len=64, slots=3)
    assert aot.main(["--target", "v5e:2x2", "--program", "decode", "--slots", "8"]) == 2
    assert "--slots and --max-context are options of --program serve" in capsys.readouterr().err
    assert aot.main(["--target", "v5e:2x2", "--program", "serve", "--slots", "8", "--find-batch"]) == 2
    assert "--slots and --find-batch: give one" in capsys.readouterr().err


# ---- GPU (deviceless, CUDA plugin) -------------------------------------------------------------------------

def test_gpu_compiles_turn_the_triton_gemm_off():
    """Every compile for a GPU target passes ``xla_gpu_enable_triton_gemm=False`` (jax 0.10.2's deviceless Triton GEMM tiler
    finds no tile for the 7B step's CLIP dots, and the compile fails); a TPU compile takes no options."""
    from flexattn_jax.app import aot

    class Lowered:
        def compile(self, compiler_options=None):
            return compiler_options

    assert aot.compile_lowered(Lowered(), aot.parse_target("h100x8")) == {"xla_gpu_enable_triton_gemm": False}
    assert aot.compile_lowered(Lowered(), aot.parse_target("h200x1")) == {"xla_gpu_enable_triton_gemm": False}
    assert aot.compile_lowered(Lowered(), aot.parse_target("v5e-8")) is None


@pytest.mark.parametrize("hkv, heads", [(4, "tensor"), (2, None)])
def test_cudnn_operands_share_one_sharding(hkv, heads):
    """q, k and v go to cuDNN with one sharding (its backward partitioner refuses any other): the batch over fsdp, and the
    8 query heads over tensor=4 only when the KV heads divide it too (4 do; 2 do not, and then no operand splits heads)."""
    mesh = S.make_mesh("fsdp=2,tensor=4")
    rep = NamedSharding(mesh, P())
    q, k = (jax.device_put(jnp.zeros((4, 16, h, 8)), rep) for h in (8, hkv))
    with S.target_mesh(mesh):
        out = jax.jit(lambda q, k: A.same_layout(q, k, k))(q, k)
    specs = [tuple(x.sharding.spec) + (None,) * (4 - len(x.sharding.spec)) for x in out]
    assert specs == [("fsdp", None, heads, None)] * 3, specs


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA plugin is not installed (pip install 'flexattn-jax[cuda]')")
@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="a host with an NVIDIA driver: the plugin's start-up check runs")
def test_gpu_target_described_without_a_gpu_and_without_jax_platforms():
    """On a host without a GPU, the CUDA plugin's start-up check (cuPTI) fails unless JAX_PLATFORMS=cpu, and the
    topology with it ("not implemented for cuda"): ``target_devices`` skips that check itself, so a plain
    ``flexattn-jax compile --target h100x8`` works."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = "from flexattn_jax.app import aot; print(len(aot.target_devices(aot.parse_target('h100x8'))))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "8", out.stderr[-2000:]


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA plugin is not installed (pip install 'flexattn-jax[cuda]')")
def test_prefill_compiles_for_h100_with_cudnn():
    from flexattn_jax.app import aot

    r = aot.compile_program("h100x8", tiny_flex_config(), "prefill", mesh="fsdp=8", seq_len=256)
    assert any(k.startswith("__cudnn$fmha") for k in r.kernels), r.kernels
    assert r.optimal_seconds is None and r.fits


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA plugin is not installed (pip install 'flexattn-jax[cuda]')")
@pytest.mark.parametrize("impl", ["auto", "xla_chunked", "xla"])
def test_train_step_compiles_for_h100_with_each_hr_path(impl):
    """The train step under fsdp over 8 H100s with each exact GPU path (1024 HR keys: ``auto`` is cuDNN for the main part
    and the HR part by key blocks; ``xla_chunked`` both by key blocks; ``xla`` both dense): cuDNN's forward and backward
    fMHA calls are in the program exactly when the main part is cuDNN's."""
    from flexattn_jax.app import aot

    base = tiny_flex_config()
    cfg = dataclasses.replace(base, flex=dataclasses.replace(base.flex, zoom_ratio=8, highres_size=448))  # 32 x 32 = 1024 HR keys
    assert cfg.num_hr_tokens >= A.AUTO_CHUNK_MIN_KEYS and A.hr_chunked(impl, 64, cfg.num_hr_tokens) == (impl != "xla")
    r = aot.compile_program("h100x8", cfg, "train", mesh="fsdp=8", per_device_batch=1, seq_len=128, select_rows=64,
                            attention_impl=impl)
    cudnn = {k: v for k, v in r.kernels.items() if k.startswith("__cudnn$fmha")}
    assert (set(cudnn) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}) if impl == "auto" else not cudnn, r.kernels
    assert r.fits and r.per_chip_bytes["peak"] > 0 and r.flops_per_chip is None


def test_step_estimate_scales_the_loops_counted_once():
    """The compiler counted 1/20 of the model's FLOPs in 0.1 s: the step is 2 s, the MFU its counted rate."""
    from flexattn_jax.app import aot

    step, mfu = aot.step_estimate(0.1, 1e12, 2e13, 459e12)
    assert step == pytest.approx(2.0) and mfu == pytest.approx(1e12 / (0.1 * 459e12))
    assert aot.step_estimate(None, 1e12, 2e13, 459e12) == (None, None)
    assert aot.step_estimate(0.1, 4e13, 2e13, 459e12)[0] == pytest.approx(0.1)  # never scaled down


def test_decode_state_shards_the_kv_heads_over_tensor():
    """The decode program's K/V caches (layers, B, slots, kv heads, d) come in as prefill leaves them: the batch
    over data and the heads over tensor (replicated heads made a 7B decode at batch 32 need 1.1 GiB per layer
    per v5e chip under tensor=8: it did not fit; sharded, 8.5 GiB in all)."""
    from flexattn_jax.app import aot
    from flexattn_jax.sharding import make_mesh

    mesh = make_mesh("data=2,tensor=4")
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    state = {"cache": {"k": sds(3, 4, 16, 8, 2), "v": sds(3, 4, 16, 8, 2), "lengths": sds(4)}, "step": sds()}
    out = aot._state_shardings(state, mesh, batch=4)
    for name in ("k", "v"):
        spec = tuple(out["cache"][name].sharding.spec) + (None,) * 5
        assert spec[:5] == (None, "data", None, "tensor", None), spec
    assert out["cache"]["lengths"].sharding.spec == P("data") and out["step"].sharding.spec == P()


@needs_libtpu
def test_unroll_layers_counts_every_decoder_layer(monkeypatch, capsys):
    """``--unroll-layers`` compiles the decoder unrolled: the cost analysis counts its three layers (plain, select,
    hierarchical) instead of the scan's body once (the costliest kind), so the FLOPs, bytes accessed and
    ``optimal_seconds`` grow; the report says so."""
    from flexattn_jax.app import aot

    cfg = tiny_flex_config()
    monkeypatch.setattr(aot, "load_model_config", lambda model: cfg)
    argv = ["--target", "v5e:2x2", "--program", "decode", "--mesh", "fsdp=4", "--seq-len", "256", "--attention-impl", "splash", "--json"]
    reports = []
    for extra in ([], ["--unroll-layers"]):
        assert aot.main(argv + extra) == 0
        reports.append(json.loads(capsys.readouterr().out))
    scanned, unrolled = reports
    assert (scanned["unrolled"], unrolled["unrolled"]) == (False, True)
    ratios = {k: unrolled[k] / scanned[k] for k in ("flops_per_chip", "bytes_accessed_per_chip", "optimal_seconds")}
    assert all(r > 1.1 for r in ratios.values()), ratios


@needs_libtpu
def test_usable_hbm_limit_is_the_compilers(monkeypatch, capsys):
    """``--usable-hbm-limit`` hands the usable HBM to libtpu as its limit: the tiny prefill compiles under it and says so;
    with the usable share cut to 1 MiB of the chip the same program is refused as not fitting (one line, exit 2)."""
    from flexattn_jax.app import aot

    cfg = tiny_flex_config()
    monkeypatch.setattr(aot, "load_model_config", lambda model: cfg)
    argv = ["--target", "v5e-1", "--program", "prefill", "--seq-len", "256", "--attention-impl", "splash", "--usable-hbm-limit"]
    assert aot.main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["usable_limit"] and r["fits"] and r["per_chip_bytes"]["peak"] <= r["usable_bytes"]
    assert aot.compiler_options(aot.parse_target("v5e-1"), True) == {"xla_tpu_max_hbm_size_mib": str(int(16 * 1024 * 0.95))}
    monkeypatch.setitem(aot.USABLE_FRACTION, "tpu", 2**20 / (16 * 2**30))
    assert aot.main(argv) == 2
    err = capsys.readouterr().err
    assert "prefill at batch 1/device does not fit v5e-1: RESOURCE_EXHAUSTED" in err and len(err.strip().splitlines()) == 1
    assert aot.main(argv + ["--find-batch"]) == 2
    assert "--usable-hbm-limit and --find-batch: give one" in capsys.readouterr().err


# ---- LoRA, QLoRA and quantised weights (train's --lora / --base-quant, generate's --quantize) --------------------

@needs_libtpu
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantised_decode_compiles_with_quantised_kernels(mode):
    """``--quantize`` compiles the program over the quantised tree: its int8 / uint4 kernels and their scales come in
    as arguments (per chip below the bf16 program's), and the report says which quantisation it compiled."""
    from flexattn_jax.app import aot

    kw = dict(mesh="fsdp=4", seq_len=256, attention_impl="splash")
    plain = aot.compile_program("v5e:2x2", tiny_flex_config(), "decode", **kw)
    quant = aot.compile_program("v5e:2x2", tiny_flex_config(), "decode", quantize=mode, **kw)
    ratio = quant.per_chip_bytes["arguments"] / plain.per_chip_bytes["arguments"]
    assert quant.quantize == mode and plain.quantize is None and quant.fits
    assert ratio < (0.8 if mode == "int8" else 0.75), ratio  # measured: nf4 0.715 (the cache and embeddings stay bf16)


@needs_libtpu
@pytest.mark.slow
def test_lora_and_qlora_train_steps_compile_smaller_than_full_fine_tuning():
    """``--lora`` compiles train's LoRA step: only adapters and the projector hold fp32 masters and AdamW moments, the
    frozen base stays bf16 (``--base-quant int4``: int4), so per chip the arguments are a fraction of full fine-tuning's."""
    from flexattn_jax.app import aot
    from flexattn_jax.lora import LoraConfig

    kw = dict(mesh="fsdp=4", seq_len=256, select_rows=64, attention_impl="splash")
    full = _compile("train", "fsdp=4")
    lora = aot.compile_program("v5e:2x2", tiny_flex_config(), "train", lora=LoraConfig(enabled=True, rank=8), **kw)
    qlora = aot.compile_program("v5e:2x2", tiny_flex_config(), "train", lora=LoraConfig(enabled=True, rank=8, base_quant="int4"), **kw)
    args = [r.per_chip_bytes["arguments"] for r in (full, lora, qlora)]
    assert args[1] < 0.5 * args[0] and args[2] < 0.8 * args[1], args
    assert lora.lora["rank"] == 8 and qlora.lora["base_quant"] == "int4" and full.lora is None
    _assert_mosaic(lora, ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"))


def test_compile_refuses_lora_for_inference_and_quantize_for_train(capsys):
    from flexattn_jax.app import aot

    assert aot.main(["--target", "v5e:2x2", "--program", "decode", "--lora"]) == 2
    assert "--lora is a training setting" in capsys.readouterr().err
    assert aot.main(["--target", "v5e:2x2", "--program", "train", "--quantize", "int8"]) == 2
    assert "a quantised train step is --lora --base-quant" in capsys.readouterr().err
