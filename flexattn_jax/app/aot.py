"""``flexattn-jax compile``: compile FlexAttention's programs for real TPU and GPU targets from any host.

"Will it fit, and how fast, before I rent the slice": the train step, prefill, one decode step, the V*
likelihood or the serving engine (``serve``: :mod:`flexattn_jax.slots`' programs at ``--slots``) is
lowered for a TPU topology (libtpu's compile-only devices) or an NVIDIA node (the CUDA plugin's
deviceless compile, with the device descriptions shipped in ``gpu_targets/``) and compiled by that
target's own compiler. No accelerator and no weights are needed: parameters, optimizer state and batches
are ``ShapeDtypeStruct`` leaves carrying the shardings of the project's rules table. Reported per chip:
the compiler's HBM buffer assignment against the chip's capacity, the attention kernels actually lowered
(Mosaic / cuDNN custom calls counted in the compiled HLO), compile seconds, FLOPs and, on TPU, the
compiler's ``optimal_seconds`` with a step-time and MFU estimate (:func:`step_estimate`). The program is
traced with the target mesh ambient (:func:`flexattn_jax.sharding.target_mesh`), so kernels follow the
target, not this host.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from flexattn_jax import flops as F
from flexattn_jax import presets, tpu_chips_present
from flexattn_jax import sharding as S
from flexattn_jax.chips import CHIPS, Chip, GiB
from flexattn_jax.config import ATTENTION_IMPLS, ModelConfig
from flexattn_jax.hf_config import from_hf_config
from flexattn_jax.lora import LoraConfig
from flexattn_jax.overrides import parse_hr_budget
from flexattn_jax.params import abstract_params
from flexattn_jax.quant import MODES as QUANT_MODES
from flexattn_jax.quant import check_mode, quantized_abstract
from flexattn_jax.settings import SettingsArgs

PROGRAMS = ("train", "prefill", "decode", "likelihood", "serve")
SERVE_PREFILL_ROWS = 4  # the engine's default --prefill-batch: the rows of the serve program's encode and prefill
ANSWER_ROOM = 128  # cache slots after the prompt for the answer (prefill / decode programs)
# Fraction of a chip's memory a program may take: the TPU runtime keeps a little for itself; on GPU,
# XLA's client reserves more (cuDNN / cuBLAS workspaces, which a deviceless compile does not count).
USABLE_FRACTION = {"tpu": 0.95, "gpu": 0.90}
# XLA options of every compile for a platform. GPU: jax 0.10.2's deviceless compile cannot autotune, and its Triton GEMM
# tiler finds no tile for the CLIP tower's (batch x 10 views x 577 tokens, 1024) x (1024, 1024) dots ("Couldn't find output tile
# sizes"); the GEMMs go to cuBLAS instead (the dots' FLOPs and the buffer assignment do not depend on it).
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {"gpu": {"xla_gpu_enable_triton_gemm": False}}


class AotError(ValueError):
    """A target, model, mesh or program that cannot be compiled as asked (the message says why)."""


def usable_bytes(target: Target) -> int:
    """The HBM a program may take on one chip of ``target``: :data:`USABLE_FRACTION` of its capacity."""
    return int(target.chip.hbm_bytes * USABLE_FRACTION[target.platform])


def compiler_options(target: Target, usable_limit: bool) -> dict[str, str]:
    """Options for the target's compiler. ``usable_limit`` (TPU only): the usable HBM (:func:`usable_bytes`) as the
    compiler's memory limit, in place of the whole chip a compile-only topology describes: the compiler then trades
    time for memory (scheduling, rematerialisation) to fit that budget, as it does for the HBM a chip's runtime leaves
    it, and a program that cannot fit it is refused (RESOURCE_EXHAUSTED)."""
    if not usable_limit:
        return {}
    if target.platform != "tpu":
        raise AotError(f"--usable-hbm-limit: a TPU compiler option; {target.name} is a {target.platform} target")
    return {"xla_tpu_max_hbm_size_mib": str(usable_bytes(target) // 2**20)}


# ---- targets ---------------------------------------------------------------------------------------

_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
GPU_TARGETS_DIR = Path(__file__).with_name("gpu_targets")


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``--target``: the chip, how many, and the topology string the compiler is given."""

    name: str
    chip: Chip
    chips: int
    topology: str  # TPU: 'v5e:2x2'; GPU: '1x1x8'

    @property
    def platform(self) -> str:
        return self.chip.platform


def _torus(chips: int, dims: int, name: str) -> str:
    """Chip grid of a slice: powers of two as even as possible, ascending, 1s last (2x2x1 for 4 v5p chips, 16x16 for 256 v5e)."""
    if chips < 1 or chips & (chips - 1):
        raise AotError(f"--target {name}: {chips} chips is not a power of two; give the topology as e.g. v5p:2x2x2")
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    return "x".join(str(d) for d in sorted(shape, key=lambda d: (d == 1, d)))


