"""The adaptive HR budget (``flex.hr_budget='adaptive'``): cost against the selected fraction of M.

``flex-adaptive`` computes what ``flex-M`` computes (the release: every selected token, nothing
truncated) at the cost of the smallest rung of ``flex.hr_ladder`` that holds the batch's selection,
chosen per hierarchical layer with ``lax.switch``. XLA's cost analysis counts a conditional as its
dearest branch (the M rung), so FLOPs are counted per rung and mixed:

* **per rung**: each rung's program alone is the fixed-budget program ``hr_budget = K_r`` (the same
  projections and attention over K_r keys; only the packing differs: top-k there, a cumsum here),
  counted at 7B shapes (abstract, :func:`bench.flops.prefill_flops` / ``decode_flops``). The
  incremental strategy's decode step is counted on adaptive's own fast path (as
  :func:`flexattn_jax.flops.counting_config` counts every incremental step: the fallback is the exception). A prefill
  whose hierarchical layers take rungs r_1..r_Lh costs the mean over layers of F(K_{r_l}) (F is
  affine in each layer's K); a decode step likewise.
* **rung mix measured**: the rungs the layers actually take, from the masks of real runs of the
  scaled model (random weights; :func:`flexattn_jax.selection.rungs_taken` of
  ``generate(..., return_step_maps=True)``): a histogram per layer. The selected fraction of M is
  scale-free (9 x 9 pooled cells at both sizes), so the mix applies to 7B shapes as measured.
* **synthetic fractions**: a selection of fraction f in every layer takes the rung ceil(f) of the
  ladder: the staircase of the plot.

Wall time at the scaled config (workload A: one prefill and its token; batch 1): ``flex-adaptive``,
``flex-M``, ``flex-0.1M`` and ``xattn`` compiled once each, timed in interleaved rounds on inputs
whose selection is steered by the margin (an input): threshold 0 selects every cell outside the
zeroed bands, so margins of 0..6 LR rows and columns per side select about 100% ... 0% of M. Each
answer (16 greedy tokens) of ``flex-adaptive`` is checked against ``flex-M``'s.

Also measured: what per-batch rungs waste against per-sample rungs (a batch of 8 mixed selections),
and the HR part at training scale (R select rows, K < M): XLA memory analysis of one hierarchical
layer's HR attention forward + backward at 7B, per-row projection against all M projected once and
the selection as a mask (what :meth:`flexattn_jax.hierarchical.DecoderLayer._attend` does when R x K >= M).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import REFERENCE, Variant, default_config, make_inputs, scaled_config, variant
from bench.flops import decode_flops, prefill_flops
from bench.memory import memory_stats
from bench.walltime import Program, time_programs
from flexattn_jax import generate as G
from flexattn_jax import hierarchical as H
from flexattn_jax.app.visualize import save_figure
from flexattn_jax.attention import hr_attention
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import abstract_params, init_params
from flexattn_jax.selection import Selection, rungs_taken, selection_mask

NAME = "flex-adaptive"
STRATEGIES = ("project", "cache", "incremental")
MARGINS = (0, 1, 2, 3, 4, 5, 6)  # LR rows/cols zeroed per side at the scaled config (12 x 12 LR grid)


def with_budget(cfg: ModelConfig, budget, **flex) -> ModelConfig:
    return dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=budget, **flex))


def adaptive_variant(base: ModelConfig, strategy: str) -> Variant:
    """``flex-M`` with the adaptive budget."""
    v = variant(base, "flex-M", strategy)
    return dataclasses.replace(v, name=NAME, cfg=with_budget(v.cfg, "adaptive"))


def _fixed(base: ModelConfig, name: str, strategy: str | None, k: int | None = None) -> Variant:
    v = variant(base, name, strategy)
    return v if k is None else dataclasses.replace(v, cfg=with_budget(v.cfg, k))


# ---- FLOPs per rung, and mixes ------------------------------------------------------------------

def rung_flops(base: ModelConfig, strategies: tuple[str, ...] = STRATEGIES, prompt_len: int = 60, answer_tokens: int = 16,
               log=None) -> dict:
    """(prefill, decode step) FLOPs per sample of each rung's program (``hr_budget = K_r``; M: flex-M), of xattn and
    of flex-0.1M, at ``base`` shapes (lowered cost analysis, every layer and ``lax.map`` unrolled)."""
    log = log or (lambda s: None)
    ad = with_budget(base, "adaptive")
    m = base.num_hr_tokens

    def count(v: Variant) -> list[float]:
        t0 = time.perf_counter()
        out = [prefill_flops(v, prompt_len, answer_tokens), decode_flops(v, prompt_len, answer_tokens)]
        log(f"  {v.label} K={v.cfg.hr_budget_tokens}: {time.perf_counter() - t0:.0f}s")
        return out

    res: dict = {"rungs": list(ad.hr_rungs), "M": m, "per_rung": {}, REFERENCE: count(variant(base, REFERENCE)),
                 "flex-0.1M": {s: count(variant(base, "flex-0.1M", s)) for s in strategies}}
    for s in strategies:
        res["per_rung"][s] = {str(k): count(_fixed(base, "flex-M", s, None if k == m else k)) for k in ad.hr_rungs}
        if s == "incremental":  # its decode step: adaptive's own fast path (no conditional there; M slots attended)
            step = decode_flops(adaptive_variant(base, s), prompt_len, answer_tokens)
            res["per_rung"][s] = {k: [pre, step] for k, (pre, _) in res["per_rung"][s].items()}
    return res


def mix_flops(rf: dict, strategy: str, prefill_rungs: np.ndarray, step_rungs: np.ndarray) -> tuple[float, float]:
    """Workload A and B FLOPs of adaptive from the rung index each hierarchical layer took: ``prefill_rungs``
    ``(Lh,)``, ``step_rungs`` ``(steps, Lh)`` (the answer's decode steps)."""
    per = rf["per_rung"][strategy]
    pre_of = np.array([per[str(k)][0] for k in rf["rungs"]])
    step_of = np.array([per[str(k)][1] for k in rf["rungs"]])
    a = float(pre_of[np.asarray(prefill_rungs)].mean())
    b = a + float(step_of[np.asarray(step_rungs)].mean(axis=-1).sum()) if len(step_rungs) else a
    return a, b


def mix_ratios(rf: dict, rungs: np.ndarray, answer_tokens: int) -> dict:
    """7B FLOPs over xattn's of workloads A and B for each strategy, from rung indices ``(1 + steps, Lh)``."""
    ref_a = rf[REFERENCE][0]
    ref_b = ref_a + (answer_tokens - 1) * rf[REFERENCE][1]
    out = {}
    for s in rf["per_rung"]:
        a, b = mix_flops(rf, s, rungs[0], rungs[1:answer_tokens])
        out[f"flops_7b_A_ratio_{s}"], out[f"flops_7b_B_ratio_{s}"] = a / ref_a, b / ref_b
    out["flops_7b_A_ratio"] = out[f"flops_7b_A_ratio_{STRATEGIES[0]}"]
    return out


def synthetic_rows(rf: dict, strategy: str, fractions: np.ndarray, answer_tokens: int) -> list[dict]:
    """Every layer and step selecting ``f`` of M: the rung ceil(f) of the ladder; FLOPs over xattn's."""
    rungs = np.array(rf["rungs"])
    ref_a, ref_b = rf[REFERENCE][0], rf[REFERENCE][0] + (answer_tokens - 1) * rf[REFERENCE][1]
    flex_m = rf["per_rung"][strategy][str(rf["M"])]
    out = []
    for f in fractions:
        r = int(np.sum(rungs[:-1] < np.ceil(f * rf["M"] - 1e-9)))
        a, b = mix_flops(rf, strategy, np.array([r]), np.full((answer_tokens - 1, 1), r))
        out.append({"fraction": float(f), "rung": int(rungs[r]), "A_ratio": a / ref_a, "B_ratio": b / ref_b,
                    "flex_M_A_ratio": flex_m[0] / ref_a, "flex_M_B_ratio": (flex_m[0] + (answer_tokens - 1) * flex_m[1]) / ref_b})
    return out


# ---- selections measured on the scaled model ---------------------------------------------------

def _margins(batch: int, m: int | list[int]) -> jax.Array:
    ms = [m] * batch if isinstance(m, int) else m
    return jnp.asarray([[x, x] for x in ms], jnp.int32)


def measured_selections(cfg: ModelConfig, params: dict, inputs: tuple, margin: jax.Array, steps: int, strategy: str = "project"):
    """Run ``generate`` with ``cfg`` (adaptive) and return the output with its rungs: prefill (Lh,), steps (S, Lh),
    per-sample (S + 1, Lh, B), and the largest selected fraction of M per (step, layer)."""
    ids, mask, pixels = inputs
    out = G.generate(params, cfg, ids, pixels, mask, margin, max_new_tokens=steps + 1, hr_strategy=strategy,
                     return_step_maps=True)
    masks = np.concatenate([np.asarray(out.prefill_maps.hr_masks)[None], np.asarray(out.step_maps.hr_masks)])[:steps + 1]
    batch_rungs = np.asarray(rungs_taken(cfg, masks))
    sample_rungs = np.asarray(rungs_taken(cfg, masks, per_sample=True))
    first = cfg.flex.first_select_layer
    frac = masks[:, first:-1].sum(-1).max(-1) / cfg.num_hr_tokens  # (S + 1, Lh)
    return out, batch_rungs, sample_rungs, frac


def _histogram(rungs: np.ndarray, n: int) -> list[list[int]]:
    """Per hierarchical layer, how many (step) times each rung was taken."""
    r = rungs.reshape(-1, rungs.shape[-1])
    return [np.bincount(r[:, j], minlength=n).tolist() for j in range(r.shape[1])]


# ---- wall time at the scaled config -------------------------------------------------------------

def _prefill_program(v: Variant, params: dict, inputs: tuple, max_len: int) -> Program:
    cfg, strategy = v.cfg, v.strategy or "project"

    def prefill(params, ids, mask, pixels, margin):
        state, logits, _ = G.prefill(params, cfg, ids, pixels, mask, margin, max_len=max_len, hr_strategy=strategy)
        return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    compiled = jax.jit(prefill).lower(params, *inputs).compile()
    return Program(v, inputs[0].shape[0], params, inputs, compiled, None)


def sweep(config: ModelConfig | None = None, rf: dict | None = None, margins: tuple[int, ...] = MARGINS, batch: int = 1,
          prompt_len: int = 16, answer_tokens: int = 16, repeats: int = 5, seed: int = 0, progress: bool = True,
          log=None) -> list[dict]:
    """Per margin (selected fraction): prefill wall time of flex-adaptive, flex-M, flex-0.1M, xattn (ratios to xattn:
    median of the per-round ratios), adaptive's tokens == flex-M's (16 greedy tokens), the rungs taken, and with ``rf``
    (:func:`rung_flops` at 7B) the 7B FLOPs of the measured rung mix."""
    log = log or (lambda s: None)
    base = dataclasses.replace(config or scaled_config(), scan_layers=True)
    base = with_budget(base, None, threshold=0.0)  # every cell outside the zeroed margins is selected
    params = init_params(base, jax.random.key(seed))
    vs = [adaptive_variant(base, "project"), variant(base, "flex-M", "project"), variant(base, "flex-0.1M", "project"),
          variant(base, REFERENCE)]
    ids, mask, pixels = make_inputs(vs[0], batch, prompt_len, seed)
    ml = ids.shape[1] + answer_tokens
    progs = {v.label: _prefill_program(v, params, (ids, mask, pixels, _margins(batch, 0)), ml) for v in vs}
    never_stop = {"eos_token_id": -1}
    ad_cfg = dataclasses.replace(vs[0].cfg, **never_stop)
    m_cfg = dataclasses.replace(vs[1].cfg, **never_stop)
    entries = []
    for mg in margins:
        margin = _margins(batch, mg)
        inputs = (ids, mask, pixels, margin)
        runs = [prog._replace(inputs=inputs) for prog in progs.values()]
        times = time_programs(runs, 0, repeats, progress)
        out, b_rungs, _, frac = measured_selections(ad_cfg, params, (ids, mask, pixels), margin, answer_tokens - 1)
        ref = G.generate(params, m_cfg, ids, pixels, mask, margin, max_new_tokens=answer_tokens)
        ref_t = [t[0] for t in times[-1]]
        e = {"margin": mg, "batch": batch, "fraction": float(frac[0].max()), "fraction_mean": float(frac.mean()),
             "prefill_rungs": [int(ad_cfg.hr_rungs[r]) for r in b_rungs[0]],
             "rung_histogram": _histogram(b_rungs, len(ad_cfg.hr_rungs)),
             "same_tokens_as_flex_M": bool(np.array_equal(np.asarray(out.tokens)[:, :answer_tokens], np.asarray(ref.tokens)))}
        for prog, ts in zip(runs, times, strict=True):
            secs = [t[0] for t in ts]
            e[f"{prog.variant.label}_seconds"] = statistics.median(secs)
            e[f"{prog.variant.label}_time_ratio"] = statistics.median(a / b for a, b in zip(secs, ref_t, strict=True))
        e["rung_index"] = b_rungs.tolist()  # (prefill + answer - 1 steps, Lh): the rung each hierarchical layer took
        if rf is not None:
            e.update(mix_ratios(rf, b_rungs, answer_tokens))
        log(f"  margin {mg}: fraction {e['fraction']:.3f}, adaptive/xattn time {e[f'{NAME}/project_time_ratio']:.3f}")
        entries.append(e)
    return entries


def batch_waste(config: ModelConfig | None = None, rf: dict | None = None, batch: int = 8, prompt_len: int = 16,
                answer_tokens: int = 16, seed: int = 1, margins: tuple[int, ...] = MARGINS) -> dict:
    """A batch of mixed selections (``margins`` cycled, threshold 0; and the random model's own selections at the
    default threshold): HR work per sample with per-batch rungs (what runs) against per-sample rungs (what grouping
    samples could reach at best): the mean rung in HR tokens, and (with ``rf``) 7B FLOPs of workload A."""
    base = dataclasses.replace(config or scaled_config(), scan_layers=True)
    params = init_params(base, jax.random.key(seed))
    out = {}
    for name, threshold, margins in (("mixed margins, threshold 0", 0.0, [margins[i % len(margins)] for i in range(batch)]),
                                     ("random model, threshold 64", base.flex.threshold, [0] * batch)):
        cfg = dataclasses.replace(with_budget(base, "adaptive", threshold=threshold), eos_token_id=-1)
        v = adaptive_variant(base, "project")
        ids, mask, pixels = make_inputs(v, batch, prompt_len, seed)
        _, b_rungs, s_rungs, _ = measured_selections(cfg, params, (ids, mask, pixels), _margins(batch, margins), answer_tokens - 1)
        ks = np.array(cfg.hr_rungs)
        e = {"batch": batch, "mean_rung_tokens_batch": float(ks[b_rungs].mean()), "mean_rung_tokens_sample": float(ks[s_rungs].mean()),
             "M": cfg.num_hr_tokens}
        if rf is not None:
            a_batch = mix_flops(rf, "project", b_rungs[0], b_rungs[1:0])[0]
            a_sample = float(np.mean([mix_flops(rf, "project", s_rungs[0, :, i], s_rungs[1:0, :, i])[0] for i in range(batch)]))
            e.update(flops_7b_A_ratio_batch=a_batch / rf[REFERENCE][0], flops_7b_A_ratio_sample=a_sample / rf[REFERENCE][0])
        out[name] = e
    return out


# ---- the HR part at training scale ------------------------------------------------------------------

def training_hr_memory(config: ModelConfig | None = None, rows: int = 2048, budget: float = 0.1, seq: int = 2048) -> dict:
    """Temp bytes (XLA memory analysis, CPU compile from abstract shapes, fp32) of one hierarchical layer's HR part,
    forward + backward, at ``rows`` select rows and K = ``budget`` M: projecting each row's K tokens (B, R, K, D)
    against projecting all M once and attending with the selection as a mask, and the release's K = M (all M, the mask its
validity: what adaptive runs there, every rung having R x K_r >= M); and their FLOPs."""
    cfg = dataclasses.replace(config or default_config(), dtype="float32", param_dtype="float32")
    cfg = with_budget(cfg, budget)
    t, m, k = cfg.text, cfg.num_hr_tokens, cfg.hr_budget_tokens
    layer = H.DecoderLayer(cfg)
    p_layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract_params(cfg)["text"]["layers"])
    f32, i32 = jnp.float32, jnp.int32
    sds = jax.ShapeDtypeStruct
    shapes = (p_layer, sds((1, rows, t.num_heads, t.head_dim), f32), sds((1, m, t.hidden_size), f32),
              sds((1, m, t.head_dim), f32), sds((1, m, t.head_dim), f32), sds((1, rows, k), i32), sds((1, rows, k), bool))

    def loss(per_row: bool, all_tokens: bool = False):
        def f(p, q, feats, cos, sin, index, valid):
            if all_tokens:  # the release's K = M: every row over all M tokens, the mask its validity
                index, valid = jnp.broadcast_to(jnp.arange(m, dtype=i32), (1, rows, m)), selection_mask(Selection(index, valid), m)
            z = jnp.zeros((1, 1), i32)
            ctx = H.LayerContext(None, None, None, jnp.int32(0), z, z > 0, z[:, 0], jnp.zeros((1, 2), i32), jnp.float32(1),
                                 feats, cos, sin, None)
            sel = Selection(index, valid)
            if per_row:
                k_hr, v_hr = layer.apply({"params": p}, index, ctx, method=H.DecoderLayer._project)
                o, lse = hr_attention(q, k_hr, v_hr, valid)
            else:
                o, lse = layer.apply({"params": p}, q, sel, ctx, None, method=H.DecoderLayer._attend)
            return jnp.sum(o) + jnp.sum(lse)

        return jax.grad(f, argnums=(0, 1, 2))

    out = {"rows": rows, "K": k, "M": m, "seq": seq, "dtype": "float32"}
    for name, per_row, all_tokens in (("per_row_projection", True, False), ("all_M_and_mask", False, False),
                                      ("K_equals_M", False, True)):
        lowered = jax.jit(loss(per_row, all_tokens)).lower(*shapes)
        ca = lowered.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out[name] = {"temp_bytes": memory_stats(lowered.compile())["temp"], "flops": float(ca["flops"])}
    return out


