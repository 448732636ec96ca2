"""``python -m bench.quant``: weight-only int8 / int4 against the unquantised model, and the 7B's weight memory.

Error: a tiny random llava-hf model (4 layers, hidden 256, fan-in init; tests/torch_models.py) converted, then
quantised by :func:`flexattn_jax.quant.quantize_params`: the logits' relative error ``||l_q - l|| / ||l||`` and the
share of positions whose greedy (argmax) token is unchanged, on 16 random prompts of 24 tokens. Memory: the bytes of
FlexAttention-7B's parameters (``ModelConfig()`` with FlexAttention on, bf16) as stored, from the abstract tree, and
what bitsandbytes holds for the same NF4 model (:func:`bnb_nf4_bytes`).
Prints a table, then one JSON object (``--json``: the JSON only).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np


def error_rows() -> list[dict]:
    from flexattn_jax import quant as Q
    from flexattn_jax.model import forward
    from tests.jax_models import convert_torch_model
    from tests.torch_models import make_tiny_llava

    params, cfg = convert_torch_model(make_tiny_llava(layers=4, hidden_size=256, heads=4))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 126, (16, 24)))
    f = jax.jit(lambda p, i: forward(p, cfg, i).logits)
    ref = np.asarray(f(params, ids))
    rows = []
    for mode in Q.MODES:
        got = np.asarray(f(Q.quantize_params(params, mode), ids))
        rows.append({"mode": mode, "logits_rel_error": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                     "greedy_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "positions": int(ref.shape[0] * ref.shape[1])})
    return rows


def bnb_nf4_bytes(abstract) -> int:
    """Bytes bitsandbytes holds for ``abstract`` with the release's NF4 (``quantize_4bit``, blocksize 64, double
    quantisation) on the same decoder linears, one torch matrix a layer: the packed codes (n / 2), the 8-bit absmax
    (n / 64), an fp32 absmax per run of 256 blocks and an fp32 offset, and the QuantState's fp32 code maps (16 and 256
    entries); every other leaf as the abstract tree holds it (bf16)."""
    import math
    import re

    from flexattn_jax import quant as Q
    from flexattn_jax.params import flatten

    rx = re.compile(Q.QUANT_TARGETS)
    total = 0
    for name, a in flatten(abstract).items():
        if rx.search(name):
            *lead, d_in, d_out = a.shape
            n = d_in * d_out
            total += math.prod(lead) * (n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * (16 + 256))
        else:
            total += Q.nbytes({"x": a})
    return total


def memory_rows() -> list[dict]:
    from flexattn_jax import quant as Q
    from flexattn_jax.config import FlexConfig, ModelConfig
    from flexattn_jax.params import abstract_params

    cfg = ModelConfig(flex=FlexConfig(enabled=True), dtype="bfloat16", param_dtype="bfloat16")
    abstract = abstract_params(cfg)
    bf16 = Q.nbytes(abstract)
    rows = [{"weights": "bf16", "gib": bf16 / 2**30, "fraction_of_bf16": 1.0, "bytes": bf16}]
    for mode in Q.MODES:
        n = Q.nbytes(Q.quantized_abstract(abstract, mode))
        rows.append({"weights": mode, "gib": n / 2**30, "fraction_of_bf16": n / bf16, "bytes": n})
    n = bnb_nf4_bytes(abstract)
    rows.append({"weights": "nf4 bitsandbytes", "gib": n / 2**30, "fraction_of_bf16": n / bf16, "bytes": n})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args(argv)
    out = {"error": error_rows(), "memory_7b": memory_rows()}
    if not a.json:
        print(f"{'mode':6} {'logits rel err':>15} {'greedy agree':>13}")
        for r in out["error"]:
            print(f"{r['mode']:6} {r['logits_rel_error']:15.4f} {r['greedy_agreement']:13.3f}")
        print(f"{'weights':16} {'GiB (7B)':>9} {'x bf16':>7} {'bytes':>14}")
        for r in out["memory_7b"]:
            print(f"{r['weights']:16} {r['gib']:9.3f} {r['fraction_of_bf16']:7.3f} {r['bytes']:14d}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
