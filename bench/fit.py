"""Fit-and-speed table from the targets' own compilers: ``python -m bench.fit [--quick] [--out docs/fit.json]``.

Training (full fine-tune: bf16 compute, fp32 masters + AdamW, frozen CLIP, full remat; T = 2048,
R = 2048 select rows, 1008 px) of LLaVA-FlexAttn-7B / 13B and plain LLaVA-1.5-7B on v5e-256, v5p-64,
v6e-64, v4-32 and 8 x H100: the largest per-chip batch that fits, its peak HBM and, on TPU, the
compiler's step-time estimate (``optimal_seconds`` scaled for the loops it counts once:
``aot.step_estimate``) and MFU. Inference of the 7B FlexAttention model on
v5e-8 and 1 x H200: prefill at batch 32 and one decode step. The serving engine (``--program serve``) of the
7B on v5e-4 and v5e-8 and the 13B on v5e-8, tensor parallel: the most decode slots that fit with prompts of T
tokens (each slot holds T + 128). And compile seconds against decoder depth
(one ``lax.scan`` over the layers). Every figure comes from :func:`flexattn_jax.app.aot.compile_program`;
a target whose compiler is not installed (libtpu, the CUDA plugin) is reported as skipped, with why.

LoRA, QLoRA and int8 (``--only lora``, :data:`LORA_JOBS`): the 7B LoRA step (bf16 base) on v5e-8 at per-chip batch 2,
the QLoRA step (int4 base) on one v5e chip at batch 1, the LoRA step on v5p-64 at the full fine-tune's batch (19 per
chip; its step estimate against the full fine-tune's: :func:`step_vs_full`), int8 prefill (also held to the usable HBM)
and decode on one v5e chip at batch 8 with a 1024-token context, and the decode step int8 against bf16 on v5p-8 (the
target whose compiler gives a time estimate), scanned and unrolled (every layer counted) at batch 8 and 1. Every one is
the whole 32-layer program; the 13B QLoRA step (int4 base) on one H100 the whole 40-layer program, at the largest batch
that fits (the CUDA plugin).

The largest batch: compile at per-chip batch 1 and 2, then where the peak, interpolated linearly between
the nearest batches that fit and fail, meets the usable HBM, until the boundary is found: a few compiles
per row. Then plain LLaVA-1.5-7B at the FlexAttention-7B row's batch, for the same-batch step ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from flexattn_jax import quant as Q
from flexattn_jax.app import aot
from flexattn_jax.lora import LoraConfig

TRAIN_TARGETS = ("v5e-256", "v5p-64", "v6e-64", "v4-32", "h100x8")
TRAIN_MODELS = ("llava-flexattn-7b", "llava-flexattn-13b", "llava-1.5-7b")
INFER = (("v5e-8", "tensor=8"), ("h200x1", "fsdp=1"))  # 7B bf16 weights (16 GB) only fit a v5e chip sharded
SEQ, ROWS = 2048, 2048
MAX_BATCH = 64
# the engine's bf16 weights over tensor (7B: 15.2 GiB, 13B: 28.8 GiB, beyond one v5e chip); slots searched up to MAX_SLOTS
SERVE = (("llava-flexattn-7b", "v5e-4", "tensor=4"), ("llava-flexattn-7b", "v5e-8", "tensor=8"),
         ("llava-flexattn-13b", "v5e-8", "tensor=8"))
MAX_SLOTS = 256


def _row(r: aot.CompileReport) -> dict[str, Any]:
    keys = ("target", "chips", "model", "program", "layers", "per_device_batch", "global_batch", "per_chip_bytes", "capacity_bytes",
            "fits", "kernels", "compile_seconds", "flops_per_chip", "model_flops_per_chip", "optimal_seconds",
            "step_seconds_estimate", "mfu_estimate")
    return {k: getattr(r, k) for k in keys}


def largest_batch(compile_at, log, limit: int = MAX_BATCH) -> tuple[aot.CompileReport | None, list[dict]]:
    """Largest fitting per-chip batch up to ``limit`` (:func:`flexattn_jax.app.aot.find_batch`) and each compile's row."""
    def said(r: aot.CompileReport) -> None:
        log(f"    batch {r.per_device_batch}: peak {r.per_chip_bytes['peak'] / 2**30:.2f} GiB ({'fits' if r.fits else 'no'}), "
            f"{r.compile_seconds:.0f} s")

    best, tried = aot.find_batch(compile_at, limit, log=said)
    return best, [_row(r) for r in tried]


