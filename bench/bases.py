"""What each base's FlexAttention costs in its HR side path, from the configs alone: ``python -m bench.bases [--json FILE]``.

Per preset of :data:`flexattn_jax.presets.HF_CONFIGS` with FlexAttention: parameters, LR image tokens G, HR tokens M,
the width of one HR key or value (Hkv x d: grouped-query attention shrinks it), the hierarchical layers, the HR
projections' parameters (``k_proj_hd`` + ``v_proj_hd``, all layers) and the bytes of every HR key and value of one
image in bf16 (what ``hr_strategy='cache'`` holds per sample), each also as a ratio to LLaVA-FlexAttn-7B (Vicuna).
Nothing runs on a device: shapes only (``abstract_params``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from flexattn_jax import presets
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import abstract_params, count_params

REFERENCE = "llava-flexattn-7b"
BF16 = 2


def hr_side(cfg: ModelConfig) -> dict[str, Any]:
    """The HR side path's sizes of a FlexAttention config (the docstring's columns)."""
    t = cfg.text
    kv_width = t.num_kv_heads * t.head_dim
    layers = t.num_layers - cfg.flex.first_select_layer - 1  # the hierarchical layers
    return {
        "decoder": t.model_type, "tower": cfg.vision.model_type, "params": count_params(abstract_params(cfg)),
        "lr_tokens": cfg.num_image_tokens, "hr_tokens": cfg.num_hr_tokens, "image_px": cfg.image_size,
        "heads": t.num_heads, "kv_heads": t.num_kv_heads, "kv_width": kv_width, "hier_layers": layers,
        "hr_proj_params": 2 * t.num_layers * (t.hidden_size + (1 if t.attention_bias else 0)) * kv_width,  # + Qwen2's biases
        "hr_kv_bytes_per_image": cfg.num_hr_tokens * layers * 2 * kv_width * BF16,
    }


def rows() -> list[dict[str, Any]]:
    """One row per FlexAttention preset, with ratios to the Vicuna-7B one."""
    out = []
    for name in presets.HF_CONFIGS:
        cfg = presets.preset(name)
        if cfg.flex.enabled:
            out.append({"model": name, **hr_side(cfg)})
    ref = next(r for r in out if r["model"] == REFERENCE)
    for r in out:
        r["hr_kv_vs_7b"] = r["hr_kv_bytes_per_image"] / ref["hr_kv_bytes_per_image"]
        r["hr_proj_vs_7b"] = r["hr_proj_params"] / ref["hr_proj_params"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bases", description=__doc__)
    p.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    a = p.parse_args(argv)
    table = rows()
    print(json.dumps(table))
    print(f"{'model':26} {'decoder':8} {'tower':7} {'G':>4} {'M':>5} {'H/Hkv':>6} {'Hkv*d':>6} {'HR proj':>8} {'HR K/V':>9} {'vs 7B':>6}")
    for r in table:
        print(f"{r['model']:26} {r['decoder']:8} {r['tower']:7} {r['lr_tokens']:4d} {r['hr_tokens']:5d} "
              f"{r['heads']:>3}/{r['kv_heads']:<2} {r['kv_width']:6d} {r['hr_proj_params'] / 1e6:7.0f}M "
              f"{r['hr_kv_bytes_per_image'] / 2**20:7.0f}MiB {r['hr_kv_vs_7b']:6.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
