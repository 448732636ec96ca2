"""Wall time of every configuration side by side at a CPU-sized config, jitted and warm.

For each batch size, every variant's prefill and decode step are compiled (layers scanned, as the
model runs by default), run once to warm up, then timed in interleaved rounds (variant 1, 2, ...,
then again), so that load from other processes falls on all of them alike; the median over rounds
is reported, and ``time_ratio`` is the median of the per-round ratios to xattn (a round's load from
other processes falls on both). One round of a variant is one workload-B run: prefill (its greedy token is workload
A's answer) then ``answer_tokens - 1`` greedy decode steps with the state donated.

``flops`` (per sample) is XLA's cost analysis of the same programs at the same shapes, with the
layers and ``lax.map`` unrolled (a loop body is counted once otherwise); the incremental strategy's
decode step on its fast path, its prefill as compiled (:func:`flexattn_jax.flops.counting_config`). Its
wall time is what runs: the fast path or the fallback, as the selection of these random weights
changes from step to step.
Memory is the timed prefill executable's own memory analysis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bench.common import (
    SDS,
    Variant,
    abstract_inputs,
    abstract_state,
    add_ratios,
    for_counting,
    make_inputs,
    max_len,
    prefill_fn,
    scaled_config,
    step_fn,
    variant_params,
    variants,
)
from bench.memory import memory_stats
from flexattn_jax import generate as G
from flexattn_jax.config import ModelConfig
from flexattn_jax.flops import cost_flops
from flexattn_jax.params import abstract_params, init_params


class Program(NamedTuple):
    """One variant at one batch size, compiled, with its parameters and inputs."""

    variant: Variant
    batch: int
    params: dict
    inputs: tuple
    prefill: Any  # jax.stages.Compiled: (params, ids, mask, pixels) -> (state, token)
    step: Any  # jax.stages.Compiled: (params, state, token) -> (state, token), state donated; or None


def compile_program(v: Variant, params: dict, batch: int, prompt_len: int, answer_tokens: int, seed: int = 0,
                    with_step: bool = True) -> Program:
    """Compile ``v``'s prefill and (``with_step``) decode step for ``batch`` samples (random prompts and pixels)."""
    p = variant_params(v, params)
    inputs = make_inputs(v, batch, prompt_len, seed)
    ml = max_len(v, prompt_len, answer_tokens)
    prefill = jax.jit(prefill_fn(v, ml)).lower(p, *inputs).compile()
    step = None
    if with_step:
        state = jax.eval_shape(prefill_fn(v, ml), p, *inputs)[0]
        step = jax.jit(step_fn(v), donate_argnums=(1,)).lower(p, state, SDS((batch,), jnp.int32)).compile()
    return Program(v, batch, p, inputs, prefill, step)


def run_once(prog: Program, steps: int) -> tuple[float, float]:
    """Seconds of (prefill + first token, prefill + ``steps`` more greedy tokens)."""
    t0 = time.perf_counter()
    state, tok = prog.prefill(prog.params, *prog.inputs)
    jax.block_until_ready((state, tok))
    t1 = time.perf_counter()
    for _ in range(steps):
        state, tok = prog.step(prog.params, state, tok)
    jax.block_until_ready(tok)
    return t1 - t0, time.perf_counter() - t0


def time_programs(progs: list[Program], steps: int, repeats: int, progress: bool = True) -> list[list[tuple[float, float]]]:
    """Per program, ``repeats`` (A, B) timings from interleaved rounds after one warm-up round."""
    times: list[list[tuple[float, float]]] = [[] for _ in progs]
    bar = tqdm(total=(repeats + 1) * len(progs), desc="timing", unit="run", disable=not progress, file=sys.stderr)
    for r in range(repeats + 1):
        for i, prog in enumerate(progs):
            t = run_once(prog, steps)
            if r > 0:
                times[i].append(t)
            bar.update()
    bar.close()
    return times


def count_flops(v: Variant, batch: int, prompt_len: int, answer_tokens: int, method: str = "lowered") -> tuple[float, float]:
    """(prefill, decode step) FLOPs of ``v`` for ``batch`` samples: its programs with every loop unrolled
    (the incremental strategy's step: its fast path, see :func:`flexattn_jax.flops.counting_config`)."""
    pre_v, step_v = for_counting(v, "prefill"), for_counting(v, "step")
    ml = max_len(v, prompt_len, answer_tokens)
    pre = cost_flops(prefill_fn(pre_v, ml), abstract_params(pre_v.cfg), *abstract_inputs(pre_v, batch, prompt_len), method=method)
    params = abstract_params(step_v.cfg)
    state = abstract_state(step_v, params, batch, prompt_len, answer_tokens)
    step = cost_flops(step_fn(step_v), params, state, SDS((batch,), jnp.int32), method=method)
    return pre, step