def jobs(quick: bool) -> list[tuple]:
    """The compiles in priority order, the goals' rows first.

    Jobs: ('train', model, target), ('same_batch', target) (plain LLaVA-1.5-7B at the FlexAttention-7B row's
    batch, for the step-time ratio), ('infer', target, mesh, program), ('serve', model, target, mesh) (the most
    decode slots), ('depth', layers).
    """
    first = [("train", "llava-flexattn-7b", "v5p-64"), ("train", "llava-1.5-7b", "v5p-64"), ("same_batch", "v5p-64"),
             ("train", "llava-flexattn-7b", "h100x8"), ("train", "llava-flexattn-7b", "v5e-256")]
    infer = [("infer", t, m, prog) for t, m in INFER for prog in ("prefill", "decode")]
    depth = [("depth", n) for n in (4, 8, 16)]
    if quick:
        return first[:3] + infer + depth[:2]
    rest = [("train", m, t) for m in TRAIN_MODELS for t in TRAIN_TARGETS if ("train", m, t) not in first]
    same = [("same_batch", t) for t in TRAIN_TARGETS if ("same_batch", t) not in first]
    big = [j for j in rest if "13b" in j[1]]  # last: a 13B TPU compile takes far longer than a 7B one here
    serve = [("serve", *row) for row in SERVE]
    lora = [("composed",)] + [("lora", i) for i in range(len(LORA_JOBS))]
    return first + infer + serve + depth + lora + [j for j in rest if j not in big] + same + big


LORA_JOBS: tuple[dict[str, Any], ...] = (
    {"name": "7B LoRA, bf16 base", "target": "v5e-8", "program": "train", "lora": {"enabled": True}, "per_device_batch": 2},
    {"name": "7B QLoRA, int4 base", "target": "v5e-1", "program": "train", "lora": {"enabled": True, "base_quant": "int4"},
     "per_device_batch": 1},
    {"name": "7B LoRA, bf16 base", "target": "v5p-64", "program": "train", "lora": {"enabled": True}, "per_device_batch": 19},
    {"name": "7B int8 prefill", "target": "v5e-1", "program": "prefill", "quantize": "int8", "per_device_batch": 8, "seq_len": 1024},
    {"name": "7B int8 prefill, usable HBM as the limit", "target": "v5e-1", "program": "prefill", "quantize": "int8",
     "per_device_batch": 8, "seq_len": 1024, "usable_limit": True},
    {"name": "7B int8 decode", "target": "v5e-1", "program": "decode", "quantize": "int8", "per_device_batch": 8, "seq_len": 1024},
    {"name": "7B int8 decode", "target": "v5p-8", "mesh": "tensor=4", "program": "decode", "quantize": "int8", "per_device_batch": 8,
     "seq_len": 1024},
    {"name": "7B bf16 decode", "target": "v5p-8", "mesh": "tensor=4", "program": "decode", "per_device_batch": 8, "seq_len": 1024},
    *({"name": f"7B {q} decode, unrolled, batch {b}", "target": "v5p-8", "mesh": "tensor=4", "program": "decode", "quantize": quant,
       "per_device_batch": b, "seq_len": 1024, "unroll_layers": True} for b in (8, 1) for q, quant in (("int8", "int8"), ("bf16", None))),
    {"name": "13B QLoRA, int4 base", "model": "llava-flexattn-13b", "target": "h100x1", "program": "train",
     "lora": {"enabled": True, "base_quant": "int4"}, "per_device_batch": 9},
)
"""The LoRA / QLoRA / int8 rows (the 7B FlexAttention model unless ``model`` says; train steps at T = R = 2048, the others'
context 1024; the 13B QLoRA step on one H100 at full depth, its largest fitting batch); the unrolled decode steps are the
int8 / bf16 time ratio over all 32 layers (a scanned step's estimate counts one)."""


