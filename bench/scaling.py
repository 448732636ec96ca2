"""Scaling with the image size: time and FLOPs of one prefill as the HR view grows, and a plot.

As in the paper, the LR view stays fixed and the HR view grows: zoom z = 1, 2, 3, 4 tiles per side,
which at 7B shapes (336 px CLIP) are 336, 672, 1008 and 1344 px images with M = 576 z^2 HR tokens.
At the scaled config (168 px CLIP) the same zooms are 168 ... 672 px. ``flex-0.1M`` (one
strategy, default 'project': the cheapest prefill) and ``xattn`` keep the sequence at N tokens and
grow linearly in M (the vision tower on 1 + z^2 views, K or M HR projections, N x M attention);
``hd-seq`` puts all M tokens in the sequence and grows quadratically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import jax

from bench.common import default_config, scaled_config, variant, zoomed
from bench.flops import prefill_flops
from bench.walltime import compile_program, count_flops, time_programs
from flexattn_jax.app.visualize import save_figure
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import init_params

ZOOMS = (1, 2, 3, 4)
SCALING_CONFIGS = ("flex-0.1M", "xattn", "hd-seq")


def scaling_table(config: ModelConfig | None = None, zooms: tuple[int, ...] = ZOOMS, configs: tuple[str, ...] = SCALING_CONFIGS,
                  strategy: str = "project", batch: int = 1, prompt_len: int = 16, repeats: int = 3, flops_7b: bool = True,
                  seed: int = 0, progress: bool = True) -> list[dict]:
    """One entry per (configuration, zoom): median prefill seconds and FLOPs at the scaled config,
    and (``flops_7b``) the prefill FLOPs at 7B shapes with a 60-token prompt."""
    base = dataclasses.replace(config or scaled_config(), scan_layers=True)
    params = init_params(base, jax.random.key(seed))
    vs = [variant(zoomed(base, z), name, strategy if name.startswith("flex") else None) for z in zooms for name in configs]
    progs = [compile_program(v, params, batch, prompt_len, 1, seed, with_step=False) for v in vs]
    times = time_programs(progs, 0, repeats, progress)
    big = default_config()
    entries = []
    for v, ts in zip(vs, times, strict=True):
        e = {
            "config": v.label, "zoom": v.zoom, "image_px": v.zoom * base.flex.lowres_size, "image_px_7b": v.zoom * big.flex.lowres_size,
            "hr_tokens": v.zoom**2 * base.num_image_tokens, "batch": batch, "seconds": statistics.median(t[0] for t in ts),
            "flops": count_flops(v, batch, prompt_len, 1)[0] / batch,
        }
        if flops_7b:
            e["flops_7b"] = prefill_flops(variant(zoomed(big, v.zoom), v.name, v.strategy), 60, 1)
        entries.append(e)
    return entries


def plot(entries: list[dict], path: str | Path) -> Path:
    """PNG: prefill wall time (scaled config) and FLOPs (scaled, and 7B shapes if present) against the image side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_7b = any("flops_7b" in e for e in entries)
    panels = [("seconds", "prefill wall time, scaled config (s)"), ("flops", "prefill GFLOPs, scaled config")]
    if has_7b:
        panels.append(("flops_7b", "prefill TFLOPs, 7B shapes"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    names = list(dict.fromkeys(e["config"] for e in entries))
    for ax, (key, title) in zip(axes, panels, strict=True):
        scale = {"seconds": 1.0, "flops": 1e-9, "flops_7b": 1e-12}[key]
        for name in names:
            es = sorted((e for e in entries if e["config"] == name and key in e), key=lambda e: e["zoom"])
            ax.plot([e["image_px_7b"] for e in es], [e[key] * scale for e in es], marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("image side at 7B shapes (px)")
        ax.set_xticks(sorted({e["image_px_7b"] for e in entries}))
        ax.grid(alpha=0.3)
    axes[0].legend()
    g = entries[0]["hr_tokens"] // entries[0]["zoom"] ** 2
    fig.suptitle(f"One prefill as the HR view grows (LR view fixed): M = 576 z^2 HR tokens at 7B, {g} z^2 at the scaled config",
                 fontsize=10)
    return save_figure(fig, path, dpi=110, make_parents=True)


def format_table(entries: list[dict]) -> str:
    """Markdown: per zoom and configuration, seconds and FLOPs, and the growth relative to zoom 1."""
    first = {e["config"]: e for e in entries if e["zoom"] == min(x["zoom"] for x in entries)}
    lines = ["| config | zoom | px (7B / scaled) | HR tokens (scaled) | seconds | x zoom 1 | GFLOPs | x zoom 1 | TFLOPs 7B |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(entries, key=lambda e: (e["config"], e["zoom"])):
        f0 = first[e["config"]]
        t7 = f"{e['flops_7b'] / 1e12:.2f}" if "flops_7b" in e else "-"
        lines.append(f"| {e['config']} | {e['zoom']} | {e['image_px_7b']} / {e['image_px']} | {e['hr_tokens']} | {e['seconds']:.3f} | "
                     f"{e['seconds'] / f0['seconds']:.1f} | {e['flops'] / 1e9:.1f} | {e['flops'] / f0['flops']:.1f} | {t7} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prefill time and FLOPs as the image grows (scaled config), and a plot")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="docs/scaling.png")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    entries = scaling_table(repeats=args.repeats)
    plot(entries, args.out)
    print(json.dumps({"scaling": entries}) if args.json else format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
