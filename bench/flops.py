"""FLOPs per sample from XLA's cost analysis of abstract-shape compiles, next to an analytic count.

Nothing is allocated: parameters and inputs are ``jax.ShapeDtypeStruct`` (bfloat16), each function
is ``jax.jit(...).lower(...).compile()`` and ``cost_analysis()['flops']`` is read.

How the counts are composed (XLA's cost analysis counts a loop body once, so nothing measured
here runs inside a loop, and compiling 32 unrolled 7B layers on a small CPU is slow):

* Every text compile uses few decoder layers and a 1-layer CLIP tower; costs are linear in the
  layer counts, ``f(Lp, Lh, Lv) = a + b Lp + c Lh + v Lv`` (Lp plain layers, one select layer,
  Lh hierarchical layers, Lv CLIP layers run). Flex: compiles at (Lp, Lh) = (0, 1), (0, 2),
  (1, 1) give ``c`` and ``b``; plain: L = 1, 2 give ``b``. ``v`` comes from compiling the CLIP
  tower + projector alone with 1 and 2 layers run. The full count extrapolates exactly to
  (Lp, Lh, Lv) = (first_select_layer, L - first_select_layer - 1, vision_layers_used).
* ``cache`` strategy: :func:`flexattn_jax.generate.project_all_hr` is a ``lax.map`` over the
  hierarchical layers, counted once at any Lh, so ``(Lh - 1)`` times its one-layer cost (compiled
  alone) is added.
* ``lr``: :func:`generate.prefill` with flex off, one 336 px view, T = prompt + 576.
* ``hd-seq``: ``generate.prefill`` of the plain model on T = prompt + 576 + M text-only tokens (no
  pixels) plus ``vision.encode_images`` of 1 + zoom^2 views compiled separately; decode is the
  plain decode step over a cache of T + answer tokens.
* ``xattn``: prefill = the decoder with every row a select row (``hr_mode='paper'``,
  ``selection='all'``, K = M projected in each hierarchical layer) and the LM head on the last row
  (``generate.prefill`` refuses 'paper'); decode = ``generate.decode_step`` with ``selection='all'``
  and the HR K/V cached at prefill (one row: 'paper' and 'release' coincide).
* ``flex-K``: ``generate.prefill`` / ``decode_step`` (release semantics, ``selection='attention'``),
  HR strategy ``project`` (K projected per hierarchical layer per step) or ``cache`` (all M at
  prefill).

Workload A = prefill (its logits give the one answer token); B = prefill + (answer - 1) decode
steps, each compiled once at a cache length of prompt + answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from flexattn_jax import generate as G
from flexattn_jax.config import FlexConfig, ModelConfig, TextConfig, VisionConfig
from flexattn_jax.model import (
    default_select_rows,
    embed_inputs,
    logits_from_hidden,
    positions_from_mask,
    run_decoder,
)
from flexattn_jax.params import abstract_params
from flexattn_jax.vision import encode_images

SDS = jax.ShapeDtypeStruct


def default_config() -> ModelConfig:
    """LLaVA-1.5 7B shapes with FlexAttention at 1008 px (flex switched per configuration)."""
    return ModelConfig(
        flex=FlexConfig(enabled=True, highres_size=1008, lowres_size=336, zoom_ratio=3, first_select_layer=8),
        dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
    )


def tiny_config() -> ModelConfig:
    """A small config for tests (fast compiles)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=28, patch_size=7),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16),
        flex=FlexConfig(enabled=True, highres_size=84, lowres_size=28, zoom_ratio=3, first_select_layer=1, pool_size=2),
        image_token_id=100, dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
    )


# ---- configurations ----------------------------------------------------------------------------

CONFIGS = ("lr", "hd-seq", "xattn", "flex-M", "flex-0.25M", "flex-0.1M")
BUDGETS = {"flex-M": None, "flex-0.25M": 0.25, "flex-0.1M": 0.1}


def _with(cfg: ModelConfig, text_layers: int | None = None, vision_layers: int | None = None, **flex: Any) -> ModelConfig:
    kw: dict[str, Any] = {"scan_layers": False}
    if text_layers is not None:
        kw["text"] = dataclasses.replace(cfg.text, num_layers=text_layers)
    if vision_layers is not None:
        kw["vision"] = dataclasses.replace(cfg.vision, num_layers=vision_layers)
    if flex:
        kw["flex"] = dataclasses.replace(cfg.flex, **flex)
    return dataclasses.replace(cfg, **kw)


_METHOD = {"m": "lowered"}