def state_bytes_per_chip(cfg, target: aot.Target, mesh: str | None, lora: LoraConfig | None) -> int:
    """Bytes per chip of the train state (parameters, fp32 masters, AdamW moments) of ``cfg`` on ``target``: the
    shard of each leaf of the step's abstract state as its sharding splits it (no compile)."""
    from train.step import make_step

    fns = make_step(cfg, aot.train_config(lora), aot.target_mesh_for(target, mesh), total_steps=1000)
    shards = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.sharding.shard_shape(a.shape), a.dtype), fns.abstract_state)
    return Q.nbytes(shards)


def step_vs_full(res: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A LoRA train row's step estimate against the 7B full fine-tune's at the same target and per-chip batch (a
    ``res['train']`` compile): both are :func:`aot.step_estimate`'s, the compiler's ``optimal_seconds`` scaled by their
    own model / compiler FLOPs. Empty when either has no estimate or no full fine-tune row is at that batch."""
    full = next((r for e in res["train"] if (e["model"], e["target"]) == ("llava-flexattn-7b", row["target"])
                 for r in e["tried"] if r["per_device_batch"] == row["per_device_batch"]), None)
    steps = (row.get("step_seconds_estimate"), None if full is None else full.get("step_seconds_estimate"))
    if row["program"] != "train" or None in steps:
        return {}
    return {"full_step_seconds": steps[1], "step_ratio": steps[0] / steps[1]}


def lora_row(job: dict[str, Any], report: aot.CompileReport, res: dict[str, Any]) -> dict[str, Any]:
    """A :data:`LORA_JOBS` row: the compile's figures and, for a train step, its step against the full fine-tune's."""
    row = {"name": job["name"], **_row(report), "mesh": report.mesh, "seq_len": report.seq_len, "lora": report.lora,
           "quantize": report.quantize, "unrolled": report.unrolled, "bytes_accessed_per_chip": report.bytes_accessed_per_chip,
           "usable_limit": report.usable_limit}
    return {**row, **step_vs_full(res, row)}


def lora_model(job: dict[str, Any]) -> str:
    """The model of a :data:`LORA_JOBS` entry (the 7B FlexAttention model unless it names one)."""
    return job.get("model", "llava-flexattn-7b")


def compile_lora_job(model_cfg, job: dict[str, Any]) -> aot.CompileReport:
    """Compile one :data:`LORA_JOBS` entry (``flexattn-jax compile`` with the same options)."""
    return aot.compile_program(job["target"], model_cfg, job["program"], mesh=job.get("mesh"), per_device_batch=job["per_device_batch"],
                               seq_len=job.get("seq_len", SEQ), select_rows=ROWS if job["program"] == "train" else None,
                               lora=LoraConfig(**job["lora"]) if job.get("lora") else None,
                               quantize=job.get("quantize"), unroll_layers=job.get("unroll_layers", False),
                               usable_limit=job.get("usable_limit", False), model_name=lora_model(job))


COMPOSED_FROM = "v5e-256"  # the full fine-tune compiles whose temporaries :func:`composed_train_estimates` reuses


def composed_train_estimates(res: dict[str, Any], model_cfg) -> list[dict[str, Any]]:
    """Full-depth peak per chip of the LoRA / QLoRA train jobs of :data:`LORA_JOBS`, composed without a 7B compile of
    their own: at each per-chip batch the 7B full fine-tune was compiled at on :data:`COMPOSED_FROM` (``res['train']``),
    that compile's temporaries (the same forward and rematerialised backward through the decoder, the same per-layer
    gathered weights; LoRA adds no base weight gradients) plus the LoRA state per chip on the job's target (exact,
    :func:`state_bytes_per_chip`). The largest batch whose sum fits the usable HBM is the row's. Only the jobs on
    :data:`COMPOSED_FROM`'s chip: another chip's compiler assigns other temporaries. A cross-check of the compiled rows."""
    full = next((e for e in res["train"] if (e["model"], e["target"]) == ("llava-flexattn-7b", COMPOSED_FROM)), None)
    if full is None:
        raise aot.AotError(f"no llava-flexattn-7b full fine-tune row on {COMPOSED_FROM} to compose from")
    out = []
    chip = aot.parse_target(COMPOSED_FROM).chip
    for job in (j for j in LORA_JOBS if j["program"] == "train" and lora_model(j) == "llava-flexattn-7b"
                and aot.parse_target(j["target"]).chip == chip):
        target = aot.parse_target(job["target"])
        lora = LoraConfig(**job["lora"])
        state = state_bytes_per_chip(aot.program_config(model_cfg, program="train"), target, job.get("mesh"), lora)
        usable = int(target.chip.hbm_bytes * aot.USABLE_FRACTION[target.platform])
        peaks = {r["per_device_batch"]: state + r["per_chip_bytes"]["temporaries"] for r in full["tried"]}
        fitting = [b for b, p in peaks.items() if p <= usable]
        out.append({"name": job["name"], "target": job["target"], "lora": lora.to_dict(), "state_bytes": state,
                    "peak_by_batch": peaks, "usable_bytes": usable, "largest_batch": max(fitting, default=None)})
    return out


def quant_decode_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """int8 / bf16 of the unrolled decode steps (:data:`LORA_JOBS`) at each batch where both were compiled: the compiler's
    ``optimal_seconds`` and bytes accessed per chip, over all the layers (unrolled: every layer counted)."""
    at = {(r.get("quantize"), r["per_device_batch"]): r for r in rows if r.get("unrolled") and r["program"] == "decode"}
    out = []
    for (quant, batch), q in sorted(at.items(), key=lambda kv: -kv[0][1]):
        ref = at.get((None, batch))
        if quant is None or ref is None:
            continue
        out.append({"quantize": quant, "per_device_batch": batch, "target": q["target"],
                    "optimal_seconds": (q["optimal_seconds"], ref["optimal_seconds"]),
                    "time_ratio": q["optimal_seconds"] / ref["optimal_seconds"],
                    "bytes_accessed_ratio": q["bytes_accessed_per_chip"] / ref["bytes_accessed_per_chip"],
                    "flops_ratio": q["flops_per_chip"] / ref["flops_per_chip"]})
    return out


SETTINGS = {"seq_len": SEQ, "select_rows": ROWS, "image_px": 1008, "remat": "full", "compute": "bf16", "masters": "fp32 + AdamW",
            "frozen": "CLIP"}


def done_jobs(res: dict[str, Any]) -> set[tuple]:
    """The jobs an earlier (interrupted) run's JSON already holds; skipped ones are tried again."""
    return ({("train", e["model"], e["target"]) for e in res["train"]}
            | {("same_batch", e["target"]) for e in res["same_batch"]}
            | {("infer", r["target"], r["mesh"], r["program"]) for r in res["inference"] if "mesh" in r}
            | {("serve", e["model"], e["target"], e["mesh"]) for e in res["serve"]}
            | {("depth", d["layers"]) for d in res["depth"]}
            | {("lora", i) for i, j in enumerate(LORA_JOBS) for r in res.get("lora", [])
               if (r["name"], r["target"]) == (j["name"], j["target"])}
            | ({("composed",)} if res.get("composed") else set()))


