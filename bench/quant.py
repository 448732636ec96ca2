"""``python -m bench.quant``: weight-only int8 / int4 against the unquantised model, and the 7B's weight memory.

Error: a tiny random llava-hf model (4 layers, hidden 256, fan-in init; tests/torch_models.py) converted, then
quantised by :func:`flexattn_jax.quant.quantize_params`: the logits' relative error ``||l_q - l|| / ||l||`` and the
share of positions whose greedy (argmax) token is unchanged, on 16 random prompts of 24 tokens. Memory: the bytes of
FlexAttention-7B's parameters (``ModelConfig()`` with FlexAttention on, bf16) as stored, from the abstract tree.
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


def memory_rows() -> list[dict]:
    from flexattn_jax import quant as Q
    from flexattn_jax.config import FlexConfig, ModelConfig
    from flexattn_jax.params import abstract_params

    cfg = ModelConfig(flex=FlexConfig(enabled=True), dtype="bfloat16", param_dtype="bfloat16")
    abstract = abstract_params(cfg)
    bf16 = Q.nbytes(abstract)
    rows = [{"weights": "bf16", "gib": bf16 / 2**30, "fraction_of_bf16": 1.0}]
    for mode in Q.MODES:
        n = Q.nbytes(Q.quantized_abstract(abstract, mode))
        rows.append({"weights": mode, "gib": n / 2**30, "fraction_of_bf16": n / bf16})
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
        print(f"{'weights':8} {'GiB (7B)':>9} {'x bf16':>7}")
        for r in out["memory_7b"]:
            print(f"{r['weights']:8} {r['gib']:9.2f} {r['fraction_of_bf16']:7.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
