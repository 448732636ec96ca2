"""FLOPs per sample from XLA's cost analysis of abstract-shape compiles, next to an analytic count.

Nothing is allocated: parameters and inputs are ``jax.ShapeDtypeStruct`` (bfloat16 at 7B shapes),
each program of :mod:`bench.common` (the configurations' prefill and decode step) is lowered with
``jax.jit(...).lower(...)`` and ``cost_analysis()['flops']`` is read, every layer loop unrolled
(:func:`flexattn_jax.flops.counting_config`: XLA counts a loop body once, and the 'cache'
strategy projects all M HR tokens in a loop over the hierarchical layers).

Method 'lowered' (default) reads the module as JAX emits it, at full depth (no compile). Method
'compiled' reads the CPU-compiled module; compiling 32 unrolled 7B layers on a small CPU is slow,
so there the counts come from few-layer compiles, exactly linear in the layer counts:
``f(Lp, Lh, Lv) = a + b Lp + c Lh + v Lv`` (Lp plain layers, one select layer, Lh hierarchical
layers, Lv CLIP layers run). Flex / xattn: compiles at (Lp, Lh) = (0, 1), (0, 2), (1, 1) give ``c``
and ``b``; plain: L = 1, 2 give ``b``; ``v`` from the CLIP tower + projector alone with 1 and 2
layers. The fit extrapolates exactly to the full depth (tested).

Workload A = prefill (its logits give the one answer token); B = prefill + (answer - 1) decode
steps, each compiled once at a cache length of prompt + answer. ``hd-seq`` is the plain model on
1 + zoom^2 images (LR view + HR tiles) in the sequence; ``xattn`` is the paper-mode prefill with
every row a select row and all M HR keys (projected once, cached for the decode steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable

import jax.numpy as jnp

from bench.common import (
    BUDGETS,
    CONFIGS,
    REFERENCE,
    SDS,
    XATTN_STRATEGY,
    Variant,
    abstract_inputs,
    abstract_state,
    add_ratios,
    default_config,
    for_counting,
    hr_strategies,
    max_len,
    prefill_fn,
    smoke_config,
    step_fn,
    variants,
    with_layers,
)
from flexattn_jax import flops as F
from flexattn_jax.config import ModelConfig
from flexattn_jax.flops import cost_flops
from flexattn_jax.params import abstract_params
from flexattn_jax.vision import encode_images

__all__ = ["CONFIGS", "analytic", "default_config", "flop_table", "format_table", "main", "smoke_config"]


# ---- the counted programs ------------------------------------------------------------------------

def prefill_flops(v: Variant, prompt_len: int, answer_tokens: int, method: str = "lowered", batch: int = 1) -> float:
    """FLOPs of ``v``'s prefill (workload A) for ``batch`` samples."""
    v = for_counting(v, "prefill")
    ap = abstract_params(v.cfg)
    return cost_flops(prefill_fn(v, max_len(v, prompt_len, answer_tokens)), ap, *abstract_inputs(v, batch, prompt_len),
                      method=method)


def decode_flops(v: Variant, prompt_len: int, answer_tokens: int, method: str = "lowered", batch: int = 1) -> float:
    """FLOPs of one decode step of ``v`` over a cache of prompt + answer slots (incremental: its fast path)."""
    v = for_counting(v, "step")
    ap = abstract_params(v.cfg)
    state = abstract_state(v, ap, batch, prompt_len, answer_tokens)
    return cost_flops(step_fn(v), ap, state, SDS((batch,), jnp.int32), method=method)


def vision_flops(cfg: ModelConfig, views: int, method: str = "lowered") -> float:
    """CLIP tower + projector over ``views`` images."""
    ap = abstract_params(cfg)
    s = cfg.vision.image_size
    return cost_flops(lambda p, x: encode_images(p, cfg, x), ap, SDS((views, s, s, cfg.vision.num_channels), jnp.dtype(cfg.dtype)),
                      method=method)


# ---- layer-count extrapolation -------------------------------------------------------------------

