"""Throughput accounting and metric sinks (stdout, JSONL, TensorBoard).

A step's model FLOPs are :func:`flexattn_jax.flops.train_flops` (the project's one FLOP model, the same one
``flexattn-jax compile`` reports) and the device's peak is :func:`flexattn_jax.chips.device_peak_tflops`;
both are re-exported here for the training loop.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from flexattn_jax.chips import device_peak_tflops  # noqa: F401  (the training loop reads both from here)
from flexattn_jax.flops import train_flops  # noqa: F401


class MetricsLogger:
    """Writes step metrics to stdout (every ``log_every`` steps), ``metrics.jsonl`` and TensorBoard.

    ``start_step`` is the step the run starts after (the restored checkpoint's, 0 for a fresh run):
    records of later steps already in ``metrics.jsonl`` (from a run killed after that checkpoint) are
    moved to ``metrics.superseded.jsonl``, and TensorBoard purges them, so that each step is logged once.
    """

    def __init__(self, out_dir: str | Path | None, *, log_every: int = 1, tensorboard: bool = True,
                 stream: TextIO | None = None, enabled: bool = True, start_step: int = 0):
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.written = False  # whether this logger wrote a record
        if out_dir is not None and enabled:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(out / "metrics.jsonl", start_step)
            self.jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any], write: Any = None) -> None:
        """Record one step; ``write`` (e.g. ``tqdm.write``) replaces ``print`` for the stdout line."""
        if not self.enabled:
            return
        step = int(record["step"])
        self.written = True
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record, default=_num) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, val in record.items():
                if k != "step" and isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
                    self.tb.add_scalar(f"train/{k}", val, step)
        if step % self.log_every == 0 or record.get("final"):
            line = format_record(record)
            if write is not None:
                write(line)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= ``step`` in ``path``; move the others (and unparsable lines, e.g. one cut
    by a kill) to ``metrics.superseded.jsonl`` beside it. Returns how many lines moved. Atomic (replace)."""
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line)
    if not drop:
        return 0
    with open(path.with_name("metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(x + "\n" for x in drop)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)
    return len(drop)


def format_record(r: dict[str, Any]) -> str:
    """One human line: ``step 12 | loss 1.2345 | lr 2.0e-05 | gnorm 0.81 | 1234 tok/s | 12.3 TFLOP/s/dev | MFU 4.1%``."""
    parts = [f"step {r['step']}"]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    if r.get("tokens_per_s") is not None:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("tflops_per_s_per_device") is not None:
        parts.append(f"{r['tflops_per_s_per_device']:.3g} TFLOP/s/dev")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.2f}%")
    if r.get("step_time_s") is not None:
        parts.append(f"{r['step_time_s']:.3f} s")
    if r.get("compiled"):
        parts.append("(incl. compile)")
    return " | ".join(parts)


def _num(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)
