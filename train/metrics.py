"""Throughput accounting (analytic FLOPs, MFU) and metric sinks (stdout, JSONL, TensorBoard).

FLOP model (matmul FLOPs, 2 per multiply-add; softmax, norms and activations ignored):

* decoder, per padded token: ``2 * L * (D*(2*H*d + 2*Hkv*d) + 3*D*F) + 2*D*V`` plus causal attention
  ``2 * L * T * H * d`` (QK^T and PV over on average T/2 keys);
* FlexAttention, per image sample and hierarchical layer: HR K/V projections ``4*M*D*Hkv*d`` and the
  select rows' HR attention ``4*R*K*H*d``;
* vision: per image, ``1 + zoom^2`` CLIP passes of ``P+1`` tokens through the used layers
  (``8*Dv^2 + 4*Dv*Fv`` per token and layer, plus ``4*(P+1)*Dv`` attention) and the projector;
* training = 3x forward (forward + backward) for the decoder, HR path and projector, 1x for the
  frozen vision tower (3x when it trains). Remat recomputation is not counted (model FLOPs, not
  hardware FLOPs), so MFU is the standard "model FLOPs utilisation".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import jax

from flexattn_jax.config import ModelConfig

# dense bf16 peak TFLOP/s per device (vendor numbers); CPU has none: pass --peak-tflops.
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA B200": 2250.0,
}


def device_peak_tflops(device: jax.Device | None = None) -> float | None:
    """Vendor dense bf16 peak of ``device`` (default the first), or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name) or name in kind:
            return peak
    return None


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, select_rows: int, images: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one batch by part: ``{'text', 'hr', 'vision', 'projector'}`` (see the module docstring)."""
    t, v = cfg.text, cfg.vision
    d_model, hd = t.hidden_size, t.head_dim
    q_dim, kv_dim = t.num_heads * hd, t.num_kv_heads * hd
    images = batch if images is None else images
    per_token = 2 * t.num_layers * (d_model * (2 * q_dim + 2 * kv_dim) + 3 * d_model * t.intermediate_size)
    per_token += 2 * d_model * t.vocab_size
    attn = 2 * t.num_layers * seq_len * q_dim  # causal: 4 * T/2 * H*d per token and layer
    text = batch * seq_len * (per_token + attn)
    hr = 0.0
    views = 1
    if cfg.flex.enabled:
        n_hier = max(0, t.num_layers - cfg.flex.first_select_layer - 1)
        m, k = cfg.num_hr_tokens, cfg.hr_budget_tokens
        hr = images * n_hier * (4 * m * d_model * kv_dim + 4 * select_rows * k * q_dim)
        views = 1 + cfg.zoom**2
    p1 = v.num_patches + 1
    per_vtok = 8 * v.hidden_size**2 + 4 * v.hidden_size * v.intermediate_size + 4 * p1 * v.hidden_size
    patch_embed = 2 * v.num_patches * v.patch_size**2 * v.num_channels * v.hidden_size
    vision = images * views * (p1 * cfg.vision_layers_used * per_vtok + patch_embed)
    proj = 2 * v.hidden_size * d_model + (2 * d_model * d_model if cfg.projector.type == "mlp2x_gelu" else 0)
    projector = images * views * v.num_patches * proj
    return {"text": float(text), "hr": float(hr), "vision": float(vision), "projector": float(projector)}


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, select_rows: int, vision_trains: bool = False,
                images: int | None = None) -> float:
    """Model FLOPs of one training step over ``batch`` samples (3x forward, frozen vision 1x)."""
    f = forward_flops(cfg, batch, seq_len, select_rows, images)
    return 3.0 * (f["text"] + f["hr"] + f["projector"]) + (3.0 if vision_trains else 1.0) * f["vision"]


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