DEPTH_TARGET = "v5p-64"  # the compile-seconds-by-depth jobs


def _target_of(job: tuple) -> str:
    """A job's target: ('train', model, target), ('infer', target, mesh, program), ('serve', model, target, mesh),
    ('depth', layers), ('lora', index), ('composed',)."""
    if job[0] == "lora":
        return LORA_JOBS[job[1]]["target"]
    if job[0] == "composed":
        return COMPOSED_FROM
    return job[2] if job[0] in ("train", "serve") else job[1] if job[0] in ("infer", "same_batch") else DEPTH_TARGET


def _kind(job: tuple) -> str:
    """A job's --only kind: the same-batch comparison is a training job."""
    return "train" if job[0] == "same_batch" else "lora" if job[0] == "composed" else job[0]


def same_batch(res: dict[str, Any], target: str, compile_at, log) -> dict[str, Any]:
    """FlexAttention-7B's and plain LLaVA-1.5-7B's estimated train steps at one per-chip batch on ``target``.

    The batch is the largest that fits FlexAttention; LLaVA-1.5 is compiled there unless its own search
    already did. Raises :class:`aot.AotError` when the FlexAttention row is missing or fits no batch."""
    rows = {e["model"]: e for e in res["train"] if e["target"] == target}
    flex = rows.get("llava-flexattn-7b", {}).get("largest")
    if flex is None:
        raise aot.AotError(f"no llava-flexattn-7b row that fits on {target} to compare against")
    if flex.get("step_seconds_estimate") is None:
        raise aot.AotError(f"the {target} compiler gives no step-time estimate to compare")
    b = flex["per_device_batch"]
    plain = next((r for r in rows.get("llava-1.5-7b", {}).get("tried", []) if r["per_device_batch"] == b), None)
    if plain is None:
        plain = _row(compile_at(b))
        log(f"    llava-1.5-7b at batch {b}: peak {plain['per_chip_bytes']['peak'] / 2**30:.2f} GiB, {plain['compile_seconds']:.0f} s")
    steps = (flex.get("step_seconds_estimate"), plain.get("step_seconds_estimate"))
    ratio = None if None in steps else steps[0] / steps[1]
    return {"target": target, "per_device_batch": b, "flexattention_step_seconds": steps[0], "llava_step_seconds": steps[1],
            "step_ratio": ratio, "llava": plain}