def parse_target(name: str) -> Target:
    """``v5p:4x4x4`` / ``v5p-128`` (TensorCores on v4/v5p, chips on v5e/v6e) / ``v5e-256`` / ``h100x8`` / ``h200x8`` -> Target."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite|v6lite):(\d+(?:x\d+)+)", text)
    if m:
        chip = CHIPS[_ALIASES.get(m.group(1), m.group(1))]
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) != chip.dims:
            raise AotError(f"--target {name}: a {chip.family} topology has {chip.dims} dimensions (e.g. "
                           f"{'v5p:2x2x1' if chip.dims == 3 else 'v5e:2x2'})")
        return Target(name, chip, math.prod(dims), f"{chip.family}:{m.group(2)}")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite|v6lite)-(\d+)", text)
    if m:
        chip = CHIPS[_ALIASES.get(m.group(1), m.group(1))]
        n = int(m.group(2))
        if n % chip.cores_per_chip:
            raise AotError(f"--target {name}: {chip.family}-N counts TensorCores ({chip.cores_per_chip} per chip); {n} is not a multiple")
        chips = n // chip.cores_per_chip
        return Target(name, chip, chips, f"{chip.family}:{_torus(chips, chip.dims, name)}")
    m = re.fullmatch(r"(h100|h200)x(\d+)", text)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= 8:
            raise AotError(f"--target {name}: one node holds 1 to 8 GPUs")
        return Target(name, CHIPS[m.group(1)], n, f"1x1x{n}")
    raise AotError(f"unknown --target {name!r}: use a TPU topology (v5p:4x4x4, v5p-128, v5e-256, v6e-64, v4-32, v5e:2x2) "
                   "or a GPU node (h100x8, h200x8)")


def target_devices(target: Target) -> list:
    """Compile-only devices of ``target`` (libtpu's topology, or the CUDA plugin's deviceless description)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # compile-only: no chip is claimed, so processes need not take turns at libtpu's lockfile
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if tpu_chips_present() is False:  # no TPU here: libtpu need not look for its hosts (five lines of hostname errors)
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
            os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
        if importlib.util.find_spec("libtpu") is None:
            raise AotError(f"--target {target.name} needs libtpu: pip install 'flexattn-jax[tpu]' (jax[tpu]>=0.10,<0.11)")
        # one device per chip: libtpu's default for v4 is a device per TensorCore, which jax's TPU meshes refuse;
        # "megacore" fuses a chip's two cores into one device, as v4/v5p slices run (and as MaxText's AOT compiles)
        options: dict[str, Any] = {"chip_config_name": "megacore"} if target.chip.cores_per_chip > 1 else {}
        if target.chips < 4:  # a slice smaller than libtpu's default host (2x2x1): the host is the slice (v5e-1, one chip)
            dims = [int(d) for d in target.topology.split(":")[1].split("x")]
            options["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
        try:
            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **options)
        except Exception as e:  # libtpu rejects shapes it does not know: say which one
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AotError(f"--target {target.name}: libtpu could not describe the topology {target.topology!r} ({first})") from e
        if len(topo.devices) != target.chips:
            raise AotError(f"--target {target.name}: libtpu described {len(topo.devices)} devices for {target.topology!r}, "
                           f"not one per chip ({target.chips})")
        return list(topo.devices)
    if not any(importlib.util.find_spec(p) for p in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        raise AotError(f"--target {target.name} needs the CUDA plugin: pip install 'flexattn-jax[cuda]' (jax[cuda13]>=0.10,<0.11)")
    # No NVIDIA driver here: without JAX_PLATFORMS=cpu the plugin's start-up check (cuPTI) fails, and with it the
    # topology ("not implemented for cuda"). A deviceless compile needs neither the check nor a GPU.
    if not Path("/proc/driver/nvidia").exists():
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    spec = (GPU_TARGETS_DIR / target.chip.spec_file).read_text()
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=target.topology, target_config=spec)
    except Exception as e:
        raise AotError(f"--target {target.name}: the CUDA plugin could not describe {target.topology} ({str(e).splitlines()[0]})") from e
    return list(topo.devices)


def target_mesh_for(target: Target, spec: str | None) -> Mesh:
    """The ``('data', 'fsdp', 'tensor')`` mesh over all of ``target``'s chips; a spec that does not use them all is an error."""
    devices = target_devices(target)
    try:
        sizes = S.parse_mesh_spec(spec, len(devices))
    except S.ShardingError as e:
        raise AotError(f"--mesh {spec}: {e}") from e
    if math.prod(sizes.values()) != len(devices):
        raise AotError(f"--mesh {spec}: {math.prod(sizes.values())} devices, but {target.name} has {len(devices)} chips "
                       "(the mesh must cover them all)")
    return S.make_mesh(sizes, devices=devices)


# ---- models --------------------------------------------------------------------------------------

PRESETS = presets.HF_CONFIGS  # the release's models (flexattn_jax.presets), compiled without weights


def load_model_config(model: str) -> ModelConfig:
    """A preset name, a ``config.json`` (or a directory holding one), or a converted checkpoint directory -> ModelConfig."""
    if model in PRESETS:
        return presets.preset(model)
    path = Path(model)
    if (path / "metadata.json").is_file():
        from flexattn_jax.checkpoint import read_config

        return read_config(path)
    if path.is_file() or (path / "config.json").is_file():
        return from_hf_config(path)
    raise AotError(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), a config.json nor a converted checkpoint directory")


