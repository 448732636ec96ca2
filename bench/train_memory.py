"""Train-step memory per device at the shapes users train, from XLA's ``compiled.memory_analysis()``.

LLaVA-FlexAttn 7B (1008 px: M = 5184 HR tokens), sequence 2048, R = 2048 select rows (the recipe's
``max_select_rows`` default), bf16 compute with fp32 master weights, full remat, layers scanned,
sharded ``fsdp=8`` over 8 (virtual CPU) devices; the whole train step (forward, backward, AdamW
update of projector + LLM) compiled from abstract shapes, nothing allocated. Per device batch 1 and
4, for each ``attention_impl`` asked (``xla``: dense (B, H, T, S) and (B, H, R, M) logits; ``xla_chunked``: key
blocks) and HR budgets K = M and K = 0.1 M.

``--layers N`` compiles an N-layer decoder instead (faster; arguments then hold N layers' parameters).
The scanned layers reuse one body's temporaries, so the temp column hardly depends on the layer count.

Run it with 8 virtual devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
python -m bench.train_memory``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax

from bench.common import default_config, with_layers
from flexattn_jax import sharding as S
from flexattn_jax.config import ModelConfig
from train.config import TrainConfig
from train.step import make_example_batch, make_step

GiB = 2**30
H100_GIB = 80


def train_config(base: ModelConfig | None = None, layers: int | None = None) -> ModelConfig:
    """The 7B FlexAttention model as trained: bf16 compute, fp32 masters, full remat, scanned layers."""
    cfg = base or default_config()
    if layers is not None:
        cfg = with_layers(cfg, text_layers=layers)
    return dataclasses.replace(cfg, dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True)


def step_memory(cfg: ModelConfig, per_device_batch: int, seq_len: int, rows: int, mesh_spec: str = "fsdp=8") -> dict:
    """Per-device bytes of the compiled train step: arguments, outputs, temporaries, peak (args + temp + out - aliased)."""
    mesh = S.make_mesh(mesh_spec)
    fns = make_step(cfg, TrainConfig(), mesh, total_steps=1000)
    n = mesh.devices.size
    host = make_example_batch(cfg, per_device_batch * n, seq_len, rows)
    batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=fns.batch_sharding(x.shape)) for k, x in host.items()}
    t0 = time.perf_counter()
    compiled = fns.step.lower(fns.abstract_state, batch).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak),
            "compile_seconds": time.perf_counter() - t0, "devices": n}


def memory_table(impls=("xla", "xla_chunked"), budgets=(None, 0.1), batches=(1, 4), seq_len: int = 2048, rows: int = 2048,
                 layers: int | None = None, base: ModelConfig | None = None, progress: bool = True) -> list[dict]:
    """One entry per (impl, budget, per-device batch)."""
    out = []
    for budget in budgets:
        for impl in impls:
            cfg = train_config(base, layers)
            cfg = dataclasses.replace(cfg, attention_impl=impl, flex=dataclasses.replace(cfg.flex, hr_budget=budget))
            for b in batches:
                e = {"attention_impl": impl, "budget": "M" if budget is None else f"{budget}M", "hr_budget_tokens": cfg.hr_budget_tokens,
                     "per_device_batch": b, "seq_len": seq_len, "rows": rows, "layers": cfg.text.num_layers,
                     **step_memory(cfg, b, seq_len, rows)}
                out.append(e)
                if progress:
                    temp, peak = e["temp_bytes"] / GiB, e["peak_bytes"] / GiB
                    print(f"  {impl:12s} K={e['budget']:5s} b{b}: temp {temp:.2f} GiB, peak {peak:.2f} GiB "
                          f"({e['compile_seconds']:.0f} s compile)", file=sys.stderr, flush=True)
    return out


def attention_memory(cfg: ModelConfig | None = None, impls=("xla", "xla_chunked"), batch: int = 1, seq_len: int = 2048,
                     rows: int = 2048) -> list[dict]:
    """Temp bytes of one layer's main attention, forward + backward, at the decoder's shapes (bf16), per impl.

    What the layer computes: ``xla``: the dense pass that gives every row's output and LSE; otherwise
    the kernel for all rows plus the select rows' recompute with a differentiable LSE
    (:func:`flexattn_jax.attention.rows_attention_with_lse`, by key blocks).
    """
    from flexattn_jax import attention as A

    t_cfg = (cfg or default_config()).text
    sds = jax.ShapeDtypeStruct
    q = sds((batch, seq_len, t_cfg.num_heads, t_cfg.head_dim), jax.numpy.bfloat16)
    kv = sds((batch, seq_len, t_cfg.num_kv_heads, t_cfg.head_dim), jax.numpy.bfloat16)
    mask = A.CausalPadding(sds((batch, seq_len), bool), sds((), jax.numpy.int32), 0)
    sel = sds((batch, rows), jax.numpy.int32)
    out = []
    for impl in impls:

        def loss(q, k, v, mask, sel, impl=impl):
            q_sel = jax.vmap(lambda a, i: a[i])(q, sel)
            if impl == "xla":
                o, lse = A.attention_with_lse(q, k, v, mask.dense(seq_len))
                lse_sel = jax.vmap(lambda a, i: a[i])(lse, sel)
            else:
                o = A.attention(q, k, v, mask, impl=impl)
                _, lse_sel = A.rows_attention_with_lse(q_sel, k, v, mask, sel, chunked=True)
            return jnp_sum(o) + lse_sel.sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask, sel).compile()
        out.append({"attention_impl": impl, "batch": batch, "seq_len": seq_len, "rows": rows, "heads": t_cfg.num_heads,
                    "head_dim": t_cfg.head_dim, "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)})
    return out


def jnp_sum(x):
    return x.astype(jax.numpy.float32).sum()


def format_table(entries: list[dict]) -> str:
    """Markdown: per device GiB (arguments = params + optimizer state + batch shard; temp; peak) and the H100 fit."""
    lines = ["| attention_impl | K | per-device batch | layers | args GiB | temp GiB | peak GiB | fits 80 GB |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for e in entries:
        fits = "yes" if e["peak_bytes"] <= H100_GIB * 1e9 else "no"
        lines.append(f"| {e['attention_impl']} | {e['budget']} ({e['hr_budget_tokens']}) | {e['per_device_batch']} | {e['layers']} | "
                     f"{e['argument_bytes'] / GiB:.2f} | {e['temp_bytes'] / GiB:.2f} | {e['peak_bytes'] / GiB:.2f} | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train-step memory per device at 7B shapes, fsdp=8 (XLA memory analysis, abstract shapes)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--impl", nargs="+", default=["xla", "xla_chunked"])
    ap.add_argument("--budget", nargs="+", default=["M", "0.1"], help="HR budgets: M (all) or fractions")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="per-device batch sizes")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=2048, help="select rows R per sample")
    ap.add_argument("--layers", type=int, default=None, help="compile fewer decoder layers (faster)")
    ap.add_argument("--attention-only", action="store_true", help="only one layer's attention temporaries (seconds)")
    args = ap.parse_args(argv)
    if args.attention_only:
        att = [e for b in args.batch for e in attention_memory(batch=b, seq_len=args.seq_len, rows=args.rows)]
        if args.json:
            print(json.dumps({"attention_memory_7b": att}))
        else:
            for e in att:
                print(f"| {e['attention_impl']} | {e['batch']} | {e['seq_len']} | {e['rows']} | {e['temp_bytes'] / GiB:.3f} |")
        return 0
    if len(jax.devices()) < 8:
        print(f"error: needs 8 devices, found {len(jax.devices())}; set XLA_FLAGS=--xla_force_host_platform_device_count=8",
              file=sys.stderr)
        return 2
    budgets = tuple(None if b == "M" else float(b) for b in args.budget)
    entries = memory_table(tuple(args.impl), budgets, tuple(args.batch), args.seq_len, args.rows, args.layers)
    print(json.dumps({"train_memory_7b": entries}) if args.json else format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
