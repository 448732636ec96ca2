"""The HR kernel's goals from the TPU compiler: 7B on v5p-64, 19 samples per chip, T = R = 2048, 1008 px.

``python -m bench.hr_goals --row NAME [--out docs/hr_goals.json]`` compiles one row's train step with
:func:`flexattn_jax.app.aot.compile_program` (bf16 compute, fp32 masters + AdamW, frozen CLIP, full remat, fsdp
over the 32 chips) and ``--table`` prints the goals from the rows in ``--out``.

A full-depth 7B compile takes about 20 minutes on a small host, so the rows compile a decoder cut to
:data:`LAYERS` layers (8 plain, the select layer, one hierarchical layer: every layer kind) with the layers
scanned. XLA's cost analysis counts a loop body once, so the cut program counts the same loop bodies as the
full one; the step estimate is :func:`flexattn_jax.app.aot.step_estimate` with the **full-depth** model's FLOPs
(the counted part's rate, ``compiler FLOPs / optimal_seconds``, applied to the full model's FLOPs).

Rows: ``splash_hr`` (the Pallas HR kernel, its cost estimate at every block: the upper bound), ``splash_hr-share``
(the cost estimate at ``--share``, the active block share measured by ``bench/hr_kernel.py``; one row per share),
``selected-0.25`` (``flex.train_hr_budget=0.25`` with the packed path alone, ``train_hr_fallback=False``: what runs
when the unions fit). LLaVA-1.5-7B's step at the same batch and FlexAttention's XLA HR path are the full-depth rows
of ``docs/fit.json`` (``bench/fit.py``), their step re-derived with today's model FLOPs.

The scaling's check (:func:`check`): ``check-flex-scanned`` / ``check-flex-unrolled`` (FlexAttention-7B with
``splash_hr`` at ``--share``) and ``check-llava-scanned`` / ``check-llava-unrolled`` (LLaVA-1.5-7B) compile a
shorter cut (:data:`CHECK_LAYERS`) with the layers scanned, and with the decoder's and CLIP's layers unrolled
(``scan_layers=False``), where the compiler counts every layer. The scanned program's estimate scaled to the cut's
model FLOPs is compared with the unrolled program's scaled alike and with its raw ``optimal_seconds`` and FLOPs.
``--matmul-check`` compiles one fsdp-sharded decoder matmul (:func:`matmul_check`): the compiler's own
collective-matmul loop, which leaves even an unrolled program's FLOPs short of the model's.

Besides the plain scaling each FlexAttention row gets :func:`split_estimate` (the HR kernels at their roofline
per hierarchical layer, the rest scaled), the counted program's roofline (:func:`roofline`) and, compiled with
``breakdown=True``, the compiler's estimated cycles by source (:func:`by_file`, :func:`by_function`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from flexattn_jax import flops as F
from flexattn_jax.app import aot
from flexattn_jax.chips import CHIPS
from flexattn_jax.kernels import hr_attention as HRK

TARGET, MODEL, PLAIN, BATCH, SEQ, ROWS = "v5p-64", "llava-flexattn-7b", "llava-1.5-7b", 19, 2048, 2048
LAYERS = 10  # 7B's first_select_layer is 8: layers 0-7 plain, 8 select, 9 hierarchical
CHECK_LAYERS = {"flex": 3, "llava": 2}  # flex: plain, select, hierarchical (every kind); llava: two plain layers
CHECKS = tuple(f"check-{m}-{how}" for m in CHECK_LAYERS for how in ("scanned", "unrolled"))
ROW_NAMES = ("splash_hr", "splash_hr-share", "selected-0.25", *CHECKS)
SHARED = ("splash_hr-share", "check-flex-scanned", "check-flex-unrolled")  # the rows that take --share
CYCLE_LINES = 40  # the source lines of a row's cycle breakdown kept in the JSON (the rest summed)
GOALS = {"step_ratio": 1.6, "mfu": 0.55, "selected_flops_ratio": 1.2, "selected_step_ratio": 1.3}


def row_config(name: str, share: float = 1.0):
    """The full-depth model config of a row (before :func:`aot.program_config` cuts and casts it)."""
    if name not in ROW_NAMES:
        raise SystemExit(f"--row {name!r}: use one of {ROW_NAMES}")
    cfg = aot.load_model_config(PLAIN if name.startswith("check-llava") else MODEL)
    flex = cfg.flex
    if name in SHARED:
        flex = dataclasses.replace(flex, hr_kernel_block_share=share)
    elif name == "selected-0.25":
        flex = dataclasses.replace(flex, train_hr_budget=0.25, train_hr_fallback=False)
    return dataclasses.replace(cfg, flex=flex, scan_layers=not name.endswith("unrolled"))


def row_layers(name: str) -> int:
    """The decoder cut a row compiles."""
    return CHECK_LAYERS[name.split("-")[1]] if name in CHECKS else LAYERS


def row_impl(name: str) -> str:
    """The attention implementation a row compiles with: ``splash_hr`` for FlexAttention, ``auto`` (splash on TPU) for
    LLaVA-1.5, as ``bench/fit.py`` compiles it."""
    return "auto" if name.startswith("check-llava") else "splash_hr"


def full_depth(report: aot.CompileReport, cfg, impl: str = "splash_hr") -> dict[str, Any]:
    """The cut compile's figures and its step / MFU estimate at full depth (the full model's FLOPs)."""
    full = aot.program_config(cfg, program="train", attention_impl=impl)
    model = F.train_flops(full, report.global_batch, SEQ, ROWS) / report.chips
    step, mfu = aot.step_estimate(report.optimal_seconds, report.flops_per_chip, model, CHIPS["v5p"].peak_flops)
    return {**{k: getattr(report, k) for k in ("layers", "per_chip_bytes", "fits", "kernels", "compile_seconds", "flops_per_chip",
                                               "bytes_accessed_per_chip", "while_loops", "model_flops_per_chip", "optimal_seconds",
                                               "step_seconds_estimate", "mfu_estimate")},
            "full_model_flops_per_chip": model, "full_step_seconds": step, "full_mfu": mfu}


def compile_row(name: str, share: float) -> dict[str, Any]:
    cfg = row_config(name, share)
    r = aot.compile_program(TARGET, cfg, "train", per_device_batch=BATCH, seq_len=SEQ, select_rows=ROWS,
                            attention_impl=row_impl(name), remat="full", layers=row_layers(name),
                            model_name=PLAIN if name.startswith("check-llava") else MODEL, breakdown=True)
    cycles = list(r.cycles.items())
    top = dict(cycles[:CYCLE_LINES]) | ({"(rest)": sum(c for _, c in cycles[CYCLE_LINES:])} if len(cycles) > CYCLE_LINES else {})
    return {"row": name, "share": share if name in SHARED else 1.0, **full_depth(r, cfg, row_impl(name)), "cycles": top}


def by_function(cycles: dict[str, int]) -> dict[str, float]:
    """A row's ``cycles`` (``file:line:function [< caller]``) summed without the line numbers, as shares of the total,
    largest first."""
    total, out = sum(cycles.values()) or 1, Counter()
    for key, c in cycles.items():
        out[re.sub(r":\d+:", ":", key)] += c / total
    return dict(out.most_common())


def by_file(cycles: dict[str, int]) -> dict[str, float]:
    """A row's ``cycles`` summed by the project file that made them (the caller's, else the innermost frame's):
    ``flexattn_jax/vision.py`` is CLIP and the projector, ``text.py`` / ``hierarchical.py`` the decoder layers,
    ``model.py`` the LM head; shares of the total, largest first."""
    total, out = sum(cycles.values()) or 1, Counter()
    for key, c in cycles.items():
        out[key.split(" < ")[-1].split(":")[0]] += c / total
    return dict(out.most_common())


def roofline(row: dict[str, Any]) -> dict[str, float | None]:
    """What the compiler counted, against v5p's peak and HBM bandwidth: ``compute_s`` (FLOPs at peak), ``memory_s``
    (the cost analysis' bytes at the bandwidth) and ``optimal_s`` (the compiler's time for the same counted program)."""
    chip, nbytes = CHIPS["v5p"], row.get("bytes_accessed_per_chip")
    return {"compute_s": row["flops_per_chip"] / chip.peak_flops, "optimal_s": row["optimal_seconds"],
            "memory_s": None if nbytes is None else nbytes / chip.hbm_bytes_per_s}


def kernel_cost(name: str, share: float) -> dict[str, float] | None:
    """The HR kernels' part of what the compiler counts in a FlexAttention row: one hierarchical layer's kernels for
    the chip's samples (the forward twice under full remat, dq, dK/dV) by their own cost estimates
    (:func:`flexattn_jax.kernels.hr_attention.cost_estimates` at the row's share, over all M keys or the ``train_hr_budget``
    slots), with ``seconds`` at their roofline (each kernel at max(FLOPs / peak, bytes / bandwidth) on v5p). ``None``
    for LLaVA-1.5."""
    if name.startswith("check-llava"):
        return None
    cfg = row_config(name, share)
    t, chip = cfg.text, CHIPS["v5p"]
    pad = lambda n: -(-n // HRK.BLOCK) * HRK.BLOCK
    keys = cfg.train_hr_tokens or cfg.num_hr_tokens
    est = HRK.cost_estimates(BATCH, t.num_heads, t.num_heads // t.num_kv_heads, pad(ROWS), pad(keys), t.head_dim, 2, share=share)
    calls = (est["fwd"], est["fwd"], est["dq"], est["dkv"])
    return {"keys": keys, "flops": float(sum(c.flops for c in calls)), "bytes": float(sum(c.bytes_accessed for c in calls)),
            "seconds": sum(max(c.flops / chip.peak_flops, c.bytes_accessed / chip.hbm_bytes_per_s) for c in calls)}


def split_estimate(row: dict[str, Any], full: bool = True) -> tuple[float, float]:
    """``(step seconds, MFU)`` of a row with its HR kernels kept out of the scaling: the counted program minus one
    hierarchical layer's kernels (:func:`kernel_cost`) is the XLA part, scaled by its model FLOPs (the model's, less
    the select rows' HR attention) / counted FLOPs as :func:`aot.step_estimate` scales; the kernels add their roofline
    seconds once per hierarchical layer. Unlike the plain scaling, skipped blocks then shorten the step. ``full``: at
    the full depth (32 layers), else at the row's cut. LLaVA-1.5 rows: the plain scaling."""
    cfg = row_config(row["row"], row["share"])
    cfg = aot.program_config(cfg, program="train", attention_impl=row_impl(row["row"]), layers=None if full else row["layers"])
    chips, peak = 32, CHIPS["v5p"].peak_flops
    model = F.train_flops(cfg, BATCH * chips, SEQ, ROWS) / chips
    kc = kernel_cost(row["row"], row["share"])
    if kc is None:
        step = aot.step_estimate(row["optimal_seconds"], row["flops_per_chip"], model, peak)[0]
        return step, F.mfu(model, step, 1, peak)
    keys = cfg.hr_budget_tokens if cfg.train_hr_tokens is None else min(cfg.hr_budget_tokens, cfg.train_hr_tokens)
    layers = F.hierarchical_layers(cfg)
    attention = 3 * BATCH * layers * F.hr_attention_flops(cfg, ROWS, keys)
    xla_flops, xla_s = row["flops_per_chip"] - kc["flops"], row["optimal_seconds"] - kc["seconds"]
    step = layers * kc["seconds"] + xla_s * max(1.0, (model - attention) / xla_flops)
    return step, F.mfu(model, step, 1, peak)