def _extrapolate(v: Variant, measure: Callable[[Variant], float], vis_per_layer: float, direct: bool) -> float:
    """``measure(v at few layers, 1-layer CLIP)`` extrapolated to the full depth; ``direct``: one
    measurement at the full depth."""
    if direct:
        return measure(v)
    cfg = v.cfg
    at = lambda *a, **kw: dataclasses.replace(v, cfg=dataclasses.replace(with_layers(cfg, *a, **kw), scan_layers=False))
    full_l, lv = cfg.text.num_layers, cfg.vision_layers_used
    if v.is_flex:
        f1 = measure(at(2, 2, first_select_layer=0))  # select + 1 hier
        f2 = measure(at(3, 2, first_select_layer=0))  # select + 2 hier
        f3 = measure(at(3, 2, first_select_layer=1))  # 1 plain + select + 1 hier
        c, b = f2 - f1, f3 - f1
        lp = cfg.flex.first_select_layer
        lh = full_l - lp - 1
        return f1 + b * lp + c * (lh - 1) + vis_per_layer * (lv - 1)
    f1 = measure(at(1, 2))
    f2 = measure(at(2, 2))
    return f1 + (f2 - f1) * (full_l - 1) + vis_per_layer * (lv - 1)


# ---- analytic counts ----------------------------------------------------------------------------

def analytic(cfg: ModelConfig, config: str, workload: str, strategy: str, prompt: int, answer: int) -> float | None:
    """The dense count of :mod:`flexattn_jax.flops`' analytic model (``causal=False``: masked causal attention
    is computed in full, as XLA runs it); docs/benchmarks.md's table halves causal. None for an HR strategy
    without a closed form here (e.g. one whose cost depends on the data)."""
    g, m, nv = cfg.num_image_tokens, cfg.num_hr_tokens, F.views(cfg)
    lh = F.hierarchical_layers(cfg)
    vis_view = F.vision_tower_flops(cfg) + F.projector_flops(cfg)
    head = F.head_flops(cfg, 1)
    llm = lambda rows, keys: F.decoder_flops(cfg, rows, keys)
    n = prompt + g
    max_len = n + answer
    k = m if config in (REFERENCE, "hd-seq", "lr") else _budget(cfg, config)
    if config == "lr":
        pre, step = vis_view + llm(n, n) + head, llm(1, max_len) + head
    elif config == "hd-seq":
        nh = n + m
        pre, step = nv * vis_view + llm(nh, nh) + head, llm(1, nh + answer) + head
    elif config == REFERENCE:
        pre = nv * vis_view + llm(n, n) + head + lh * (F.hr_kv_flops(cfg, m) + F.hr_attention_flops(cfg, n, m))
        step = llm(1, max_len) + head + lh * F.hr_attention_flops(cfg, 1, m)
    else:
        base = nv * vis_view + llm(n, n) + head
        if strategy == "cache":
            pre = base + lh * (F.hr_kv_flops(cfg, m) + F.hr_attention_flops(cfg, 1, k))
            step = llm(1, max_len) + head + lh * F.hr_attention_flops(cfg, 1, k)
        elif strategy in ("project", "incremental"):
            pre = base + lh * (F.hr_kv_flops(cfg, k) + F.hr_attention_flops(cfg, 1, k))
            new = k if strategy == "project" else _step_tokens(cfg, config)  # incremental: its fast path
            if new is None:
                return None
            step = llm(1, max_len) + head + lh * (F.hr_kv_flops(cfg, new) + F.hr_attention_flops(cfg, 1, k))
        else:
            return None
    return pre if workload == "A" else pre + (answer - 1) * step


def _budget(cfg: ModelConfig, config: str) -> int:
    return dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=BUDGETS[config])).hr_budget_tokens


def _step_tokens(cfg: ModelConfig, config: str) -> int | None:
    """New HR tokens an incremental decode step projects on its fast path (None: no such config field)."""
    c = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=BUDGETS[config]))
    return getattr(c, "hr_step_tokens", None)


# ---- the table ----------------------------------------------------------------------------------

def quick_runs() -> list[tuple[str, str | None]]:
    """The quick table: lr, hd-seq, xattn, flex-M with the all-M cache, flex-0.1M with every strategy."""
    return [("lr", None), ("hd-seq", None), (REFERENCE, None), ("flex-M", XATTN_STRATEGY)] + [
        ("flex-0.1M", s) for s in hr_strategies()
    ]