# ---- the table, the plot -------------------------------------------------------------------------

def adaptive_table(config_7b: ModelConfig | None = None, config_scaled: ModelConfig | None = None, prompt_len_7b: int = 60,
                   answer_tokens: int = 16, repeats: int = 5, progress: bool = True, margins: tuple[int, ...] = MARGINS,
                   training_rows: int = 2048, log=None) -> dict:
    """Everything above, as one JSON-able dict (``training_rows=0``: without the training-scale memory)."""
    log = log or (lambda s: None)
    big = config_7b or default_config()
    log("adaptive: FLOPs per rung at 7B shapes")
    rf = rung_flops(big, prompt_len=prompt_len_7b, answer_tokens=answer_tokens, log=log)
    fractions = np.linspace(0, 1, 81)
    res = {"rung_flops_7b": rf, "synthetic": {s: synthetic_rows(rf, s, fractions, answer_tokens) for s in STRATEGIES}}
    log("adaptive: wall time against the selected fraction (scaled config)")
    res["sweep"] = sweep(config_scaled, rf, margins, answer_tokens=answer_tokens, repeats=repeats, progress=progress, log=log)
    log("adaptive: per-batch against per-sample rungs")
    res["batch_waste"] = batch_waste(config_scaled, rf, margins=margins, answer_tokens=answer_tokens)
    if training_rows:
        log("adaptive: the HR part at training scale (7B, memory analysis)")
        res["training_hr_memory"] = training_hr_memory(big, rows=training_rows)
    return res


