"""Peak memory of a prefill per configuration, from XLA's ``compiled.memory_analysis()``.

Peak = argument + output + temp - alias bytes of the compiled prefill (parameters and inputs in,
decode state and first token out, activations as temp): on CPU that is what XLA reports. At 7B
shapes the compiles are from abstract shapes (nothing allocated) with the decoder scanned (one
layer body: a fast compile; the scan is also how the model runs). They are fp32: XLA's CPU backend
upcasts bf16 weights to f32 before its dots (a temp copy of the stacked weights that a GPU does not
make), so CPU memory figures for a bf16 model would mostly measure that artefact; bf16 parameters and
activations are about half of the fp32 figures. The scaled config's figures come with the wall
times (:mod:`bench.walltime`, from the very executables that are timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
from tqdm.auto import tqdm

from bench.common import (
    Variant,
    abstract_inputs,
    abstract_state,
    default_config,
    max_len,
    prefill_fn,
    tree_bytes,
    variants,
)
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import abstract_params

GiB = 2**30


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Argument, output, temp and alias bytes of a compiled function, and their peak (arg + out + temp - alias)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("this backend gives no memory analysis for compiled functions")
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def prefill_memory(v: Variant, batch: int, prompt_len: int, answer_tokens: int) -> dict:
    """Compile ``v``'s prefill from abstract shapes and read its memory analysis; the decode state's bytes too."""
    ap = abstract_params(v.cfg)
    compiled = jax.jit(prefill_fn(v, max_len(v, prompt_len, answer_tokens))).lower(ap, *abstract_inputs(v, batch, prompt_len)).compile()
    stats = memory_stats(compiled)
    stats["params"] = tree_bytes(ap)
    stats["decode_state"] = tree_bytes(abstract_state(v, ap, batch, prompt_len, answer_tokens))
    return stats


def memory_table(config: ModelConfig | None = None, batches: tuple[int, ...] = (1,), prompt_len: int = 60, answer_tokens: int = 16,
                 configs: tuple[str, ...] | None = None, dtype: str | None = "float32", progress: bool = True) -> list[dict]:
    """One entry per (configuration, batch): bytes of the prefill's arguments, output, temp and peak.

    ``config`` defaults to the 7B shapes at 1008 px; ``dtype`` overrides its compute and parameter
    dtype (default fp32, see the module docstring; None keeps the config's).
    """
    cfg = config or default_config()
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    cfg = dataclasses.replace(cfg, scan_layers=True)
    runs = [(v, b) for b in batches for v in variants(cfg, configs)]
    entries = []
    for v, b in tqdm(runs, desc="memory", unit="compile", disable=not progress, file=sys.stderr):
        t0 = time.perf_counter()
        stats = prefill_memory(v, b, prompt_len, answer_tokens)
        entries.append({"config": v.label, "batch": b, "dtype": cfg.dtype, **{f"{k}_bytes": x for k, x in stats.items()},
                        "compile_seconds": time.perf_counter() - t0})
    return entries


def format_table(entries: list[dict], title: str = "") -> str:
    """Markdown, one row per configuration: parameters, then per batch size the prefill's output
    (decode state and first token), temp and peak GiB."""
    lines = [title] if title else []
    batches = sorted({e["batch"] for e in entries})
    lines.append("| config | params GiB | " + " | ".join(f"b{b} output | b{b} temp | b{b} peak" for b in batches) + " |")
    lines.append("|---|---:|" + "---:|---:|---:|" * len(batches))
    by = {(e["config"], e["batch"]): e for e in entries}
    for config in dict.fromkeys(e["config"] for e in entries):
        cells = [f"{next(e for e in entries if e['config'] == config)['params_bytes'] / GiB:.2f}"]
        for b in batches:
            e = by.get((config, b))
            cells += ["-"] * 3 if e is None else [f"{e[k] / GiB:.2f}" for k in ("output_bytes", "temp_bytes", "peak_bytes")]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_scaled(walltime_entries: list[dict], title: str = "") -> str:
    """Markdown: the timed prefill executables' peak and temp MiB at the scaled config, per batch size."""
    es = [e for e in walltime_entries if e["workload"] == "A" and "prefill_peak_bytes" in e]
    batches = sorted({e["batch"] for e in es})
    lines = [title] if title else []
    lines.append("| config | " + " | ".join(f"b{b} peak MiB | b{b} temp MiB" for b in batches) + " |")
    lines.append("|---|" + "---:|---:|" * len(batches))
    by = {(e["config"], e["batch"]): e for e in es}
    for config in dict.fromkeys(e["config"] for e in es):
        cells = []
        for b in batches:
            e = by.get((config, b))
            cells += ["-", "-"] if e is None else [f"{e['prefill_peak_bytes'] / 2**20:.0f}", f"{e['prefill_temp_bytes'] / 2**20:.0f}"]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Peak prefill memory per configuration at 7B shapes (XLA memory analysis)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    args = ap.parse_args(argv)
    entries = memory_table(batches=tuple(args.batch))
    print(json.dumps({"memory_7b": entries}) if args.json else format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