def _flops(fn, *args) -> float:
    """``cost_analysis()['flops']`` of the lowered (pre-optimisation, backend-independent) module,
    or, with method 'compiled', of the module the CPU backend compiled."""
    lowered = jax.jit(fn).lower(*args)
    ca = lowered.compile().cost_analysis() if _METHOD["m"] == "compiled" else lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def _ids(cfg: ModelConfig, t: int):
    return SDS((1, t), jnp.int32), SDS((1, t), jnp.bool_)


def _pixels(cfg: ModelConfig):
    s = cfg.image_size
    return SDS((1, s, s, cfg.vision.num_channels), jnp.dtype(cfg.dtype))


# ---- the compiled pieces -----------------------------------------------------------------------

def _prefill_fn(cfg: ModelConfig, max_len: int, strategy: str, with_pixels: bool):
    def f(params, ids, mask, pix):
        return G.prefill(params, cfg, ids, pix if with_pixels else None, mask, None, max_len=max_len, hr_strategy=strategy)[:2]
    return f


def _xattn_prefill_fn(cfg: ModelConfig):
    """Every row attends to all M HR keys (hr_mode='paper', selection='all'); logits of the last row."""
    def f(params, ids, mask, pix):
        positions = positions_from_mask(mask)
        x, hr = embed_inputs(params, cfg, ids, pix, positions, None)
        rows, valid = default_select_rows(cfg, mask)
        out = run_decoder(params["text"], cfg, x, positions, mask, hr=hr, select_rows=rows, select_valid=valid)
        return logits_from_hidden(params["text"], cfg, out.x[:, -1:])
    return f


def _decode_fn(cfg: ModelConfig):
    def f(params, state, token):
        return G.decode_step(params, cfg, state, token)[:2]
    return f


def _decode_state(cfg: ModelConfig, t: int, max_len: int, strategy: str, with_pixels: bool):
    ap = abstract_params(cfg)
    ids, mask = _ids(cfg, t)
    state, _ = jax.eval_shape(_prefill_fn(cfg, max_len, strategy, with_pixels), ap, ids, mask, _pixels(cfg))
    return ap, state


def prefill_flops(cfg: ModelConfig, t: int, max_len: int, kind: str, strategy: str = "project", with_pixels: bool = True) -> float:
    ap = abstract_params(cfg)
    ids, mask = _ids(cfg, t)
    fn = _xattn_prefill_fn(cfg) if kind == "xattn" else _prefill_fn(cfg, max_len, strategy, with_pixels)
    return _flops(fn, ap, ids, mask, _pixels(cfg))


def decode_flops(cfg: ModelConfig, t: int, max_len: int, strategy: str, with_pixels: bool = True) -> float:
    ap, state = _decode_state(cfg, t, max_len, strategy, with_pixels)
    return _flops(_decode_fn(cfg), ap, state, SDS((1,), jnp.int32))


def vision_flops(cfg: ModelConfig, views: int) -> float:
    ap = abstract_params(cfg)
    s = cfg.vision.image_size
    return _flops(lambda p, x: encode_images(p, cfg, x), ap, SDS((views, s, s, cfg.vision.num_channels), jnp.dtype(cfg.dtype)))


def project_all_hr_flops(cfg: ModelConfig, t: int) -> float:
    """One hierarchical layer's projection of all M HR tokens (the lax.map body)."""
    small = _with(cfg, text_layers=cfg.flex.first_select_layer + 2)
    ap = abstract_params(small)
    hr = G.HRContext(SDS((1, small.num_hr_tokens, small.text.hidden_size), jnp.dtype(cfg.dtype)),
                     SDS((1, small.num_hr_tokens, small.text.head_dim), jnp.float32),
                     SDS((1, small.num_hr_tokens, small.text.head_dim), jnp.float32),
                     SDS((1,), jnp.int32), SDS((1, 2), jnp.int32), SDS((1,), jnp.bool_))
    return _flops(lambda p, h: G.project_all_hr(p["text"], small, h), ap, hr)


# ---- layer-count extrapolation ---------------------------------------------------------------

def _extrapolate(cfg: ModelConfig, measure, flex: bool, vis_per_layer: float, direct: bool = False) -> float:
    """``measure(small_cfg)`` at few layers (1-layer CLIP), extrapolated to the full depth;
    ``direct``: one compile at the full depth (small models)."""
    if direct:
        return measure(cfg)
    full_l, lv = cfg.text.num_layers, cfg.vision_layers_used
    if flex:
        f1 = measure(_with(cfg, 2, 2, first_select_layer=0))  # select + 1 hier
        f2 = measure(_with(cfg, 3, 2, first_select_layer=0))  # select + 2 hier
        f3 = measure(_with(cfg, 3, 2, first_select_layer=1))  # 1 plain + select + 1 hier
        c, b = f2 - f1, f3 - f1
        lp = cfg.flex.first_select_layer
        lh = full_l - lp - 1
        return f1 + b * lp + c * (lh - 1) + vis_per_layer * (lv - 1)
    f1 = measure(_with(cfg, 1, 2))
    f2 = measure(_with(cfg, 2, 2))
    return f1 + (f2 - f1) * (full_l - 1) + vis_per_layer * (lv - 1)