def matmul_check(target: str = TARGET, batch: int = BATCH, seq: int = SEQ, d: int = 4096, f: int = 11008) -> dict[str, Any]:
    """One decoder matmul as the train step shards it (``x (B, T, d)`` over fsdp, ``w (d, f)`` fsdp-sharded fp32 master
    cast to bf16) compiled for ``target``, forward and ``d/dw``: the compiler's FLOPs per chip against ``2 B T d f``
    per chip (the gradient: twice that), and its ``while`` loops. On a large fsdp axis the compiler makes the all-gather
    and matmul a loop (a collective matmul) whose body cost analysis counts once."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    tgt = aot.parse_target(target)
    mesh = aot.target_mesh_for(tgt, f"fsdp={tgt.chips}")
    x = jax.ShapeDtypeStruct((batch * tgt.chips, seq, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((d, f), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    loss = lambda w, x: jnp.sum(jnp.square((x @ w.astype(jnp.bfloat16)).astype(jnp.float32)))
    out = {"target": tgt.name, "batch_per_chip": batch, "seq": seq, "d": d, "f": f, "model_flops_per_chip": 2.0 * batch * seq * d * f}
    for name, fn in (("forward", loss), ("grad_w", jax.grad(loss))):
        compiled = jax.jit(fn).lower(w, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = {"flops_per_chip": float(cost["flops"]), "while_loops": aot.count_loops(compiled.as_text()),
                     "optimal_seconds": float(cost["optimal_seconds"]) if cost.get("optimal_seconds", 0) > 0 else None}
    return out


def check(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Scanned vs unrolled, per model with both rows present, at the cut's depth: the scanned cut's estimate scaled by
    the cut's model / counted FLOPs (``aot.step_estimate``, the table's scaling) against the unrolled cut's estimate
    scaled alike (``seconds_diff``: scanned / unrolled - 1; the unrolled program still holds the compiler's own
    collective-matmul loops, :func:`matmul_check`, so its FLOPs fall short of the model's too) and against its raw
    ``optimal_seconds`` (``raw_seconds_diff``); the same with :func:`split_estimate` (``split_diff``)."""
    rows = {r["row"]: r for r in res["rows"]}
    out = []
    for model in CHECK_LAYERS:
        scan, unr = rows.get(f"check-{model}-scanned"), rows.get(f"check-{model}-unrolled")
        if scan is None or unr is None:
            continue
        if scan["share"] != unr["share"] or scan["layers"] != unr["layers"]:
            raise SystemExit(f"check-{model}: the scanned and unrolled rows differ in share or layers ({scan['share']}/{unr['share']}, "
                             f"{scan['layers']}/{unr['layers']}); compile both with the same --share")
        split_scan, split_unr = split_estimate(scan, full=False)[0], split_estimate(unr, full=False)[0]
        out.append({"model": model, "layers": scan["layers"], "share": scan["share"], "model_flops_per_chip": scan["model_flops_per_chip"],
                    "scanned_flops_per_chip": scan["flops_per_chip"], "unrolled_flops_per_chip": unr["flops_per_chip"],
                    "scanned_optimal_seconds": scan["optimal_seconds"], "scaled_seconds": scan["step_seconds_estimate"],
                    "unrolled_seconds": unr["optimal_seconds"], "unrolled_scaled_seconds": unr["step_seconds_estimate"],
                    "unrolled_while_loops": unr.get("while_loops"), "scanned_while_loops": scan.get("while_loops"),
                    "seconds_diff": scan["step_seconds_estimate"] / unr["step_seconds_estimate"] - 1,
                    "raw_seconds_diff": scan["step_seconds_estimate"] / unr["optimal_seconds"] - 1,
                    "flops_diff": unr["flops_per_chip"] / scan["model_flops_per_chip"] - 1,
                    "split_scanned_seconds": split_scan, "split_unrolled_seconds": split_unr, "split_diff": split_scan / split_unr - 1})
    return out


