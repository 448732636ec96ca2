"""PyTorch comparisons at the scaled config, fp32, same weights, same thread count.

* ``forward``: transformers' own ``LlavaForConditionalGeneration`` forward (its default SDPA
  attention, ``torch.inference_mode``) against our jitted ``model.forward`` with FlexAttention off,
  on the same weights (the torch model is saved and read back by the project's converter, as in
  the tests), the same prompts and pixels; all-row logits both sides. Goal: ours >= 2x faster.
* ``oracle``: the tests' torch oracle of the release (``tests/oracle.py``: eager, batch items one
  at a time, dense N x (N+M), HR K/V re-projected for all M at every step) generating greedily
  for one sample at a time, against our jitted batched ``generate`` at batch 8, FlexAttention with
  K = M (the release's computation), each HR strategy; samples/s. Goal: ours >= 5x. The tokens
  are compared too (same weights, fp32: they should agree).

Threads: ``torch.set_num_threads`` is set to the core count, which is what XLA's CPU client uses
(one intra-op thread per core); or, with ``--threads 1`` (a process of its own: XLA's threads are
fixed when its CPU client starts), both single-threaded, which is far less sensitive to other
processes on a shared machine. Timings are interleaved (torch, ours, torch, ...) and medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from bench.common import hr_strategies, make_inputs, scaled_config, variant
from flexattn_jax import generate as G
from flexattn_jax.config import ModelConfig
from flexattn_jax.model import forward

ROOT = Path(__file__).resolve().parents[1]
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class TorchMissing(RuntimeError):
    """torch / transformers (or the repository's tests/ helpers) are not importable."""


def _torch_modules() -> SimpleNamespace:
    """torch, transformers and the tests' torch helpers (oracle, tiny-model init, converter glue)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise TorchMissing(
            f"the PyTorch comparisons need torch and transformers ({e}); install them with "
            "`pip install torch==2.13.0 && pip install -e '.[test]'`, or run without them (`flexattn-jax bench --quick`, "
            "or the full form with --skip-torch)"
        ) from e
    try:
        import tests.oracle  # noqa: F401
    except ImportError:
        if not (ROOT / "tests" / "oracle.py").exists():
            raise TorchMissing(f"the PyTorch comparisons need the repository's tests/ helpers ({ROOT / 'tests'})") from None
        sys.path.insert(0, str(ROOT))
    from tests import jax_models, oracle, torch_models

    return SimpleNamespace(torch=torch, transformers=transformers, oracle=oracle, torch_models=torch_models, jax_models=jax_models)


def torch_llava(cfg: ModelConfig, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A random fp32 transformers ``LlavaForConditionalGeneration`` with ``cfg``'s shapes (fan-in scaled
    weights as in the tests, so attention maps and selections are not uniform)."""
    from convert.export import hf_config

    t = _torch_modules()
    plain = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, enabled=False))
    d = {k: v for k, v in hf_config(plain, "hf5").items() if k != "architectures"}
    t.torch.manual_seed(seed)
    model = t.transformers.LlavaForConditionalGeneration(t.transformers.LlavaConfig(**d))
    t.torch_models._reinit(model, seed)
    model.set_attn_implementation(attn_implementation)
    return model.float().eval()