def program_config(
    cfg: ModelConfig, *, program: str, attention_impl: str = "auto", remat: str = "full", hr_budget: Any = None,
    layers: int | None = None, unroll_layers: bool = False,
) -> ModelConfig:
    """``cfg`` as compiled: bf16 compute (fp32 masters when training, bf16 weights otherwise), the remat policy,
    the attention implementation, the HR budget, (``layers``) a cut decoder of that many layers and
    (``unroll_layers``) the layer loops unrolled (``scan_layers`` off), so that the compiler's cost analysis, which
    counts a loop body once, counts every layer."""
    text, flex = cfg.text, cfg.flex
    if layers is not None:
        if layers < 1:
            raise AotError(f"--layers {layers}: at least one layer")
        text = dataclasses.replace(text, num_layers=layers)
        if flex.enabled and flex.first_select_layer >= layers - 1:  # a cut decoder keeps one select and one hierarchical layer
            flex = dataclasses.replace(flex, first_select_layer=max(0, layers - 2))
    if hr_budget is not None:
        flex = dataclasses.replace(flex, hr_budget=hr_budget)
    return dataclasses.replace(
        cfg, text=text, flex=flex, dtype="bfloat16", param_dtype="float32" if program == "train" else "bfloat16",
        remat_policy=remat if program == "train" else "none", attention_impl=attention_impl,
        scan_layers=cfg.scan_layers and not unroll_layers,
    )


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per tower (``vision``, ``projector``, ``text``) and in all, from the abstract tree."""
    counts: Counter = Counter()
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
        counts[jax.tree_util.keystr(path[:1], simple=True, separator="/")] += int(np.prod(leaf.shape))
    return {**dict(counts), "total": sum(counts.values())}


def model_flops(cfg: ModelConfig, program: str, batch: int, seq_len: int, rows: int, lora: LoraConfig | None = None) -> float:
    """The program's model FLOPs for the global batch, by :mod:`flexattn_jax.flops`' one model (training's MFU
    counts the same): ``train`` a training step with ``rows`` select rows (with ``lora`` enabled the LoRA step's:
    no frozen weight gradients, the adapters added); ``prefill`` / ``likelihood`` a forward with one select row;
    ``decode`` one step over the prompt's cache and :data:`ANSWER_ROOM` answer slots."""
    if program == "train":
        if lora is not None and lora.enabled:
            return F.lora_train_flops(cfg, batch, seq_len, rows, lora.rank)
        return F.train_flops(cfg, batch, seq_len, rows)
    if program in ("decode", "serve"):
        return F.decode_step_model_flops(cfg, batch, seq_len + ANSWER_ROOM)
    return F.model_flops(cfg, batch, seq_len, 1)


# ---- programs ------------------------------------------------------------------------------------