def fit_reference(fit_json: Path) -> dict[str, Any]:
    """FlexAttention-7B (XLA HR path) and LLaVA-1.5-7B at 19 per chip on v5p-64 from ``docs/fit.json``, their step
    re-derived from the stored compiler figures with today's model FLOPs."""
    fit = json.loads(fit_json.read_text())
    flex = next(e["largest"] for e in fit["train"] if e["model"] == MODEL and e["target"] == TARGET)
    plain = next(c["llava"] for c in fit["same_batch"] if c["target"] == TARGET)
    out = {}
    for key, row, model in (("flex_xla", flex, MODEL), ("llava", plain, PLAIN)):
        assert row["per_device_batch"] == BATCH, row["per_device_batch"]
        cfg = aot.program_config(aot.load_model_config(model), program="train")
        mflops = F.train_flops(cfg, row["global_batch"], SEQ, ROWS) / row["chips"]
        step, mfu = aot.step_estimate(row["optimal_seconds"], row["flops_per_chip"], mflops, CHIPS["v5p"].peak_flops)
        out[key] = {"model_flops_per_chip": mflops, "step_seconds": step, "mfu": mfu, "optimal_seconds": row["optimal_seconds"]}
    return out


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals table from the rows present: ``[{goal, value, target, met, row}]``."""
    ref, rows = res["reference"], {r["row"]: r for r in res["rows"] if r["row"] not in SHARED}  # (share rows: one per share)
    llava = ref["llava"]
    per_sample = lambda flops: flops * 32 / (BATCH * 32)  # per chip -> per sample (19 per chip)
    out = [{"goal": "step / LLaVA-1.5 (XLA HR path, fit.json)", "value": ref["flex_xla"]["step_seconds"] / llava["step_seconds"],
            "target": GOALS["step_ratio"], "row": "fit.json"},
           {"goal": "MFU (XLA HR path, fit.json)", "value": ref["flex_xla"]["mfu"], "target": GOALS["mfu"], "row": "fit.json", "ge": True}]
    for r in res["rows"]:
        name = r["row"]
        if name in ("splash_hr", "splash_hr-share", "check-flex-scanned", "selected-0.25"):
            step, mfu = split_estimate(r)
            out += [{"goal": f"step / LLaVA-1.5 ({name}, share {r['share']:.3f}, kernels apart)", "value": step / llava["step_seconds"],
                     "target": GOALS["selected_step_ratio" if name == "selected-0.25" else "step_ratio"], "row": name, "split": True}]
            if name != "selected-0.25":
                out.append({"goal": f"MFU ({name}, share {r['share']:.3f}, kernels apart)", "value": mfu, "target": GOALS["mfu"],
                            "row": name, "ge": True, "split": True})
        if name in ("splash_hr", "splash_hr-share", "check-flex-scanned"):
            out += [{"goal": f"step / LLaVA-1.5 ({name}, share {r['share']:.3f})", "value": r["full_step_seconds"] / llava["step_seconds"],
                     "target": GOALS["step_ratio"], "row": name},
                    {"goal": f"MFU ({name}, share {r['share']:.3f})", "value": r["full_mfu"], "target": GOALS["mfu"], "row": name,
                     "ge": True}]
    sel = row_config("selected-0.25")
    sel_flops = F.train_flops(aot.program_config(sel, program="train"), 1, SEQ, ROWS)
    out.append({"goal": "model FLOPs / LLaVA-1.5, selected-only at 25%", "target": GOALS["selected_flops_ratio"], "row": "flops",
                "value": sel_flops / per_sample(llava["model_flops_per_chip"])})
    if "selected-0.25" in rows:
        r = rows["selected-0.25"]
        out.append({"goal": "step / LLaVA-1.5, selected-only at 25%", "value": r["full_step_seconds"] / llava["step_seconds"],
                    "target": GOALS["selected_step_ratio"], "row": "selected-0.25"})
    for g in out:
        g["met"] = g["value"] >= g["target"] if g.pop("ge", False) else g["value"] <= g["target"]
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{'row':<21}{'share':>7}{'layers':>7}{'optimal s':>11}{'compiler TF':>13}{'compute s':>11}{'memory s':>10}"
             f"{'kernel s':>10}{'step s (32 L)':>15}{'MFU':>7}{'split s':>9}{'MFU':>7}{'peak GiB':>10}"]
    for r in res["rows"]:
        roof = roofline(r)
        mem = "-" if roof["memory_s"] is None else f"{roof['memory_s']:.4f}"
        kern = kernel_cost(r["row"], r["share"])
        kern = "-" if kern is None else f"{kern['seconds']:.4f}"
        split = split_estimate(r)
        lines.append(f"{r['row']:<21}{r['share']:>7.3f}{r['layers']:>7}{r['optimal_seconds']:>11.4f}{r['flops_per_chip'] / 1e12:>13.1f}"
                     f"{roof['compute_s']:>11.4f}{mem:>10}{kern:>10}{r['full_step_seconds']:>15.3f}{r['full_mfu']:>7.1%}"
                     f"{split[0]:>9.3f}{split[1]:>7.1%}{r['per_chip_bytes']['peak'] / 2**30:>10.1f}")
    ref = res["reference"]
    lines.append(f"fit.json: FlexAttention-7B (XLA HR) {ref['flex_xla']['step_seconds']:.3f} s, MFU {ref['flex_xla']['mfu']:.1%}; "
                 f"LLaVA-1.5-7B {ref['llava']['step_seconds']:.3f} s, MFU {ref['llava']['mfu']:.1%}")
    for r in res["rows"]:
        if r.get("cycles"):
            top = list(by_function(r["cycles"]).items())[:12]
            lines.append(f"{r['row']} @ {r['share']:.3f}, the compiler's cycles by file: "
                         + ", ".join(f"{k} {v:.1%}" for k, v in by_file(r["cycles"]).items()))
            lines.append(f"{r['row']} @ {r['share']:.3f}, the compiler's cycles by source: " + ", ".join(f"{k} {v:.1%}" for k, v in top))
    if "matmul_check" in res:
        mm = res["matmul_check"]
        lines.append(f"matmul check ({mm['target']}, {mm['batch_per_chip']} x {mm['seq']} x {mm['d']} @ {mm['d']} x {mm['f']} per chip): "
                     + "; ".join(f"{k} counted {mm[k]['flops_per_chip'] / 1e12:.2f} TF of {mm['model_flops_per_chip'] * m / 1e12:.2f}, "
                                 f"{mm[k]['while_loops']} while loop(s)" for k, m in (("forward", 1), ("grad_w", 2))))
    for c in check(res):
        lines.append(f"check {c['model']} ({c['layers']} layers, share {c['share']:.3f}): scaled {c['scaled_seconds']:.4f} s scanned vs "
                     f"{c['unrolled_scaled_seconds']:.4f} s unrolled ({c['seconds_diff']:+.1%}; raw unrolled "
                     f"{c['unrolled_seconds']:.4f} s, {c['raw_seconds_diff']:+.1%}); kernels apart {c['split_scanned_seconds']:.4f} vs "
                     f"{c['split_unrolled_seconds']:.4f} s "
                     f"({c['split_diff']:+.1%}); counted TF {c['scanned_flops_per_chip'] / 1e12:.1f} scanned, "
                     f"{c['unrolled_flops_per_chip'] / 1e12:.1f} unrolled, model {c['model_flops_per_chip'] / 1e12:.1f}")
    for g in goals(res):
        lines.append(f"  {g['goal']:<66} {g['value']:>7.3f} (goal {'>=' if 'MFU' in g['goal'] else '<='} {g['target']}) "
                     f"{'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hr_goals", description=__doc__.split("\n\n")[0])
    p.add_argument("--row", choices=ROW_NAMES, help="compile this row and add it to --out")
    p.add_argument("--share", type=float, default=1.0,
                   help=f"{', '.join(SHARED)}: the active block share of the kernel's cost estimate")
    p.add_argument("--out", default="docs/hr_goals.json", help="the rows' JSON (read, and written after a --row compile)")
    p.add_argument("--matmul-check", action="store_true", help="compile one fsdp-sharded decoder matmul (matmul_check) into --out")
    p.add_argument("--fit", default="docs/fit.json", help="bench/fit.py's JSON: the LLaVA-1.5 and XLA-path reference rows")
    a = p.parse_args(argv)
    if not 0 < a.share <= 1:
        p.error(f"--share {a.share}: an active block share in (0, 1]")
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {"target": TARGET, "batch_per_chip": BATCH, "layers": LAYERS, "rows": []}
    res["reference"] = fit_reference(Path(a.fit))
    if a.matmul_check:
        mm = matmul_check()
        res = json.loads(out.read_text()) if out.is_file() else res
        res["reference"], res["matmul_check"] = fit_reference(Path(a.fit)), mm
        out.write_text(json.dumps(res, indent=1) + "\n")
    if a.row:
        row = compile_row(a.row, a.share)
        res = json.loads(out.read_text()) if out.is_file() else res  # rows other compiles added meanwhile
        res["reference"] = fit_reference(Path(a.fit))
        res["rows"] = [r for r in res["rows"] if (r["row"], r["share"]) != (row["row"], row["share"])] + [row]
        out.write_text(json.dumps(res, indent=1) + "\n")
    key = lambda r: f"{r['row']}@{r['share']}"
    print(json.dumps({**res, "check": check(res), "kernel_cost": {key(r): kernel_cost(r["row"], r["share"]) for r in res["rows"]},
                      "roofline": {key(r): roofline(r) for r in res["rows"]}}))
    print(format_table(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