def plot(res: dict, path: str | Path) -> Path:
    """PNG: 7B FLOPs (workload A) and scaled wall time over xattn's against the selected fraction of M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    syn = res["synthetic"]["project"]
    f = [e["fraction"] for e in syn]
    ax = axes[0]
    ax.step(f, [e["A_ratio"] for e in syn], where="pre", label=f"{NAME} (every layer selecting f)")
    ax.plot(f, [e["flex_M_A_ratio"] for e in syn], label="flex-M (exact)")
    ax.axhline(1.0, color="k", lw=1, label="xattn")
    sw = res["sweep"]
    if sw and "flops_7b_A_ratio" in sw[0]:
        ax.plot([e["fraction"] for e in sw], [e["flops_7b_A_ratio"] for e in sw], "o", label=f"{NAME}, measured rung mix")
    ax.axhline(0.70, color="gray", ls=":", lw=1, label="goal 0.70")
    ax.set_title("prefill FLOPs / xattn, 7B shapes (workload A)", fontsize=10)
    ax = axes[1]
    for label, style in ((f"{NAME}/project", "o-"), ("flex-M/project", "s-"), ("flex-0.1M/project", "^--")):
        ax.plot([e["fraction"] for e in sw], [e[f"{label}_time_ratio"] for e in sw], style, label=label)
    ax.axhline(1.0, color="k", lw=1, label="xattn")
    ax.axhline(0.70, color="gray", ls=":", lw=1)
    ax.set_title("prefill wall time / xattn, scaled config, batch 1", fontsize=10)
    for ax in axes:
        ax.set_xlabel("selected fraction of M (largest in the batch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110, make_parents=True)


def format_table(res: dict) -> str:
    """Markdown: the sweep (fraction -> FLOPs and time ratios), the per-rung FLOPs, the batch waste, training memory."""
    rf = res["rung_flops_7b"]
    lines = ["FLOPs per sample per rung program at 7B shapes (TFLOPs; prefill = workload A, step = one decode step):", "",
             "| strategy | K | prefill | step |", "|---|---:|---:|---:|"]
    for s, per in rf["per_rung"].items():
        for k, (a, b) in per.items():
            lines.append(f"| {s} | {k} | {a / 1e12:.3f} | {b / 1e12:.4f} |")
    lines.append(f"| xattn | {rf['M']} | {rf[REFERENCE][0] / 1e12:.3f} | {rf[REFERENCE][1] / 1e12:.4f} |")
    for s, (a, b) in rf["flex-0.1M"].items():
        lines.append(f"| flex-0.1M/{s} (truncates) | {int(np.ceil(0.1 * rf['M']))} | {a / 1e12:.3f} | {b / 1e12:.4f} |")
    nan = float("nan")
    lines += ["", f"Against the selected fraction (scaled config: batch {res['sweep'][0]['batch']}, threshold 0, margin m zeroes m LR "
              "rows/cols per side; rungs in the scaled model's HR tokens; time: prefill, median per-round ratio to xattn; FLOPs: 7B "
              "shapes, the rung mix measured on the 16-token answer):", "",
              "| margin | selected (max) | prefill rungs (per layer) | same tokens as flex-M | A FLOPs/xattn project | "
              "B FLOPs/xattn project | B cache | B incremental | A time/xattn adaptive | flex-M | flex-0.1M |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in res["sweep"]:
        lines.append(f"| {e['margin']} | {e['fraction']:.3f} | {e['prefill_rungs']} | {e['same_tokens_as_flex_M']} | "
                     f"{e.get('flops_7b_A_ratio_project', nan):.3f} | {e.get('flops_7b_B_ratio_project', nan):.3f} | "
                     f"{e.get('flops_7b_B_ratio_cache', nan):.3f} | {e.get('flops_7b_B_ratio_incremental', nan):.3f} | "
                     f"{e[f'{NAME}/project_time_ratio']:.3f} | "
                     f"{e['flex-M/project_time_ratio']:.3f} | {e['flex-0.1M/project_time_ratio']:.3f} |")
    bw = res.get("batch_waste")
    if bw:
        lines += ["", "Per-batch against per-sample rungs (batch 8; mean rung in HR tokens; 7B workload A FLOPs/xattn):", "",
                  "| selections | mean rung, batch | mean rung, per sample | A FLOPs/xattn batch | per sample |",
                  "|---|---:|---:|---:|---:|"]
        for name, e in bw.items():
            lines.append(f"| {name} | {e['mean_rung_tokens_batch']:.0f} | {e['mean_rung_tokens_sample']:.0f} | "
                         f"{e.get('flops_7b_A_ratio_batch', float('nan')):.3f} | {e.get('flops_7b_A_ratio_sample', float('nan')):.3f} |")
    tm = res.get("training_hr_memory")
    if tm:
        lines += ["", f"HR part of one hierarchical layer at training scale (7B, R = {tm['rows']} rows, K = {tm['K']}, M = {tm['M']}, "
                  "fp32, forward + backward):", "", "| HR keys | temp GB | GFLOPs |", "|---|---:|---:|"]
        for name in ("per_row_projection", "all_M_and_mask", "K_equals_M"):
            if name in tm:
                lines.append(f"| {name} | {tm[name]['temp_bytes'] / 1e9:.2f} | {tm[name]['flops'] / 1e9:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The adaptive HR budget: cost against the selected fraction (7B FLOPs, scaled wall time)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("docs"), help="writes adaptive.json and adaptive.png here (default docs/)")
    args = ap.parse_args(argv)
    res = adaptive_table(repeats=args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adaptive.json").write_text(json.dumps(res, indent=1))
    res["plot"] = str(plot(res, args.out / "adaptive.png"))
    print(json.dumps(res) if args.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