# ---- analytic counts ----------------------------------------------------------------------------

def analytic(cfg: ModelConfig, config: str, workload: str, strategy: str, prompt: int, answer: int) -> float:
    """Matmuls as 2 x (weights) x (tokens), attention as dense 4 x rows x keys x width (masked
    causal attention is computed in full), per the benchmarks.md table (which halves causal)."""
    v, t = cfg.vision, cfg.text
    g, m, z2 = cfg.num_image_tokens, cfg.num_hr_tokens, cfg.zoom**2
    lv, L = cfg.vision_layers_used, t.num_layers
    lh = L - cfg.flex.first_select_layer - 1
    p1 = v.num_patches + 1
    vis_view = (2 * v.num_patches * v.patch_size**2 * v.num_channels * v.hidden_size
                + lv * (2 * p1 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * p1 * p1 * v.hidden_size)
                + 2 * g * (v.hidden_size * t.hidden_size + t.hidden_size**2))
    d, qd, kvd = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    w_layer = d * qd * 2 + d * kvd * 2 + 3 * d * t.intermediate_size  # q, o, k, v, mlp
    head = 2 * d * t.vocab_size

    def llm(rows: int, keys: int) -> float:
        return L * (2 * rows * w_layer + 4 * rows * keys * qd)

    kv_proj = 2 * d * 2 * kvd  # per HR token per hierarchical layer
    n = prompt + g
    max_len = n + answer
    k = m if config == "xattn" else (m if config in ("hd-seq", "lr") else _budget(cfg, config))
    if config == "lr":
        pre, step = vis_view + llm(n, n) + head, llm(1, max_len) + head
    elif config == "hd-seq":
        nh = n + m
        pre, step = (1 + z2) * vis_view + llm(nh, nh) + head, llm(1, nh + answer) + head
    elif config == "xattn":
        pre = (1 + z2) * vis_view + llm(n, n) + head + lh * (m * kv_proj + 4 * n * m * qd)
        step = llm(1, max_len) + head + lh * 4 * m * qd
    else:
        base = (1 + z2) * vis_view + llm(n, n) + head
        if strategy == "cache":
            pre = base + lh * m * kv_proj + lh * 4 * k * qd
            step = llm(1, max_len) + head + lh * 4 * k * qd
        else:
            pre = base + lh * (k * kv_proj + 4 * k * qd)
            step = llm(1, max_len) + head + lh * (k * kv_proj + 4 * k * qd)
    return pre if workload == "A" else pre + (answer - 1) * step


def _budget(cfg: ModelConfig, config: str) -> int:
    return dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=BUDGETS[config])).hr_budget_tokens


# ---- the table ----------------------------------------------------------------------------------