def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _inference_inputs(cfg: ModelConfig, mesh: Mesh, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = cfg.image_size
    shapes = {"input_ids": ((batch, seq_len), jnp.int32), "attention_mask": ((batch, seq_len), jnp.bool_),
              "pixel_values": ((batch, s, s, cfg.vision.num_channels), jnp.bfloat16), "margin": ((batch, 2), jnp.int32)}
    return {k: _sds(shp, dt, S.batch_sharding(mesh, shp)) for k, (shp, dt) in shapes.items()}


def _abstract_inference_params(cfg: ModelConfig, mesh: Mesh, quantize: str | None = None):
    abstract = abstract_params(cfg)
    if quantize is not None:  # the decoder linears stored as ``generate --quantize`` / ``convert --quantize`` hold them
        abstract = quantized_abstract(abstract, quantize)
    return S.abstract_with_shardings(abstract, S.param_shardings(abstract, mesh))


def _state_shardings(state, mesh: Mesh, batch: int):
    """Decode state as prefill leaves it: the batch over (data, fsdp); the stacked K/V caches (layers, B, slots,
    kv heads, head dim) also their heads over tensor, as the k/v projections shard them; scalars replicated."""
    def one(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if leaf.ndim == 0:
            return _sds(leaf.shape, leaf.dtype, S.replicated(mesh))
        stacked_kv = re.match(r"^cache/(k|v)$|^hr_kv/", name) is not None
        dim = 1 if stacked_kv else 0
        if leaf.shape[dim] != batch:
            raise AotError(f"decode state {name} {leaf.shape}: no batch axis of {batch} at dim {dim}")
        if stacked_kv and leaf.ndim == 5:
            spec = S.logical_to_spec((None, "batch", None, "kv_heads", None), leaf.shape, mesh)
            return _sds(leaf.shape, leaf.dtype, NamedSharding(mesh, spec))
        return _sds(leaf.shape, leaf.dtype, S.batch_sharding(mesh, leaf.shape, batch_dim=dim))

    return jax.tree_util.tree_map_with_path(one, state)


def train_config(lora: LoraConfig | None = None):
    """The compiled train step's settings: full fine-tuning (projector and decoder), or with ``lora`` (enabled) train's
    ``--lora`` default: adapters and the projector on a frozen base."""
    from train.config import TrainConfig

    return TrainConfig(trainable="projector", lora=lora) if lora is not None and lora.enabled else TrainConfig(trainable="projector,llm")


def lower_program(cfg: ModelConfig, mesh: Mesh, program: str, batch: int, seq_len: int, rows: int,
                  lora: LoraConfig | None = None, quantize: str | None = None):
    """``jax.jit(program).lower(...)`` for ``mesh`` with abstract, sharded inputs (nothing is allocated).

    ``lora`` (enabled): the train step trains adapters and the projector on a frozen base, quantised with its
    ``base_quant`` (QLoRA), as ``train --lora`` builds it; ``quantize``: the inference programs' decoder linears stored
    weight-only quantised, as ``generate --quantize`` holds them."""
    from flexattn_jax import generate as G

    if program == "train":
        from train.step import make_example_batch, make_step

        fns = make_step(cfg, train_config(lora), mesh, total_steps=1000)
        host = make_example_batch(cfg, batch, seq_len, rows)
        abstract_batch = {k: _sds(x.shape, x.dtype, fns.batch_sharding(x.shape)) for k, x in host.items()}
        return fns.step.lower(fns.abstract_state, abstract_batch)
    params = _abstract_inference_params(cfg, mesh, quantize)
    x = _inference_inputs(cfg, mesh, batch, seq_len)
    max_len = seq_len + ANSWER_ROOM
    prefill = lambda p, ids, px, m, mg: G.prefill(p, cfg, ids, px, m, mg, max_len=max_len)
    with S.target_mesh(mesh):
        if program == "prefill":
            return jax.jit(prefill).lower(params, x["input_ids"], x["pixel_values"], x["attention_mask"], x["margin"])
        if program == "decode":
            state = jax.eval_shape(prefill, params, x["input_ids"], x["pixel_values"], x["attention_mask"], x["margin"])[0]
            state = _state_shardings(state, mesh, batch)
            token = _sds((batch,), jnp.int32, S.batch_sharding(mesh, (batch,)))
            step = lambda p, st, tok: G.decode_step(p, cfg, st, tok)[:2]
            return jax.jit(step, donate_argnums=(1,)).lower(params, state, token)
        if program == "likelihood":
            from flexattn_jax.app.eval.likelihood import option_losses

            labels = _sds((batch, seq_len), jnp.int32, S.batch_sharding(mesh, (batch, seq_len)))
            question = _sds((batch,), jnp.int32, S.batch_sharding(mesh, (batch,)))
            fn = lambda p, ids, lab, m, px, q, mg: option_losses(p, cfg, ids, lab, m, px, q, mg, None, None)
            return jax.jit(fn).lower(params, x["input_ids"], labels, x["attention_mask"], x["pixel_values"], question, x["margin"])
    raise AotError(f"--program {program!r}: use one of {PROGRAMS}")


SERVE_PROGRAMS = ("step", "insert", "encode", "prefill")  # the last two do not depend on the slot count


def lower_serve(cfg: ModelConfig, mesh: Mesh, slots: int, seq_len: int, rows: int,
                programs: tuple[str, ...] = SERVE_PROGRAMS) -> tuple[dict[str, Any], Any]:
    """The serving engine's ``programs`` lowered for ``mesh`` (:mod:`flexattn_jax.slots`, the ``project`` HR strategy):
    ``step`` (one token for ``slots`` slots of ``seq_len + ANSWER_ROOM`` tokens), ``encode`` and ``prefill`` of ``rows``
    prompts of ``seq_len`` tokens, ``insert`` of those rows; and the slot state (sharded by
    :func:`~flexattn_jax.slots.slot_specs`)."""
    from flexattn_jax import slots as SL

    params = _abstract_inference_params(cfg, mesh)
    max_len = seq_len + ANSWER_ROOM
    x = _inference_inputs(cfg, mesh, rows, seq_len)
    vec = {name: _sds((rows,), dt, S.batch_sharding(mesh, (rows,))) for name, dt in (("t", jnp.float32), ("p", jnp.float32),
                                                                                     ("seed", jnp.int32))}
    with S.target_mesh(mesh):
        state = SL.slot_shapes(params, cfg, slots, max_len)
        state = S.abstract_with_shardings(state, SL.slot_shardings(state, mesh))
        feats = jax.eval_shape(lambda p, px: SL.encode_images(p, cfg, px), params, x["pixel_values"])
        lr, hr = (None if f is None else _sds(f.shape, f.dtype, S.batch_sharding(mesh, f.shape)) for f in feats)
        args = (params, cfg, x["input_ids"], x["attention_mask"], lr, hr, x["margin"], vec["t"], vec["p"], vec["seed"])
        new = jax.eval_shape(lambda *a: SL.prefill_rows(*a[:1], cfg, *a[1:], max_len=max_len), *args[:1], *args[2:])[0]
        new = S.abstract_with_shardings(new, SL.slot_shardings(new, mesh))
        lower = {"step": lambda: SL.decode_slots.lower(params, cfg, state),
                 "encode": lambda: SL.encode_images.lower(params, cfg, x["pixel_values"]),
                 "prefill": lambda: SL.prefill_rows.lower(*args, max_len=max_len),
                 "insert": lambda: SL.insert_rows.lower(state, new, _sds((rows,), jnp.int32, S.replicated(mesh)))}
        return {name: lower[name]() for name in programs}, state


def compile_lowered(lowered, tgt: Target, options: dict[str, Any] | None = None):
    """``lowered.compile()`` with the target platform's :data:`COMPILER_OPTIONS` and ``options`` (e.g.
    :func:`compiler_options`)."""
    return lowered.compile(compiler_options={**COMPILER_OPTIONS.get(tgt.platform, {}), **(options or {})} or None)


def per_chip_bytes(compiled) -> dict[str, int]:
    """The compiler's buffer assignment per chip: arguments, temporaries, outputs, aliases and their peak."""
    mem = compiled.memory_analysis()
    args, temps, outs, alias = (int(getattr(mem, f, 0) or 0) for f in (
        "argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"))
    return {"arguments": args, "temporaries": temps, "outputs": outs, "aliases": alias, "peak": args + temps + outs - alias}


def state_bytes_per_chip(tree) -> int:
    """Bytes of the largest shard of a tree of sharded ``ShapeDtypeStruct`` / array leaves on one chip."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=8)
def _serve_row_programs(tgt: Target, cfg: ModelConfig, mesh: str | None, seq_len: int, rows: int) -> tuple[dict[str, dict], str]:
    """The engine's encode and prefill of ``rows`` prompts compiled (once per model, target, mesh and length: they do not
    depend on the slot count, which ``--find-batch`` varies): per-chip bytes per program, and their HLO text."""
    lowered, _ = lower_serve(cfg, target_mesh_for(tgt, mesh), 1, seq_len, rows, programs=("encode", "prefill"))
    compiled = {name: compile_lowered(low, tgt) for name, low in lowered.items()}
    return {name: per_chip_bytes(c) for name, c in compiled.items()}, "\n".join(c.as_text() for c in compiled.values())


def _compile_serve(tgt: Target, cfg: ModelConfig, mesh: str | None, slots: int, seq_len: int,
                   rows: int) -> tuple[dict[str, int], dict[str, int], Any, str]:
    """The serve programs compiled: the step's per-chip bytes with ``peak`` the largest of the four programs' (encode
    and prefill run beside the resident slot state, which is no argument of theirs), each program's peak and the slot
    state's bytes, the compiled step, and the HLO text of all four."""
    lowered, slot_state = lower_serve(cfg, target_mesh_for(tgt, mesh), slots, seq_len, rows, programs=("step", "insert"))
    compiled = {name: compile_lowered(low, tgt) for name, low in lowered.items()}
    fixed, fixed_hlo = _serve_row_programs(tgt, cfg, mesh, seq_len, rows)
    mem = {**{name: per_chip_bytes(c) for name, c in compiled.items()}, **fixed}
    state = state_bytes_per_chip(slot_state)
    peaks = {name: m["peak"] + (state if name in ("encode", "prefill") else 0) for name, m in mem.items()}
    hlo = "\n".join([*(c.as_text() for c in compiled.values()), fixed_hlo])
    return {**mem["step"], "peak": max(peaks.values())}, {**peaks, "slot_state": state}, compiled["step"], hlo


_CUSTOM_CALL = re.compile(r"%([\w.\-$]+) = .*?custom-call\(.*?custom_call_target=\"([^\"]+)\"")


def count_loops(hlo_text: str) -> int:
    """``while`` instructions in compiled HLO: the scanned layers' loops, and those the compiler adds itself (collective
    matmuls over an fsdp axis); cost analysis counts each loop's body once."""
    return len(re.findall(r"\swhile\(", hlo_text))


_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')


def _stack_tables(hlo_text: str) -> dict[str, dict[int, Any]]:
    """HLO text's ``FileNames`` / ``FunctionNames`` / ``FileLocations`` / ``StackFrames`` tables (``id -> value``; the last
    two as ``{key: int}``)."""
    tables: dict[str, dict[int, Any]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = _TABLE_ROW.match(line) if current is not None else None
        if m is None:
            current = None if not line.strip() else current
            continue
        current[int(m.group(1))] = m.group(2) if m.group(2) is not None else {
            k: int(v) for k, v in (kv.split("=") for kv in m.group(3).split())}
    return tables


def cycle_breakdown(hlo_text: str) -> dict[str, int]:
    """The TPU compiler's ``estimated_cycles`` of compiled HLO's instructions summed by the source line each came from
    (``file:line:function`` of the innermost recorded stack frame, then ``< file:line:function`` of the nearest caller in
    ``flexattn_jax/`` or ``train/`` in another function; ``(no source)`` without a frame), largest first. Like
    cost analysis it counts a loop body's instructions once; Mosaic kernels carry no estimate here (their
    ``pl.CostEstimate`` counts instead)."""
    t = _stack_tables(hlo_text)
    files, funcs, locs, frames = (t.get(k, {}) for k in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"))

    def frame(fid: int) -> tuple[str, str, str] | None:
        loc = locs.get(frames.get(fid, {}).get("file_location_id", -1))
        if loc is None:
            return None
        path = files.get(loc.get("file_name_id"), "?")
        return path, f"{'/'.join(Path(path).parts[-2:])}:{loc.get('line')}", funcs.get(loc.get("function_name_id"), "?")

    def where(fid: int | None) -> str:  # the innermost frame, and the nearest caller in the project in another function
        chain, seen = [], set()
        while fid and fid not in seen and (f := frame(fid)) is not None:
            seen.add(fid)
            chain.append(f)
            fid = frames[fid].get("parent_frame_id", 0) - 1  # the text's parent ids are one above the frame ids
        if not chain:
            return "(no source)"
        key = f"{chain[0][1]}:{chain[0][2]}"
        caller = next((c for c in chain[1:] if c[2] != chain[0][2] and any(f"/{d}/" in c[0] for d in ("flexattn_jax", "train"))), None)
        return key if caller is None else f"{key} < {caller[1]}:{caller[2]}"

    counts: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _CYCLES.search(line)
        if m:
            f = _FRAME.search(line)
            counts[where(int(f.group(1)) if f else None)] += int(m.group(1))
    return dict(counts.most_common())


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Attention kernels in compiled HLO: Mosaic calls (``tpu_custom_call``, keyed by kernel name) and cuDNN fMHA calls."""
    counts: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.search(line)
        if not m:
            continue
        name, target = m.groups()
        if target == "tpu_custom_call":
            counts["mosaic:" + re.sub(r"\.\d+$", "", name)] += 1
        elif target.startswith("__cudnn$fmha"):
            counts[target] += 1
    return dict(sorted(counts.items()))


@dataclasses.dataclass
class CompileReport:
    """What the target's compiler said about one program (the ``--json`` object)."""

    target: str
    topology: str
    chips: int
    mesh: dict[str, int]
    model: str
    program: str
    layers: int
    global_batch: int
    per_device_batch: int
    seq_len: int
    select_rows: int
    attention_impl: str
    remat: str
    per_chip_bytes: dict[str, int]
    capacity_bytes: int
    usable_bytes: int
    fits: bool
    kernels: dict[str, int]
    compile_seconds: float
    flops_per_chip: float | None
    model_flops_per_chip: float
    optimal_seconds: float | None = None  # the TPU compiler's, loop bodies counted once
    while_loops: int | None = None  # :func:`count_loops`
    cycles: dict[str, int] | None = None  # :func:`cycle_breakdown`, with ``breakdown=True``
    step_seconds_estimate: float | None = None  # :func:`step_estimate`
    mfu_estimate: float | None = None
    params: dict[str, int] = dataclasses.field(default_factory=dict)
    serve_peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # serve: each program's peak and the slot state
    lora: dict[str, Any] | None = None  # the LoRA settings of a LoRA / QLoRA train step (``base_quant`` among them)
    quantize: str | None = None  # the inference programs' weight-only quantisation
    unrolled: bool = False  # the layer loops unrolled: the cost analysis (FLOPs, optimal_seconds) counts every layer
    bytes_accessed_per_chip: float | None = None  # the compiler's cost analysis: HBM bytes read and written (loop bodies once)
    usable_limit: bool = False  # compiled with the usable HBM as the compiler's limit (:func:`compiler_options`)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_program(
    target: str | Target,
    model: str | ModelConfig,
    program: str = "train",
    *,
    mesh: str | None = None,
    per_device_batch: int = 1,
    seq_len: int = 2048,
    select_rows: int | None = None,
    hr_budget: Any = None,
    attention_impl: str = "auto",
    remat: str = "full",
    layers: int | None = None,
    unroll_layers: bool = False,
    usable_limit: bool = False,
    model_name: str | None = None,
    slots: int | None = None,
    lora: LoraConfig | None = None,
    quantize: str | None = None,
    breakdown: bool = False,
) -> CompileReport:
    """Compile ``program`` of ``model`` for ``target`` (see the module docstring) and report per chip; ``lora`` and
    ``quantize`` as :func:`lower_program` takes them, ``unroll_layers`` as :func:`program_config`, ``usable_limit`` as
    :func:`compiler_options` (a program that does not fit is then an AotError).

    ``breakdown``: the report's ``cycles`` (:func:`cycle_breakdown` of the compiled program).

    ``serve``: the global batch is the engine's slot count (``slots``, else ``per_device_batch`` x data x fsdp),
    ``seq_len`` the longest prompt; ``per_chip_bytes['peak']`` is the largest of its programs' peaks."""
    tgt = parse_target(target) if isinstance(target, str) else target
    if program not in PROGRAMS:
        raise AotError(f"--program {program!r}: use one of {PROGRAMS}")
    lora = lora if lora is not None and lora.enabled else None
    if lora is not None and program != "train":
        raise AotError(f"--lora is a training setting; --program {program} takes --quantize for quantised weights")
    if quantize is not None and program == "serve":
        raise AotError("--quantize: the serve program takes the checkpoint's own weights; size a quantised model with --program decode")
    if quantize is not None and program == "train":
        raise AotError("--quantize is for the inference programs; a quantised train step is --lora --base-quant")
    if quantize is not None:
        check_mode(quantize)
    if attention_impl not in ATTENTION_IMPLS:
        raise AotError(f"--attention-impl {attention_impl!r}: use one of {ATTENTION_IMPLS}")
    if per_device_batch < 1 or seq_len < 1:
        raise AotError(f"--per-device-batch {per_device_batch} and --seq-len {seq_len} must be positive")
    if select_rows is not None and select_rows < 1:
        raise AotError(f"--select-rows {select_rows} must be at least 1")
    base = load_model_config(model) if isinstance(model, str) else model
    name = model_name or (model if isinstance(model, str) else "config")
    cfg = program_config(base, program=program, attention_impl=attention_impl, remat=remat, hr_budget=hr_budget, layers=layers,
                         unroll_layers=unroll_layers)
    if seq_len < cfg.num_image_tokens + 1:  # a sample holds the image's tokens and at least one text token
        raise AotError(f"--seq-len {seq_len} is shorter than a sample: the image alone is {cfg.num_image_tokens} tokens; "
                       f"use at least {cfg.num_image_tokens + 1}")
    m = target_mesh_for(tgt, mesh)
    options = compiler_options(tgt, usable_limit)
    if usable_limit and program == "serve":
        raise AotError("--usable-hbm-limit: for the train, prefill, decode and likelihood programs (serve compiles four)")
    shards = m.shape["data"] * m.shape["fsdp"]
    if slots is not None:
        if program != "serve":
            raise AotError(f"--slots {slots}: only for --program serve")
        if slots < 1 or slots % shards:
            raise AotError(f"--slots {slots}: a positive multiple of the mesh's data x fsdp ({shards})")
        per_device_batch = slots // shards
    batch = per_device_batch * shards
    rows = min(seq_len, select_rows if select_rows is not None else seq_len)
    t0 = time.perf_counter()
    serve_peaks: dict[str, int] = {}
    try:
        if program == "serve":
            bytes_, serve_peaks, compiled, hlo = _compile_serve(tgt, cfg, mesh, batch, seq_len, min(SERVE_PREFILL_ROWS, batch))
        else:
            compiled = compile_lowered(lower_program(cfg, m, program, batch, seq_len, rows, lora, quantize), tgt, options)
            bytes_, hlo = per_chip_bytes(compiled), compiled.as_text()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program whose buffers exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        at = f"{batch} slots" if program == "serve" else f"batch {per_device_batch}/device"
        raise AotError(f"{name} {program} at {at} does not fit {tgt.name}: {first}") from None
    seconds = time.perf_counter() - t0
    peak = bytes_["peak"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    optimal = float(cost["optimal_seconds"]) if cost and cost.get("optimal_seconds", 0) > 0 else None
    accessed = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    mflops = model_flops(cfg, program, batch, seq_len, rows, lora) / tgt.chips
    step_s, mfu = step_estimate(optimal, flops, mflops, tgt.chip.peak_flops)
    usable = usable_bytes(tgt)
    return CompileReport(
        target=tgt.name, topology=tgt.topology, chips=tgt.chips, mesh=dict(m.shape), model=name, program=program,
        layers=cfg.text.num_layers, global_batch=batch, per_device_batch=per_device_batch, seq_len=seq_len,
        select_rows=rows if cfg.flex.enabled and program == "train" else 0, attention_impl=attention_impl, remat=cfg.remat_policy,
        per_chip_bytes=bytes_,
        capacity_bytes=tgt.chip.hbm_bytes, usable_bytes=usable, fits=peak <= usable,
        kernels=count_kernels(hlo), compile_seconds=round(seconds, 2), flops_per_chip=flops,
        model_flops_per_chip=mflops, optimal_seconds=optimal, step_seconds_estimate=step_s, mfu_estimate=mfu,
        while_loops=count_loops(hlo), cycles=cycle_breakdown(hlo) if breakdown else None,
        params=param_counts(cfg), serve_peaks=serve_peaks, lora=None if lora is None else lora.to_dict(), quantize=quantize,
        unrolled=not cfg.scan_layers, bytes_accessed_per_chip=accessed, usable_limit=usable_limit,
    )


def step_estimate(optimal: float | None, compiler_flops: float | None, model_flops: float,
                  peak_flops: float) -> tuple[float | None, float | None]:
    """``(step seconds, MFU)`` estimated from the TPU compiler's ``optimal_seconds``.

    XLA's cost analysis, ``optimal_seconds`` included, counts a loop body once, and the decoder and
    the vision tower are ``lax.scan`` loops: the compiler's FLOPs are a fraction of the model's.
    The step time is scaled by ``model / compiler`` FLOPs (the loop bodies assumed to run at the
    counted part's rate), so the MFU is the compiler's own rate on what it counted:
    ``compiler FLOPs / (optimal_seconds x peak)``. An estimate, not a measurement.
    """
    if optimal is None or not compiler_flops:
        return None, None
    scale = max(1.0, model_flops / compiler_flops)
    return optimal * scale, F.mfu(model_flops, optimal * scale, 1, peak_flops)


def find_batch(compile_at: Callable[[int], CompileReport], limit: int = 256,
               log: Callable[[CompileReport], None] | None = None) -> tuple[CompileReport | None, list[CompileReport]]:
    """The largest per-device batch up to ``limit`` whose program fits, and every compile's report (by batch).

    Compiles at 1 and 2, then at the batch where the peak, interpolated linearly (secant through the nearest
    fitting and failing batches, or the two largest fitting ones), meets the usable HBM, until a fitting batch
    and the next one that does not are both known. ``log`` sees each report as it is compiled."""
    seen: dict[int, CompileReport] = {}

    def at(b: int) -> CompileReport:
        if b not in seen:
            seen[b] = compile_at(b)
            if log is not None:
                log(seen[b])
        return seen[b]

    def peak(b: int) -> int:
        return seen[b].per_chip_bytes["peak"]

    if not at(1).fits or limit < 2:
        return (seen[1] if seen[1].fits else None), [r for _, r in sorted(seen.items())]
    lo, hi = (2, limit + 1) if at(2).fits else (1, 2)
    while hi - lo > 1:
        a = hi if hi in seen else max(b for b in seen if seen[b].fits and b < lo)
        slope = max(1.0, (peak(a) - peak(lo)) / (a - lo))
        guess = lo + int((seen[lo].usable_bytes - peak(lo)) // slope)
        b = min(max(guess, lo + 1), hi - 1)
        if at(b).fits:
            lo = b
        else:
            hi = b
    return at(lo), [r for _, r in sorted(seen.items())]


# ---- the command ---------------------------------------------------------------------------------

LORA_ARGS = SettingsArgs(LoraConfig, flags={"enabled": "--lora", "base_quant": "--base-quant", "rank": "--lora-rank",
                                            "alpha": "--lora-alpha", "dropout": "--lora-dropout", "targets": "--lora-targets"})
"""``train``'s LoRA / QLoRA flags (the same spellings and defaults: the fields of :class:`flexattn_jax.lora.LoraConfig`)."""

def compile_parser(prog: str = "flexattn-jax compile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compile a FlexAttention program for a TPU slice or a GPU node from this host (no accelerator, no "
                    "weights) and report per chip: HBM against capacity, the attention kernels lowered, compile time, "
                    "FLOPs and, on TPU, the compiler's step-time estimate and MFU.",
    )
    p.add_argument("--target", required=True, help="TPU topology (v5p:4x4x4, v5p-128, v5e-256, v6e-64, v4-32, v5e:2x2; "
                   "-N counts TensorCores on v4/v5p, chips on v5e/v6e) or GPU node (h100x8, h200x8)")
    p.add_argument("--model", default="llava-flexattn-7b", help=f"preset ({', '.join(PRESETS)}), a config.json, or a converted checkpoint")
    p.add_argument("--program", default="train", choices=PROGRAMS)
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. over all chips (default: fsdp over all)")
    p.add_argument("--per-device-batch", type=int, default=1, help="samples per data x fsdp shard (global = this x data x fsdp)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (the prompt, for prefill/decode)")
    p.add_argument("--slots", type=int, default=None,
                   help="--program serve: the engine's decode slots in all (a multiple of data x fsdp; default: --per-device-batch "
                   "per shard); --find-batch searches slots per data x fsdp shard")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"--program serve: the longest prompt, in tokens (the same as --seq-len; each slot holds it and "
                   f"{ANSWER_ROOM} answer tokens)")
    p.add_argument("--select-rows", type=int, default=None, help="R, training's select rows (default: --seq-len)")
    p.add_argument("--hr-budget", default=None, help="HR keys per select row: a fraction, a count or 'adaptive' (default: the model's)")
    p.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots_saveable"), help="training's remat policy per layer")
    p.add_argument("--layers", type=int, default=None, help="compile a decoder cut to N layers (quick checks)")
    p.add_argument("--unroll-layers", action="store_true", help="unroll the layer loops (no scan): the compiler's FLOPs and "
                   "optimal_seconds then count every layer, not a loop body once (slower to compile)")
    p.add_argument("--usable-hbm-limit", action="store_true", help="TPU: give the compiler the usable HBM (95%% of the chip, what "
                   "the runtime leaves) as its limit, so it schedules to fit it; a program that cannot is refused")
    LORA_ARGS.add(p.add_argument_group("LoRA / QLoRA train step (as train --lora)"))
    p.add_argument("--quantize", choices=QUANT_MODES, default=None, help="prefill / decode / likelihood with the decoder linears "
                   "weight-only quantised (as generate --quantize)")
    p.add_argument("--find-batch", action="store_true",
                   help="find the largest per-device batch that fits (peak memory interpolated between compiles)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_report(r: CompileReport) -> str:
    b = r.per_chip_bytes
    mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"{r.model} {r.program} on {r.target} ({r.topology}, {r.chips} chips, mesh {mesh}); {r.layers} decoder layers, "
        f"batch {r.per_device_batch}/device ({r.global_batch} global), T={r.seq_len}" + (f", R={r.select_rows}" if r.select_rows else ""),
        f"  per chip: arguments {_gib(b['arguments'])}, temporaries {_gib(b['temporaries'])}, outputs {_gib(b['outputs'])}, "
        f"aliased {_gib(b['aliases'])}; peak {_gib(b['peak'])} of {_gib(r.capacity_bytes)} "
        f"({'fits' if r.fits else 'does NOT fit'} in the usable {_gib(r.usable_bytes)}"
        + ("; the compiler's limit)" if r.usable_limit else ")"),
        "  attention kernels: " + (", ".join(f"{k} x{v}" for k, v in r.kernels.items()) or "none (XLA attention)"),
        f"  compiled in {r.compile_seconds:.1f} s; FLOPs per chip: compiler "
        + ("n/a" if r.flops_per_chip is None else f"{r.flops_per_chip:.3e}") + f", model {r.model_flops_per_chip:.3e}",
    ]
    if r.serve_peaks:
        lines.append("  serve programs' peaks (encode and prefill beside the slot state): "
                     + ", ".join(f"{k} {_gib(v)}" for k, v in r.serve_peaks.items() if k != "slot_state")
                     + f"; slot state {_gib(r.serve_peaks['slot_state'])} per chip ({r.global_batch} slots)")
    if r.optimal_seconds is not None:
        counted = "every layer: unrolled" if r.unrolled else "loop bodies once"
        lines.append(f"  TPU compiler's optimal_seconds {r.optimal_seconds:.4f} ({counted}); step estimate "
                     f"{r.step_seconds_estimate:.3f} s, MFU estimate {r.mfu_estimate:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = compile_parser().parse_args(argv)
    try:
        if args.program != "serve" and (args.slots is not None or args.max_context is not None):
            raise AotError("--slots and --max-context are options of --program serve")
        if args.slots is not None and args.find_batch:
            raise AotError("--slots and --find-batch: give one (--find-batch searches the slots)")
        if args.usable_hbm_limit and args.find_batch:
            raise AotError("--usable-hbm-limit and --find-batch: give one (the search interpolates the peaks of batches that do not fit)")
        if args.max_context is not None:
            args.seq_len = args.max_context
        budget = parse_hr_budget(args.hr_budget, "--hr-budget") if args.hr_budget is not None else None
        kwargs = dict(mesh=args.mesh, seq_len=args.seq_len, select_rows=args.select_rows, hr_budget=budget,
                      attention_impl=args.attention_impl, remat=args.remat, layers=args.layers,
                      unroll_layers=args.unroll_layers, usable_limit=args.usable_hbm_limit, model_name=args.model,
                      lora=LORA_ARGS.build(args), quantize=args.quantize)
        if args.slots is not None and not args.find_batch:
            kwargs["slots"] = args.slots
        target = parse_target(args.target)
        model = load_model_config(args.model)
        if args.find_batch:
            best, tried = find_batch(lambda b: compile_program(target, model, args.program, per_device_batch=b, **kwargs))
            if args.json:
                print(json.dumps({"largest_fitting": None if best is None else best.as_dict(),
                                  "tried": [{"per_device_batch": t.per_device_batch, "peak": t.per_chip_bytes["peak"], "fits": t.fits}
                                            for t in tried]}))
            else:
                for t in tried:
                    print(f"per-device batch {t.per_device_batch}: peak {_gib(t.per_chip_bytes['peak'])} -> {'fits' if t.fits else 'no'}")
                print("largest fitting:" if best else "no batch fits", file=sys.stdout)
                if best:
                    print(format_report(best))
            return 0 if best is not None else 1
        report = compile_program(target, model, args.program, per_device_batch=args.per_device_batch, **kwargs)
    except (AotError, ValueError) as e:
        print(f"flexattn-jax compile: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict()) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