def selection_stability(prog: Program, steps: int) -> dict:
    """How many HR tokens each decode step selects for the first time, per hierarchical layer and sample
    (:func:`bench.stability.new_tokens`; the incremental cache projects those, and more than
    ``cfg.hr_step_tokens`` in any layer or sample of the batch takes the fallback): the mean, the
    maximum, and the share of steps that take the fallback (at this batch size)."""
    from bench.stability import new_tokens

    cfg, v = prog.variant.cfg, prog.variant
    ids, mask, pixels = prog.inputs
    # ``steps`` decode steps feed tokens 0 .. steps - 1 (workload B); new_tokens counts a step as live while
    # its token is not the last one generated, so generate one more
    out = G.generate(prog.params, cfg, ids, pixels, mask, max_new_tokens=steps + 1, hr_strategy=v.strategy, return_step_maps=True)
    counts, live = new_tokens(out, cfg)  # (S, Lh, B), (S, B)
    counts = np.where(live[:, None, :], counts, 0)
    per = counts.transpose(0, 2, 1)[live]  # (live sample-steps, Lh)
    limit = getattr(cfg, "hr_step_tokens", None)
    return {"new_hr_tokens_per_step_mean": float(per.mean()) if per.size else 0.0, "new_hr_tokens_per_step_max": int(per.max(initial=0)),
            "fast_path_tokens": limit,
            "fallback_step_share": None if limit is None or not per.size else float((counts.max(axis=(1, 2)) > limit)[live.any(1)].mean())}


def walltime_table(config: ModelConfig | None = None, configs: tuple[str, ...] | None = None,
                   strategies: tuple[str, ...] | None = None, batches: tuple[int, ...] = (1, 8), prompt_len: int = 16,
                   answer_tokens: int = 16, repeats: int = 5, seed: int = 0, flops_method: str = "lowered",
                   progress: bool = True) -> list[dict]:
    """Entries per (variant, workload, batch): median seconds of the batch, FLOPs per sample, ratios to xattn.

    ``config``: a flex-enabled base (default :func:`bench.common.scaled_config`); ``configs`` /
    ``strategies`` restrict the variants (xattn is always kept).
    """
    base = dataclasses.replace(config or scaled_config(), scan_layers=True)
    vs = variants(base, configs, strategies)
    params = init_params(base, jax.random.key(seed))
    steps = answer_tokens - 1
    entries: list[dict] = []
    for batch in batches:
        progs = []
        t0 = time.perf_counter()
        for v in tqdm(vs, desc=f"compiling (batch {batch})", unit="variant", disable=not progress, file=sys.stderr):
            progs.append(compile_program(v, params, batch, prompt_len, answer_tokens, seed))
        compile_s = time.perf_counter() - t0
        times = time_programs(progs, steps, repeats, progress)
        for prog, ts in tqdm(list(zip(progs, times, strict=True)), desc="counting FLOPs", unit="variant",
                             disable=not progress, file=sys.stderr):
            v = prog.variant
            pre_f, step_f = count_flops(v, batch, prompt_len, answer_tokens, flops_method)
            mem = memory_stats(prog.prefill)
            a = [t[0] for t in ts]
            b = [t[1] for t in ts]
            step_s = statistics.median((tb - ta) / max(steps, 1) for ta, tb in ts)
            extra = selection_stability(prog, steps) if v.strategy == "incremental" and steps else {}
            for wl, secs, fl in (("A", a, pre_f), ("B", b, pre_f + steps * step_f)):
                med = statistics.median(secs)
                entries.append({
                    "config": v.label, "workload": wl, "batch": batch, "flops": fl / batch, "seconds": med,
                    "seconds_min": min(secs), "seconds_max": max(secs), "samples_per_s": batch / med,
                    "prefill_seconds": statistics.median(a), "step_seconds": step_s if steps else None,
                    "repeats": len(secs), "round_seconds": secs, "prefill_peak_bytes": mem["peak"], "prefill_temp_bytes": mem["temp"],
                    "compile_seconds_all": compile_s, **extra,
                })
    return add_ratios(entries)


def format_table(entries: list[dict], title: str = "") -> str:
    """Markdown, one row per (variant, batch): workloads A and B side by side (seconds of the batch,
    GFLOPs per sample, ratios to xattn), and a line per incremental variant on its fast path."""
    lines = [title] if title else []
    lines += ["| config | batch | A s | A GFLOPs | A FLOPs/xattn | A time/xattn | B s | B GFLOPs | B FLOPs/xattn | B time/xattn |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(e["config"], e["batch"], e["workload"]): e for e in entries}
    rows = list(dict.fromkeys((e["config"], e["batch"]) for e in sorted(entries, key=lambda e: e["batch"])))
    for config, batch in rows:
        cells = []
        for wl in ("A", "B"):
            e = by.get((config, batch, wl))
            cells += ["-"] * 4 if e is None else [f"{e['seconds']:.3f}", f"{e['flops'] / 1e9:.2f}", _r(e["flops_ratio"]),
                                                  _r(e["time_ratio"])]
        lines.append(f"| {config} | {batch} | " + " | ".join(cells) + " |")
    inc = [e for e in entries if e.get("fallback_step_share") is not None and e["workload"] == "B"]
    if inc:
        lines.append("")
    for e in inc:
        lines.append(f"- {e['config']}, batch {e['batch']}: {e['new_hr_tokens_per_step_mean']:.1f} HR tokens selected for the first "
                     f"time per decode step and layer (max {e['new_hr_tokens_per_step_max']}); the fast path projects up to "
                     f"{e['fast_path_tokens']}; the fallback ran in {100 * e['fallback_step_share']:.0f}% of the steps.")
    return "\n".join(lines)


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Wall time per configuration at the scaled CPU config (side by side, one process)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    entries = walltime_table(batches=tuple(args.batch), repeats=args.repeats)
    print(json.dumps({"walltime": entries}) if args.json else format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
