"""The HR kernel's goals from the TPU compiler: 7B on v5p-64, 19 samples per chip, T = R = 2048, 1008 px.

``python -m bench.hr_goals --row NAME [--out docs/hr_goals.json]`` compiles one row's train step with
:func:`flexattn_jax.app.aot.compile_program` (bf16 compute, fp32 masters + AdamW, frozen CLIP, full remat, fsdp
over the 32 chips) and ``--table`` prints the goals from the rows in ``--out``.

A full-depth 7B compile takes about 20 minutes on a small host, so the rows compile a decoder cut to
:data:`LAYERS` layers (8 plain, the select layer, one hierarchical layer: every layer kind) with the layers
scanned. XLA's cost analysis counts a loop body once, so the cut program counts the same loop bodies as the
full one; the step estimate is :func:`flexattn_jax.app.aot.step_estimate` with the **full-depth** model's FLOPs
(the counted part's rate, ``compiler FLOPs / optimal_seconds``, applied to the full model's FLOPs). The
``unrolled`` row compiles the same cut decoder with the layers (and CLIP's) unrolled, the check of that
scaling: there the compiler counts every layer.

Rows: ``splash_hr`` (the Pallas HR kernel, its cost estimate at every block: the upper bound), ``splash_hr-share``
(the cost estimate at ``--share``, the active block share measured by ``bench/hr_kernel.py``), ``selected-0.25``
(``flex.train_hr_budget=0.25`` with the packed path alone, ``train_hr_fallback=False``: what runs when the
unions fit), ``unrolled``. LLaVA-1.5-7B's step at the same batch and FlexAttention's XLA HR path are the
full-depth rows of ``docs/fit.json`` (``bench/fit.py``), their step re-derived with today's model FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from flexattn_jax import flops as F
from flexattn_jax.app import aot
from flexattn_jax.chips import CHIPS

TARGET, MODEL, PLAIN, BATCH, SEQ, ROWS = "v5p-64", "llava-flexattn-7b", "llava-1.5-7b", 19, 2048, 2048
LAYERS = 10  # 7B's first_select_layer is 8: layers 0-7 plain, 8 select, 9 hierarchical
ROW_NAMES = ("splash_hr", "splash_hr-share", "selected-0.25", "unrolled")
GOALS = {"step_ratio": 1.6, "mfu": 0.55, "selected_flops_ratio": 1.2, "selected_step_ratio": 1.3}


def row_config(name: str, share: float = 1.0):
    """The full-depth model config of a row (before :func:`aot.program_config` cuts and casts it)."""
    cfg = aot.load_model_config(MODEL)
    flex = cfg.flex
    if name == "splash_hr-share":
        flex = dataclasses.replace(flex, hr_kernel_block_share=share)
    elif name == "selected-0.25":
        flex = dataclasses.replace(flex, train_hr_budget=0.25, train_hr_fallback=False)
    elif name not in ROW_NAMES:
        raise SystemExit(f"--row {name!r}: use one of {ROW_NAMES}")
    return dataclasses.replace(cfg, flex=flex, scan_layers=name != "unrolled")


def full_depth(report: aot.CompileReport, cfg) -> dict[str, Any]:
    """The cut compile's figures and its step / MFU estimate at full depth (the full model's FLOPs)."""
    full = aot.program_config(cfg, program="train", attention_impl="splash_hr")
    model = F.train_flops(full, report.global_batch, SEQ, ROWS) / report.chips
    step, mfu = aot.step_estimate(report.optimal_seconds, report.flops_per_chip, model, CHIPS["v5p"].peak_flops)
    return {**{k: getattr(report, k) for k in ("layers", "per_chip_bytes", "fits", "kernels", "compile_seconds", "flops_per_chip",
                                               "model_flops_per_chip", "optimal_seconds", "step_seconds_estimate", "mfu_estimate")},
            "full_model_flops_per_chip": model, "full_step_seconds": step, "full_mfu": mfu}


def compile_row(name: str, share: float) -> dict[str, Any]:
    cfg = row_config(name, share)
    r = aot.compile_program(TARGET, cfg, "train", per_device_batch=BATCH, seq_len=SEQ, select_rows=ROWS,
                            attention_impl="splash_hr", remat="full", layers=LAYERS, model_name=MODEL)
    return {"row": name, "share": share if name == "splash_hr-share" else 1.0, **full_depth(r, cfg)}


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
    ref, rows = res["reference"], {r["row"]: r for r in res["rows"]}
    llava = ref["llava"]
    per_sample = lambda flops: flops * 32 / (BATCH * 32)  # per chip -> per sample (19 per chip)
    out = [{"goal": "step / LLaVA-1.5 (XLA HR path, fit.json)", "value": ref["flex_xla"]["step_seconds"] / llava["step_seconds"],
            "target": GOALS["step_ratio"], "row": "fit.json"},
           {"goal": "MFU (XLA HR path, fit.json)", "value": ref["flex_xla"]["mfu"], "target": GOALS["mfu"], "row": "fit.json", "ge": True}]
    for name in ("splash_hr", "splash_hr-share", "unrolled"):
        if name in rows:
            r = rows[name]
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
    lines = [f"{'row':<16}{'share':>7}{'layers':>7}{'optimal s':>11}{'compiler TF':>13}{'step s (32 L)':>15}{'MFU':>7}{'peak GiB':>10}"]
    for r in res["rows"]:
        lines.append(f"{r['row']:<16}{r['share']:>7.3f}{r['layers']:>7}{r['optimal_seconds']:>11.4f}{r['flops_per_chip'] / 1e12:>13.1f}"
                     f"{r['full_step_seconds']:>15.3f}{r['full_mfu']:>7.1%}{r['per_chip_bytes']['peak'] / 2**30:>10.1f}")
    ref = res["reference"]
    lines.append(f"fit.json: FlexAttention-7B (XLA HR) {ref['flex_xla']['step_seconds']:.3f} s, MFU {ref['flex_xla']['mfu']:.1%}; "
                 f"LLaVA-1.5-7B {ref['llava']['step_seconds']:.3f} s, MFU {ref['llava']['mfu']:.1%}")
    for g in goals(res):
        lines.append(f"  {g['goal']:<52} {g['value']:>7.3f} (goal {'>=' if 'MFU' in g['goal'] else '<='} {g['target']}) "
                     f"{'met' if g['met'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hr_goals", description=__doc__.split("\n\n")[0])
    p.add_argument("--row", choices=ROW_NAMES, help="compile this row and add it to --out")
    p.add_argument("--share", type=float, default=1.0, help="splash_hr-share: the active block share of the kernel's cost estimate")
    p.add_argument("--out", default="docs/hr_goals.json", help="the rows' JSON (read, and written after a --row compile)")
    p.add_argument("--fit", default="docs/fit.json", help="bench/fit.py's JSON: the LLaVA-1.5 and XLA-path reference rows")
    a = p.parse_args(argv)
    if not 0 < a.share <= 1:
        p.error(f"--share {a.share}: an active block share in (0, 1]")
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {"target": TARGET, "batch_per_chip": BATCH, "layers": LAYERS, "rows": []}
    res["reference"] = fit_reference(Path(a.fit))
    if a.row:
        row = compile_row(a.row, a.share)
        res = json.loads(out.read_text()) if out.is_file() else res  # rows other compiles added meanwhile
        res["reference"] = fit_reference(Path(a.fit))
        res["rows"] = [r for r in res["rows"] if r["row"] != a.row] + [row]
        out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    print(format_table(res), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