def set_threads(threads: int | None = None) -> dict:
    """torch's intra-op threads = the core count (XLA's CPU default); returns what each uses."""
    t = _torch_modules()
    n = threads or os.cpu_count() or 1
    t.torch.set_num_threads(n)
    return {"torch_threads": t.torch.get_num_threads(), "xla_threads": os.cpu_count(), "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _to_torch(t: SimpleNamespace, ids, mask, pixels):
    px = np.asarray(pixels, np.float32)
    px = px.transpose(0, 3, 1, 2) if px.ndim == 4 else px.transpose(0, 1, 4, 2, 3)
    return (t.torch.from_numpy(np.asarray(ids).astype(np.int64)), t.torch.from_numpy(np.asarray(mask).astype(np.int64)),
            t.torch.from_numpy(np.ascontiguousarray(px)))


def forward_comparison(config: ModelConfig | None = None, batches: tuple[int, ...] = (1, 8), prompt_len: int = 16,
                       repeats: int = 5, threads: int | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Per batch: median seconds of transformers' forward and of our jitted forward (flex off), the speedup."""
    t = _torch_modules()
    info = set_threads(threads)
    base = config or scaled_config()
    model = torch_llava(base, seed)
    params, cfg = t.jax_models.convert_torch_model(model)
    cfg = dataclasses.replace(cfg, scan_layers=True)
    v = variant(base, "lr")
    ours = jax.jit(lambda p, ids, px, m: forward(p, cfg, ids, px, m).logits)
    out = []
    for batch in batches:
        ids, mask, pixels = make_inputs(v, batch, prompt_len, seed)
        tids, tmask, tpix = _to_torch(t, ids, mask, pixels)
        compiled = ours.lower(params, ids, pixels, mask).compile()

        def run_torch(tids=tids, tmask=tmask, tpix=tpix):
            with t.torch.inference_mode():
                return model(input_ids=tids, pixel_values=tpix, attention_mask=tmask).logits

        def run_ours(compiled=compiled, ids=ids, pixels=pixels, mask=mask):
            return jax.block_until_ready(compiled(params, ids, pixels, mask))

        ref, got = run_torch().numpy(), np.asarray(run_ours())  # warm-up, and the parity check
        tt, tj = [], []
        for _ in tqdm(range(repeats), desc=f"torch forward vs ours (batch {batch})", disable=not progress, file=sys.stderr):
            t0 = time.perf_counter()
            run_torch()
            t1 = time.perf_counter()
            run_ours()
            tt.append(t1 - t0)
            tj.append(time.perf_counter() - t1)
        out.append({
            "batch": batch, "sequence_length": int(ids.shape[1]), "torch_seconds": statistics.median(tt),
            "jax_seconds": statistics.median(tj), "speedup": statistics.median(tt) / statistics.median(tj),
            "max_abs_logit_diff_over_scale": float(np.abs(ref - got).max() / np.abs(ref).max()),
            "torch_attn_implementation": model.config._attn_implementation, "repeats": repeats, **info,
        })
    return out


def oracle_comparison(config: ModelConfig | None = None, answer_tokens: tuple[int, ...] = (1, 16), batch: int = 8,
                      prompt_len: int = 16, repeats: int = 3, strategies: tuple[str, ...] | None = None,
                      configs: tuple[str, ...] = ("flex-M", "flex-0.1M"), threads: int | None = None, seed: int = 0,
                      progress: bool = True) -> list[dict]:
    """Per (answer length, configuration, HR strategy): the oracle's samples/s (batch 1, eager) and ours
    (jitted, ``batch``). ``flex-M`` is the release's computation (its tokens must match the oracle's);
    ``flex-0.1M`` adds our static budget (K = 0.1 M: other tokens where the release selects more)."""
    t = _torch_modules()
    info = set_threads(threads)
    base = config or scaled_config()
    model = torch_llava(base, seed)
    hd = t.torch_models.make_hd_weights(model, seed + 1)
    f = base.flex
    oc = t.oracle.OracleFlexConfig(lowres_size=f.lowres_size, highres_size=f.highres_size, zoom_ratio=f.zoom_ratio,
                                   threshold=f.threshold, first_select_layer=f.first_select_layer, pool_size=f.pool_size)
    params, plain = t.jax_models.convert_torch_model(model)
    params, cfg = t.jax_models.with_flex(params, plain, hd, oc)
    cfg = dataclasses.replace(cfg, scan_layers=True)
    vs = [variant(cfg, name, s) for name in configs for s in strategies or hr_strategies()]
    ids, mask, pixels = make_inputs(vs[0], batch, prompt_len, seed)  # the inputs do not depend on the strategy
    tids, _, tpix = _to_torch(t, ids, mask, pixels)
    side = pixels.shape[1]
    out = []
    for n_new in answer_tokens:

        def run_oracle(i, n=n_new):
            return t.oracle.oracle_generate(model, hd, oc, tids[i:i + 1], tpix[i:i + 1], [(side, side)], n)["tokens"]

        def run_ours(v, n=n_new):
            return jax.block_until_ready(G.generate(params, v.cfg, ids, pixels, mask, max_new_tokens=n, hr_strategy=v.strategy).tokens)

        tokens = [np.asarray(run_ours(v)) for v in vs]  # compile + warm-up
        run_oracle(0)
        to, tj, match = [], [[] for _ in vs], [[] for _ in vs]
        for r in tqdm(range(repeats), desc=f"oracle vs ours ({n_new} tokens)", disable=not progress, file=sys.stderr):
            i = r % batch  # the oracle answers one sample at a time: a different one each round
            t0 = time.perf_counter()
            ref = run_oracle(i)
            to.append(time.perf_counter() - t0)
            for k, v in enumerate(vs):
                t1 = time.perf_counter()
                run_ours(v)
                tj[k].append(time.perf_counter() - t1)
                match[k].append(list(tokens[k][i, : len(ref)]) == ref)
        sps_o = 1 / statistics.median(to)
        for k, v in enumerate(vs):
            sps_j = batch / statistics.median(tj[k])
            out.append({
                "config": v.label, "exact": v.cfg.hr_budget_tokens == v.cfg.num_hr_tokens, "answer_tokens": n_new,
                "oracle_batch": 1, "batch": batch,
                "oracle_seconds_per_sample": statistics.median(to), "jax_seconds_per_batch": statistics.median(tj[k]),
                "oracle_samples_per_s": sps_o, "jax_samples_per_s": sps_j, "throughput_ratio": sps_j / sps_o,
                "tokens_match": float(np.mean(match[k])), "repeats": repeats, **info,
            })
    return out


def format_tables(fwd: list[dict], orc: list[dict]) -> str:
    """Markdown tables of both comparisons (tokens match: the share of timed samples whose greedy tokens equal the oracle's)."""
    lines = ["| forward, flex off | threads | batch | T | torch s | ours s | speedup | max logit diff / scale |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in fwd:
        lines.append(f"| transformers ({e['torch_attn_implementation']}) vs jitted | {e['torch_threads']} | {e['batch']} | "
                     f"{e['sequence_length']} | "
                     f"{e['torch_seconds']:.3f} | {e['jax_seconds']:.3f} | {e['speedup']:.2f}x | "
                     f"{e['max_abs_logit_diff_over_scale']:.1e} |")
    lines += ["", "| generation | threads | tokens | oracle samples/s (batch 1) | ours samples/s (batch) | ratio | tokens match |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for e in orc:
        lines.append(f"| {e['config']} | {e['torch_threads']} | {e['answer_tokens']} | {e['oracle_samples_per_s']:.2f} | "
                     f"{e['jax_samples_per_s']:.2f} ({e['batch']}) | {e['throughput_ratio']:.1f}x | {e['tokens_match']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="transformers forward and the release oracle vs our jitted paths (scaled config, fp32)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="1: torch and XLA single-threaded (default: all cores for both)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads == 1:  # before the first JAX computation creates the CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    kw = dict(threads=args.threads, progress=not args.no_progress)
    try:
        fwd = forward_comparison(repeats=args.repeats, **kw)
        orc = oracle_comparison(repeats=max(2, args.repeats - 2), **kw)
    except TorchMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"torch_forward": fwd, "torch_oracle": orc}) if args.json else format_tables(fwd, orc))
    return 0


def in_subprocess(threads: int, repeats: int = 5, progress: bool = True) -> dict:
    """Both comparisons in a child process with ``--threads`` (XLA's thread count is fixed per process)."""
    cmd = [sys.executable, "-m", "bench.torch_compare", "--json", "--threads", str(threads), "--repeats", str(repeats)]
    if not progress:
        cmd.append("--no-progress")
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    sys.exit(main())
