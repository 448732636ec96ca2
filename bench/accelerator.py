"""Accelerator benchmark: 7B wall times per attention implementation, and a train-step MFU.

``flexattn-jax bench --accelerator`` (or ``python -m bench.accelerator``), for the machine it runs on:

* inference: LLaVA-1.5 7B shapes in bf16 with random weights, at 1008 px, the configurations
  ``lr``, ``xattn``, ``flex-0.1M`` and ``hd-seq`` (:mod:`bench.common`), batch 1 and 8: the prefill
  (prompt -> first token) and the mean decode step, median over rounds, for each
  ``attention_impl`` the backend has (:func:`backend_impls`);
* training: one train step of a 1B-class Llama (2048 hidden, 16 layers, 32 heads of 64, 8 KV heads)
  under CLIP-L/14 at 1008 px with FlexAttention at K = 0.1 M, sequence 2048, bf16 compute with
  fp32 masters and full remat, per implementation: seconds, FLOPs (XLA cost analysis of the step
  with its layers unrolled) and MFU against the device's bf16 peak (:data:`flexattn_jax.chips.CHIPS`; none on CPU).

One JSON document (``--out``, default ``accelerator.json``) and a table. ``--smoke`` runs the same
code on the tests' tiny shapes (seconds on a CPU). Parameters are drawn on the device from the
abstract shapes (nothing on the host).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bench.common import default_config, smoke_config, variant, with_layers
from bench.walltime import compile_program, run_once
from flexattn_jax import sharding as S
from flexattn_jax.chips import peak_flops
from flexattn_jax.config import ModelConfig, TextConfig
from flexattn_jax.params import init_params
from train.config import TrainConfig
from train.step import make_step, split_microbatches

CONFIGS = ("lr", "xattn", "flex-0.1M", "hd-seq")
FLEX_STRATEGY = "project"


def backend_impls(backend: str | None = None) -> tuple[str, ...]:
    """The attention implementations that run natively on ``backend`` (splash's interpret mode does not count)."""
    backend = backend or jax.default_backend()
    return ("xla", "xla_chunked") + {"gpu": ("cudnn",), "tpu": ("splash",)}.get(backend, ())


def _random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- inference ------------------------------------------------------------------------------------

def inference_table(base: ModelConfig, impls: tuple[str, ...], configs: tuple[str, ...], batches: tuple[int, ...], prompt_len: int,
                    answer_tokens: int, repeats: int, log=print) -> list[dict]:
    """Prefill and mean decode-step seconds per (configuration, impl, batch)."""
    out = []
    params = _random_params(base)
    for impl in impls:
        b_cfg = dataclasses.replace(base, attention_impl=impl, scan_layers=True)
        for name in configs:
            v = variant(b_cfg, name, None if name in ("lr", "hd-seq", "xattn") else FLEX_STRATEGY)
            for batch in batches:
                t0 = time.perf_counter()
                prog = compile_program(v, params, batch, prompt_len, answer_tokens)
                compile_s = time.perf_counter() - t0
                steps = answer_tokens - 1
                runs = [run_once(prog, steps) for _ in range(repeats + 1)][1:]  # the first is a warm-up
                prefill = _median([a for a, _ in runs])
                step = _median([(b - a) / max(steps, 1) for a, b in runs])
                e = {"config": v.label, "attention_impl": impl, "batch": batch, "prompt_len": prompt_len,
                     "sequence": int(prog.inputs[0].shape[1]), "prefill_seconds": prefill, "decode_step_seconds": step,
                     "compile_seconds": compile_s}
                out.append(e)
                log(f"  {impl:12s} {v.label:20s} b{batch}: prefill {prefill * 1e3:9.2f} ms, step {step * 1e3:8.2f} ms")
                del prog
    return out


# ---- training ------------------------------------------------------------------------------------

def llama_1b(base: ModelConfig) -> ModelConfig:
    """A 1B-class Llama decoder (Llama-3.2-1B's widths, LLaVA's vocabulary) under ``base``'s CLIP and FlexAttention."""
    text = TextConfig(vocab_size=32064, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                      head_dim=64)
    flex = dataclasses.replace(base.flex, first_select_layer=4, hr_budget=0.1)
    return dataclasses.replace(base, text=text, flex=flex)


def train_batch(cfg: ModelConfig, batch: int, seq_len: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch with one image per sample (its G tokens after the first), an answer over the last ``rows`` tokens."""
    rng = np.random.default_rng(seed)
    g = cfg.num_image_tokens
    ids = rng.integers(1, cfg.image_token_id, size=(batch, seq_len)).astype(np.int32)
    ids[:, 1:1 + g] = cfg.image_token_id
    labels = np.full_like(ids, -100)
    labels[:, seq_len - rows:] = ids[:, seq_len - rows:]
    s = cfg.image_size
    return split_microbatches({
        "input_ids": ids, "labels": labels, "attention_mask": np.ones(ids.shape, bool),
        "pixel_values": rng.standard_normal((batch, s, s, cfg.vision.num_channels)).astype(np.float32),
        "margin": np.zeros((batch, 2), np.int32),
        "select_rows": np.tile(np.arange(seq_len - rows - 1, seq_len - 1, dtype=np.int32), (batch, 1)),
        "select_valid": np.ones((batch, rows), bool),
    }, 1)


def train_entry(cfg: ModelConfig, impl: str, batch: int, seq_len: int, rows: int, repeats: int, log=print) -> dict:
    """Seconds, FLOPs and MFU of one train step of ``cfg`` with ``impl`` on all local devices (fsdp)."""
    cfg = dataclasses.replace(cfg, attention_impl=impl, dtype="bfloat16", param_dtype="float32", remat_policy="full",
                              scan_layers=False)  # unrolled: the cost analysis counts every layer
    mesh = S.make_mesh(f"fsdp={len(jax.devices())}")
    fns = make_step(cfg, TrainConfig(), mesh, total_steps=1000)
    host = train_batch(cfg, batch, seq_len, rows)
    t0 = time.perf_counter()
    lowered = fns.step.lower(fns.abstract_state, {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.batch_sharding(x.shape))
                                                  for k, x in host.items()})
    ca = lowered.cost_analysis()
    flops = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state = fns.init_state(_random_params(cfg))
    data = {k: jax.device_put(x, fns.batch_sharding(x.shape)) for k, x in host.items()}
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    seconds = _median(times[1:])
    peak = peak_flops(jax.devices()[0].device_kind)
    mfu = None if peak is None else flops / seconds / (peak * len(jax.devices()))
    log(f"  train {impl:12s} b{batch}: {seconds * 1e3:.1f} ms, {flops / 1e12:.2f} TFLOP, MFU {'-' if mfu is None else f'{mfu:.3f}'}")
    return {"attention_impl": impl, "batch": batch, "seq_len": seq_len, "rows": rows, "seconds": seconds, "flops": flops,
            "mfu": mfu, "peak_flops_per_device": peak, "devices": len(jax.devices()), "compile_seconds": compile_s,
            "loss": float(metrics["loss"]), "text_layers": cfg.text.num_layers, "hidden": cfg.text.hidden_size}


# ---- the run ------------------------------------------------------------------------------------

def run(smoke: bool = False, repeats: int = 3, batches: tuple[int, ...] = (1, 8), train_batch_size: int = 1,
        impls: tuple[str, ...] | None = None, configs: tuple[str, ...] = CONFIGS,
        log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Every measurement for this machine (``impls``: a subset of :func:`backend_impls`); ``smoke``: tiny shapes, same code."""
    have = backend_impls()
    impls = have if impls is None else impls
    missing = [i for i in impls if i not in have]
    if missing:
        raise ValueError(f"attention_impl {missing} not available on {jax.default_backend()}; this backend has {have}")
    if smoke:
        base = smoke_config("bfloat16")
        infer = dict(prompt_len=8, answer_tokens=3)
        train_cfg = with_layers(base, text_layers=2)
        train = dict(seq_len=64, rows=8)
        batches = tuple(min(b, 2) for b in batches)
    else:
        base = dataclasses.replace(default_config(), scan_layers=True)
        infer = dict(prompt_len=60, answer_tokens=16)
        train_cfg = llama_1b(base)
        train = dict(seq_len=2048, rows=512)
    dev = jax.devices()[0]
    results = {"command": "flexattn-jax bench --accelerator" + (" --smoke" if smoke else ""), "smoke": smoke,
               "backend": jax.default_backend(), "device": dev.device_kind, "devices": len(jax.devices()), "jax": jax.__version__,
               "impls": list(impls), "dtype": base.dtype}
    t0 = time.perf_counter()
    log(f"== inference ({results['device']}, {base.dtype}, impls {impls})")
    results["inference"] = inference_table(base, impls, configs, tuple(dict.fromkeys(batches)), repeats=repeats, log=log, **infer)
    log("== train step")
    results["train"] = [train_entry(train_cfg, impl, train_batch_size * len(jax.devices()), repeats=repeats, log=log, **train)
                        for impl in impls]
    results["seconds_total"] = time.perf_counter() - t0
    return results


def format_tables(results: dict) -> str:
    lines = [f"`{results['command']}` on {results['devices']} x {results['device']} ({results['backend']}, jax {results['jax']})", "",
             "| config | impl | batch | prefill ms | decode step ms |", "|---|---|---:|---:|---:|"]
    for e in results["inference"]:
        lines.append(f"| {e['config']} | {e['attention_impl']} | {e['batch']} | {e['prefill_seconds'] * 1e3:.2f} | "
                     f"{e['decode_step_seconds'] * 1e3:.2f} |")
    lines += ["", "| train step | batch | seq | ms | TFLOP | MFU |", "|---|---:|---:|---:|---:|---:|"]
    for e in results["train"]:
        mfu = "-" if e["mfu"] is None else f"{e['mfu']:.3f}"
        ms, tflop = e["seconds"] * 1e3, e["flops"] / 1e12
        lines.append(f"| {e['attention_impl']} | {e['batch']} | {e['seq_len']} | {ms:.1f} | {tflop:.3f} | {mfu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexattn-jax bench --accelerator", description="7B wall times per attention_impl and a train MFU")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, same code (a CPU test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--impl", nargs="+", default=None, help="attention implementations (default: all the backend has)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--train-batch", type=int, default=1, help="train samples per device")
    ap.add_argument("--out", type=Path, default=Path("accelerator.json"))
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the tables")
    args = ap.parse_args(argv)
    results = run(args.smoke, args.repeats, tuple(args.batch), args.train_batch, None if args.impl is None else tuple(args.impl),
                  tuple(args.configs))
    results["load_average"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results) if args.json else format_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