def flop_table(quick: bool = False, config: ModelConfig | None = None, prompt_len: int = 60, answer_tokens: int = 16,
               log=None, configs: tuple[str, ...] | None = None, direct: bool | None = None,
               method: str = "lowered") -> list[dict]:
    """Entries per (configuration, HR strategy, workload): measured and analytic FLOPs, ratio to xattn.

    ``quick``: :func:`quick_runs`; otherwise every configuration with every HR strategy.
    ``configs`` keeps only those names (xattn, the reference, is always kept). ``direct`` compiles
    each function once at the full depth instead of fitting few-layer compiles (default: with method
    'lowered', which needs no compile, or a decoder of <= 4 layers). ``method``: 'lowered' reads
    XLA's cost analysis of the lowered module (the HLO as JAX emits it: bf16 dots counted as such,
    backend-independent); 'compiled' that of the CPU-compiled module, where XLA's CPU backend
    upcasts every bf16 dot's weights to f32 by converting the whole stacked (L, ...) weight array in
    each unrolled layer: an artefact quadratic in depth (about 47 GFLOPs of the 60 GFLOPs it reports
    for a 7B decode step; prefill barely changes) that a GPU would not run, and that the linear
    few-layer fit does not extrapolate faithfully.
    """
    if method not in ("lowered", "compiled"):
        raise ValueError(f"method={method!r}: use 'lowered' or 'compiled'")
    cfg = dataclasses.replace(config or default_config(), scan_layers=False)
    log = log or (lambda *a: None)
    z2 = cfg.zoom**2
    runs = variants(cfg, configs)
    if quick:
        keep = quick_runs()
        runs = [v for v in runs if (v.name, None if v.name in ("lr", "hd-seq", REFERENCE) else v.strategy) in keep]
    if direct is None:
        direct = method == "lowered" or cfg.text.num_layers <= 4
    t0 = time.perf_counter()
    vis_layer = {}
    if not direct:
        for views in {1, 1 + z2}:
            a1 = vision_flops(with_layers(cfg, vision_layers=2), views, method)
            a2 = vision_flops(with_layers(cfg, vision_layers=3), views, method)
            vis_layer[views] = a2 - a1
    log(f"vision: {time.perf_counter() - t0:.1f}s")

    results: list[dict] = []
    for v in runs:
        t1 = time.perf_counter()
        per_layer = 0.0 if direct else vis_layer[v.views or 1 + z2]
        pre = _extrapolate(v, lambda s: prefill_flops(s, prompt_len, answer_tokens, method), per_layer, direct)
        dec = _extrapolate(v, lambda s: decode_flops(s, prompt_len, answer_tokens, method), 0.0, direct)
        log(f"{v.label}: {time.perf_counter() - t1:.1f}s")
        for wl, fl in (("A", pre), ("B", pre + (answer_tokens - 1) * dec)):
            results.append({
                "config": v.label, "workload": wl, "batch": 1, "flops": fl, "prefill_flops": pre, "decode_step_flops": dec,
                "analytic_flops": analytic(cfg, v.name, wl, v.strategy or "project", prompt_len, answer_tokens),
                "seconds": None,
            })
    add_ratios(results)
    for e in results:
        e["analytic_ratio"] = None if e["analytic_flops"] is None else e["flops"] / e["analytic_flops"]
    return results


def format_table(entries: list[dict]) -> str:
    lines = [f"{'config':<24} {'wl':<2} {'TFLOPs':>9} {'analytic':>9} {'meas/an':>8} {'vs xattn':>8}"]
    for e in entries:
        an = "-" if e["analytic_flops"] is None else f"{e['analytic_flops'] / 1e12:.3f}"
        ar = "-" if e["analytic_ratio"] is None else f"{e['analytic_ratio']:.3f}"
        lines.append(f"{e['config']:<24} {e['workload']:<2} {e['flops'] / 1e12:9.3f} {an:>9} {ar:>8} {e['flops_ratio']:8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="FLOPs per sample at LLaVA-1.5 7B shapes (XLA cost analysis, abstract shapes)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--method", choices=("lowered", "compiled"), default="lowered",
                    help="cost analysis of the lowered module (default; full depth, no compile) or of the CPU-compiled one "
                         "(few layers, extrapolated)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    entries = flop_table(args.quick, prompt_len=args.prompt_len, answer_tokens=args.answer_tokens, method=args.method,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    total = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"entries": entries, "method": args.method, "seconds_total": total}))
    else:
        print(format_table(entries))
        print(f"({total:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