def flop_table(quick: bool = False, config: ModelConfig | None = None, prompt_len: int = 60, answer_tokens: int = 16,
               log=None, configs: tuple[str, ...] | None = None, direct: bool | None = None,
               method: str = "lowered") -> list[dict]:
    """Entries per (configuration, HR strategy, workload): measured and analytic FLOPs, ratio to xattn.

    ``quick`` measures lr, hd-seq, xattn, flex-M and flex-0.1M with the 'cache' strategy, plus
    flex-0.1M with 'project'. ``configs`` keeps only those names (xattn, the reference, is always
    kept). ``direct`` compiles each function once at the full depth instead of fitting few-layer
    compiles (default: with method 'lowered', which needs no compile, or a decoder of <= 4 layers).
    ``method``: 'lowered' reads XLA's cost analysis of the lowered module (the HLO as JAX emits it:
    bf16 dots counted as such, backend-independent); 'compiled' that of the CPU-compiled module,
    where XLA's CPU backend upcasts every bf16 dot's weights to f32 by converting the whole
    stacked (L, ...) weight array in each unrolled layer: an artefact quadratic in depth (about
    47 GFLOPs of the 60 GFLOPs it reports for a 7B decode step; prefill barely changes) that a
    GPU would not run, and that the linear few-layer fit does not extrapolate faithfully.
    """
    if method not in ("lowered", "compiled"):
        raise ValueError(f"method={method!r}: use 'lowered' or 'compiled'")
    _METHOD["m"] = method
    cfg = config or default_config()
    cfg = dataclasses.replace(cfg, scan_layers=False)
    log = log or (lambda *a: None)
    g, m, z2 = cfg.num_image_tokens, cfg.num_hr_tokens, cfg.zoom**2
    n = prompt_len + g
    max_len = n + answer_tokens
    steps = answer_tokens - 1
    plain = _with(cfg, enabled=False)
    plain_336 = dataclasses.replace(plain, flex=dataclasses.replace(plain.flex, highres_size=cfg.flex.lowres_size))

    if quick:
        runs = [("lr", None), ("hd-seq", None), ("xattn", "cache"), ("flex-M", "cache"), ("flex-0.1M", "cache"), ("flex-0.1M", "project")]
    else:
        runs = [("lr", None), ("hd-seq", None), ("xattn", "cache")] + [(c, s) for c in BUDGETS for s in ("project", "cache")]
    if configs is not None:
        runs = [r for r in runs if r[0] in configs or r[0] == "xattn"]
    if direct is None:
        direct = method == "lowered" or cfg.text.num_layers <= 4
    t0 = time.perf_counter()
    vis = {}
    for views in (1, 1 + z2):
        if direct:
            vis[views] = (0.0, 0.0)
            continue
        a1 = vision_flops(_with(cfg, vision_layers=2), views)
        a2 = vision_flops(_with(cfg, vision_layers=3), views)
        vis[views] = (a1, a2 - a1)  # (1-layer cost, per-layer)
    full_vis = {k: a + b * (cfg.vision_layers_used - 1) for k, (a, b) in vis.items()}
    if direct:
        full_vis = {1 + z2: vision_flops(cfg, 1 + z2)} if any(r[0] == "hd-seq" for r in runs) else {}
    log(f"vision: {time.perf_counter() - t0:.1f}s")

    proj_hr = None
    results: list[dict] = []
    for name, strategy in runs:
        t1 = time.perf_counter()
        if name == "lr":
            c = plain_336
            pre = _extrapolate(c, lambda s: prefill_flops(s, n, max_len, "plain", "project"), False, vis[1][1], direct)
            dec = _extrapolate(c, lambda s: decode_flops(s, n, max_len, "project"), False, 0.0, direct)
        elif name == "hd-seq":
            c = plain
            nh = n + m
            pre = _extrapolate(c, lambda s, nh=nh: prefill_flops(s, nh, nh + answer_tokens, "plain", with_pixels=False), False, 0.0, direct)
            pre += full_vis[1 + z2]
            dec = _extrapolate(
                c, lambda s, nh=nh: decode_flops(s, nh, nh + answer_tokens, "project", with_pixels=False), False, 0.0, direct
            )
        else:
            if name == "xattn":
                c_pre = _with(cfg, selection="all", hr_mode="paper", hr_budget=None)
                c = _with(cfg, selection="all", hr_mode="release", hr_budget=None)
                pre = _extrapolate(c_pre, lambda s: prefill_flops(s, n, max_len, "xattn"), True, vis[1 + z2][1], direct)
            else:
                c = _with(cfg, selection="attention", hr_mode="release", hr_budget=BUDGETS[name])
                pre = _extrapolate(c, lambda s, st=strategy: prefill_flops(s, n, max_len, "flex", st), True, vis[1 + z2][1], direct)
            dec = _extrapolate(c, lambda s, st=strategy: decode_flops(s, n, max_len, st), True, 0.0, direct)
            if strategy == "cache" and name != "xattn":
                if proj_hr is None:
                    proj_hr = project_all_hr_flops(cfg, n)
                pre += proj_hr * (cfg.text.num_layers - cfg.flex.first_select_layer - 2)
        secs = time.perf_counter() - t1
        label = name if strategy is None or name == "xattn" else f"{name}/{strategy}"
        log(f"{label}: {secs:.1f}s")
        for wl, fl in (("A", pre), ("B", pre + steps * dec)):
            results.append({
                "config": label, "workload": wl, "flops": fl, "prefill_flops": pre, "decode_step_flops": dec,
                "analytic_flops": analytic(cfg, name, wl, strategy or "project", prompt_len, answer_tokens),
                "seconds": None,
            })
    ref = {e["workload"]: e["flops"] for e in results if e["config"] == "xattn"}
    for e in results:
        e["flops_ratio"] = e["flops"] / ref[e["workload"]]
        e["analytic_ratio"] = e["flops"] / e["analytic_flops"]
    return results


def format_table(entries: list[dict]) -> str:
    lines = [f"{'config':<20} {'wl':<2} {'TFLOPs':>9} {'analytic':>9} {'meas/an':>8} {'vs xattn':>8}"]
    for e in entries:
        lines.append(f"{e['config']:<20} {e['workload']:<2} {e['flops'] / 1e12:9.3f} {e['analytic_flops'] / 1e12:9.3f} "
                     f"{e['analytic_ratio']:8.3f} {e['flops_ratio']:8.3f}")
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
