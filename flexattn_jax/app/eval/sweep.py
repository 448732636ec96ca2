"""Accuracy against cost: one task at several HR budgets, a table and a plot of accuracy vs TFLOPs per item."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexattn_jax.app.visualize import save_figure


def parse_budgets(text: str) -> list[str]:
    """``"0.05,0.1,0.25,all"`` -> the budget values in order (each as ``--hr-budget`` takes it)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--sweep-budget {text!r}: give comma-separated budgets, e.g. 0.05,0.1,0.25,all")
    if len(set(values)) != len(values):
        raise ValueError(f"--sweep-budget {text!r}: a budget is repeated")
    return values


def budget_dir(budget: str) -> str:
    """A folder name for one budget's run (``budget-0.05``, ``budget-all``)."""
    return "budget-" + re.sub(r"[^A-Za-z0-9._-]+", "_", budget)


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: budget, HR tokens per select row, accuracy, TFLOPs per item, wall time."""
    lines = [f"{'hr budget':>10} {'K tokens':>9} {'accuracy %':>11} {'TFLOPs/item':>12} {'wall s':>8}"]
    for r in rows:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
        tf = "-" if r.get("tflops_per_item") is None else f"{r['tflops_per_item']:.6g}"
        k = "-" if r.get("hr_budget_tokens") is None else str(r["hr_budget_tokens"])
        lines.append(f"{r['hr_budget']!s:>10} {k:>9} {acc:>11} {tf:>12} {r.get('wall_s', 0):>8.1f}")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """PNG of accuracy (y) against TFLOPs per item (x), each point labelled with its budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["tflops_per_item"], r["accuracy"], str(r["hr_budget"])) for r in rows
           if r.get("tflops_per_item") is not None and r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    if pts:
        xs, ys, labels = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, "o-", color="tab:blue")
        for x, y, label in zip(xs, ys, labels, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("TFLOPs per item (XLA cost analysis)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