def rederive_estimate(row: dict[str, Any]) -> dict[str, Any]:
    """Step time and MFU of a stored row from its own compiler figures (:func:`aot.step_estimate`).

    Rows written before the estimate scaled ``optimal_seconds`` for the scanned loops carry no
    ``step_seconds_estimate`` and an MFU that counted the loop bodies once; the fields they do carry
    (``optimal_seconds``, compiler and model FLOPs per chip) give the current estimate without a recompile."""
    if row.get("step_seconds_estimate") is None and row.get("optimal_seconds") is not None:
        peak = aot.parse_target(row["target"]).chip.peak_flops
        row["step_seconds_estimate"], row["mfu_estimate"] = aot.step_estimate(
            row["optimal_seconds"], row["flops_per_chip"], row["model_flops_per_chip"], peak)
    return row


def run(quick: bool, log, save=lambda res: None, previous: dict[str, Any] | None = None,
        only: str | None = None, targets: Sequence[str] | None = None, models: Sequence[str] | None = None) -> dict[str, Any]:
    """The table's compiles, in :func:`jobs` order; ``save(res)`` after each (a long run keeps what it has).

    ``previous``: an earlier run's JSON with the same settings; its rows are kept and its jobs not compiled again.
    ``only``: run just the jobs of this kind (``train``, ``infer``, ``serve`` or ``depth``); ``targets``: just these targets;
    ``models``: just the training searches of these models (the other kinds of job are not filtered by model).
    """
    out: dict[str, Any] = {"settings": SETTINGS, "train": [], "same_batch": [], "inference": [], "serve": [], "depth": [], "lora": [],
                           "composed": [], "skipped": []}
    if previous is not None:
        if previous.get("settings") != SETTINGS:
            raise SystemExit(f"--resume: the earlier results were made with other settings ({previous.get('settings')}), not {SETTINGS}")
        out.update({k: list(previous.get(k, [])) for k in ("train", "same_batch", "inference", "serve", "depth", "lora", "composed")})
        for e in out["train"]:
            for r in [e["largest"], *e["tried"]]:
                if r is not None:
                    rederive_estimate(r)
    done = done_jobs(out)
    configs = {m: aot.load_model_config(m) for m in TRAIN_MODELS}

    def train_at(target: aot.Target, model: str):
        """The table's train step of ``model`` on ``target`` at a per-chip batch: ``b -> CompileReport``."""
        return lambda b: aot.compile_program(target, configs[model], "train", per_device_batch=b, seq_len=SEQ, select_rows=ROWS,
                                             remat="full", model_name=model)

    for job in jobs(quick):
        if (job in done or (only is not None and _kind(job) != only) or (targets and _target_of(job) not in targets)
                or (models and job[0] == "train" and job[1] not in models)):
            continue
        log(" ".join(str(x) for x in job))
        try:
            if job[0] == "train":
                _, model, target = job
                best, tried = largest_batch(train_at(aot.parse_target(target), model), log)
                out["train"].append({"model": model, "target": target, "largest": None if best is None else _row(best), "tried": tried})
            elif job[0] == "same_batch":
                out["same_batch"].append(same_batch(out, job[1], train_at(aot.parse_target(job[1]), "llava-1.5-7b"), log))
            elif job[0] == "composed":
                out["composed"] = composed_train_estimates(out, configs["llava-flexattn-7b"])
            elif job[0] == "lora":
                spec = LORA_JOBS[job[1]]
                cfg = configs[lora_model(spec)]
                r = compile_lora_job(cfg, spec)
                log(f"    peak {r.per_chip_bytes['peak'] / 2**30:.2f} GiB, {r.compile_seconds:.0f} s")
                out["lora"].append(lora_row(spec, r, out))
            elif job[0] == "infer":
                _, target, mesh, program = job
                t = aot.parse_target(target)
                per = 32 // (t.chips if mesh.startswith(("data", "fsdp")) else 1)  # global batch 32
                r = aot.compile_program(t, configs["llava-flexattn-7b"], program, mesh=mesh, per_device_batch=per, seq_len=SEQ,
                                        model_name="llava-flexattn-7b")
                log(f"    peak {r.per_chip_bytes['peak'] / 2**30:.2f} GiB, {r.compile_seconds:.0f} s")
                out["inference"].append({**_row(r), "mesh": mesh})
            elif job[0] == "serve":
                _, model, target, mesh = job
                t = aot.parse_target(target)
                best, tried = largest_batch(lambda b, t=t, model=model, mesh=mesh: aot.compile_program(
                    t, configs[model], "serve", mesh=mesh, per_device_batch=b, seq_len=SEQ, model_name=model), log, MAX_SLOTS)
                out["serve"].append({"model": model, "target": target, "mesh": mesh, "tried": tried,
                                     "largest": None if best is None else {**_row(best), "serve_peaks": best.serve_peaks}})
            else:
                r = aot.compile_program(DEPTH_TARGET, configs["llava-flexattn-7b"], "train", per_device_batch=1, seq_len=SEQ,
                                        select_rows=ROWS, layers=job[1], model_name="llava-flexattn-7b")
                log(f"    {r.compile_seconds:.0f} s")
                out["depth"].append({"layers": job[1], "compile_seconds": r.compile_seconds, "peak": r.per_chip_bytes["peak"]})
        except aot.AotError as e:
            out["skipped"].append({"job": list(job), "why": str(e)})
            log(f"    skipped: {e}")
        save(out)
    return out


def table(res: dict[str, Any]) -> str:
    head = f"{'model / program':<20} {'target':<9} {'chips':>5} {'batch/chip':>10} {'peak GiB':>9} {'of':>6} {'step s (est)':>12}"
    lines = [head + f" {'MFU':>6} kernels"]
    for e in res["train"]:
        r = e["largest"]
        if r is None:
            lines.append(f"{e['model']:<20} {e['target']:<9} {'':>5} {'none fits':>10}")
            continue
        step = "" if r.get("step_seconds_estimate") is None else f"{r['step_seconds_estimate']:.3f}"
        mfu = "" if r["mfu_estimate"] is None else f"{r['mfu_estimate']:.0%}"
        kern = sum(r["kernels"].values())
        peak = r["per_chip_bytes"]["peak"] / 2**30
        lines.append(f"{e['model']:<20} {e['target']:<9} {r['chips']:>5} {r['per_device_batch']:>10} {peak:>9.1f} "
                     f"{r['capacity_bytes'] / 2**30:>6.0f} {step:>12} {mfu:>6} {kern}")
    for c in res.get("same_batch", []):
        ratio = "" if c["step_ratio"] is None else f"{c['step_ratio']:.2f}x"
        lines.append(f"FlexAttention-7B / LLaVA-1.5-7B step at batch {c['per_device_batch']}/chip on {c['target']}: {ratio}")
    for r in res["inference"]:
        step = "" if r.get("step_seconds_estimate") is None else f"{r['step_seconds_estimate']:.4f}"
        peak, kern = r["per_chip_bytes"]["peak"] / 2**30, sum(r["kernels"].values())
        lines.append(f"{r['model'] + ' ' + r['program']:<20} {r['target']:<9} {r['chips']:>5} {r['global_batch']:>10} "
                     f"{peak:>9.1f} {r['capacity_bytes'] / 2**30:>6.0f} {step:>12} {'':>6} {kern}")
    for e in res.get("serve", []):
        r = e["largest"]
        if r is None:
            lines.append(f"{e['model'] + ' serve':<20} {e['target']:<9} {'':>5} {'none fits':>10}")
            continue
        state = r["serve_peaks"]["slot_state"] / r["global_batch"] / 2**20
        lines.append(f"{e['model'] + ' serve':<20} {e['target']:<9} {r['chips']:>5} {r['global_batch']:>10} "
                     f"{r['per_chip_bytes']['peak'] / 2**30:>9.1f} {r['capacity_bytes'] / 2**30:>6.0f}  slots ({e['mesh']}; "
                     f"{state:.0f} MiB per slot per chip)")
    if res["depth"]:
        lines.append(f"compile seconds by depth (7B FlexAttention train, {DEPTH_TARGET}): "
                     + ", ".join(f"{d['layers']} layers {d['compile_seconds']:.0f} s" for d in res["depth"]))
    for r in res.get("lora", []):
        step = "" if r.get("step_seconds_estimate") is None else f"{r['step_seconds_estimate']:.4f}"
        ratio = f" ({r['step_ratio']:.2f}x the full fine-tune's step)" if r.get("step_ratio") is not None else ""
        lines.append(f"{r['name']:<20} {r['target']:<9} {r['chips']:>5} {r['per_device_batch']:>10} "
                     f"{r['per_chip_bytes']['peak'] / 2**30:>9.1f} {r['capacity_bytes'] / 2**30:>6.0f} {step:>12} {'':>6} "
                     f"{sum(r['kernels'].values())}{ratio}")
    for c in quant_decode_ratios(res.get("lora", [])):
        lines.append(f"{c['quantize']} / bf16 decode step, unrolled, batch {c['per_device_batch']} on {c['target']}: optimal_seconds "
                     f"{c['time_ratio']:.2f}x ({c['optimal_seconds'][0] * 1e3:.2f} vs {c['optimal_seconds'][1] * 1e3:.2f} ms), "
                     f"bytes accessed {c['bytes_accessed_ratio']:.2f}x, FLOPs {c['flops_ratio']:.2f}x")
    for c in res.get("composed", []):
        peaks = ", ".join(f"{b}: {p / 2**30:.1f}" for b, p in sorted(c["peak_by_batch"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"{c['name']} on {c['target']} (composed from {COMPOSED_FROM}'s temporaries + state "
                     f"{c['state_bytes'] / 2**30:.2f} GiB): largest batch/chip {c['largest_batch']} (peak GiB by batch {peaks})")
    for s in res["skipped"]:
        lines.append(f"skipped {s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="7B FlexAttention and LLaVA-1.5 on v5p-64 (and their same-batch step ratio), "
                   "the inference rows and two depths only")
    p.add_argument("--out", default=None, help="also write the JSON here (after every compile, so an interrupted run keeps its rows)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and compile only the missing ones")
    p.add_argument("--only", choices=("train", "infer", "serve", "depth", "lora"), help="compile only the jobs of this kind")
    p.add_argument("--target", action="append", dest="targets", help="compile only for this target (repeatable), e.g. v5e-256")
    p.add_argument("--model", action="append", dest="models", choices=TRAIN_MODELS,
                   help="search the largest batch only for this model (repeatable); other jobs are not filtered by model")
    args = p.parse_args(argv)
    if args.resume and not args.out:
        p.error("--resume needs --out (the earlier run's JSON)")
    previous = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).is_file() else None
    t0 = time.time()
    save = (lambda res: Path(args.out).write_text(json.dumps(res, indent=1) + "\n")) if args.out else (lambda res: None)
    res = run(args.quick, lambda m: print(m, file=sys.stderr, flush=True), save, previous, args.only, args.targets, args.models)
    res["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(res, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")  # with the total time
    print(text)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
