"""Batch inference throughput and host memory of the streaming pipeline.

Model: the scaled config of :mod:`bench.walltime` (:func:`bench.common.scaled_config`, fp32, layers
unrolled) at budget ``flex-0.1M`` (the release's setting), HR strategy ``project``, random weights
from the model's initialisers, except that a few token embeddings and ``lm_head`` columns are set so
that greedy decoding follows a fixed chain to EOS: a prompt ending in the k-th marker token answers
k tokens, EOS included (k = 1, 2, 3 in turn). VQA-like answers, at the real per-token cost of the
scaled model (the values are synthetic; the FLOPs, shapes and memory are the model's).

Items: JPEG files (640 x 480, decoded and resized to 504 px per item), each a formatted prompt.

The path measured: :func:`flexattn_jax.app.inference.stream_answers` (lazy requests, thread-pool
preprocessing, windowed buckets, the ``while_loop`` that stops when every row has its EOS). (The
baseline path it was compared with once is described in docs/benchmarks.md, not kept as code.)

Each run is a fresh process (sharing a persistent compile cache): it warms up on 8 items (compiling,
or loading the cached program), then the timed run is steady state (compile time reported apart).
Peak RSS is the process's VmHWM over the timed run (reset before it via ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from bench.common import scaled_config
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.inference import Request, stream_answers
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import init_params
from flexattn_jax.preprocess import format_prompt

MARKERS = ("x", "y", "z")  # a prompt ending in MARKERS[k - 1] answers k tokens
CHAIN_BASE = 4000  # ids of the intermediate chain tokens (never produced by the tokenizer)


def bench_config() -> ModelConfig:
    cfg = scaled_config()
    return dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=0.1))


def marker_ids(tokenizer) -> list[int]:
    """The last token id of a prompt ending in each marker."""
    ids = [tokenizer.encode(format_prompt("q") + " " + m, add_special_tokens=False)[-1] for m in MARKERS]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"markers {MARKERS} do not end in distinct tokens: {ids}")
    return ids


def eos_chain_params(cfg: ModelConfig, tokenizer, seed: int = 0, scale: float = 30.0, logit: float = 20.0) -> dict:
    """Random parameters where marker ``k`` is followed by ``k - 1`` chain tokens and EOS under greedy decoding.

    The chain tokens' embeddings are scaled up (``scale`` x a unit-RMS vector ``g``) so the residual
    stream at their position is dominated by them; the ``lm_head`` column of each token's successor
    has ``logit * g / D`` added (nearly orthogonal directions: EOS follows three tokens), so the successor's
    logit is about ``logit`` against O(1) for the others.
    """
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed)))
    d = cfg.text.hidden_size
    rng = np.random.default_rng(seed)
    emb = np.array(params["text"]["embed"]["embedding"])
    head = np.array(params["text"]["lm_head"]["kernel"])
    nxt = {}
    for k, m in enumerate(marker_ids(tokenizer), 1):
        chain = [m, *(CHAIN_BASE + 10 * k + j for j in range(k - 1)), cfg.eos_token_id]
        nxt.update(zip(chain[:-1], chain[1:], strict=True))
    head[:, sorted(set(nxt.values()))] = 0.0  # a successor (EOS) may follow several tokens: the sum of their directions
    for tok, succ in nxt.items():
        g = rng.normal(size=d).astype(np.float32)
        g /= np.sqrt(np.mean(g**2))
        emb[tok] = scale * g
        head[:, succ] += logit * g / d
    params["text"]["embed"]["embedding"] = emb
    params["text"]["lm_head"]["kernel"] = head
    return jax.tree.map(jnp.asarray, params)


def make_images(directory: Path, n: int = 8, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[Path]:
    """``n`` JPEG photos-to-be: noise plus a few filled shapes (decode + resize cost like real images)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        w, h = size[0] // 10, size[1] // 12
        for _ in range(5):
            x, y = int(rng.integers(0, size[0] - w)), int(rng.integers(0, size[1] - h))
            draw.rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        paths.append(directory / f"img{i}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def requests(n: int, images: Sequence[Path]) -> Iterator[Request]:
    """``n`` formatted prompts over the images, ending in markers 1, 2, 3, 1, ... (answers of 1-3 tokens)."""
    for i in range(n):
        text = format_prompt(f"what is shown in region {i % 7}?") + " " + MARKERS[i % 3]
        yield Request(str(images[i % len(images)]), text, formatted=True)


# ---- measurement --------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (less sensitive than wall time to other processes' load)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_one(params, cfg, tokenizer, images, n: int, max_new_tokens: int, batch_size: int) -> dict:
    """One timed run: items/s, tokens, decode steps, peak RSS over the run and the RSS before it."""
    reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    stats: dict = {}
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    answers = {i: a.tokens for i, a in stream_answers(params, cfg, tokenizer, requests(n, images), batch_size=batch_size,
                                                      max_new_tokens=max_new_tokens, progress=False, stats=stats)}
    tokens = [answers[i] for i in range(n)]
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    want = [(i % 3) + 1 for i in range(n)]
    correct = sum(len(t) == k and t[-1] == cfg.eos_token_id for t, k in zip(tokens, want, strict=True))
    return dict(path="new", items=n, max_new_tokens=max_new_tokens, batch=batch_size, seconds=seconds,
                items_per_s=n / seconds, cpu_s=cpu, items_per_cpu_s=n / max(cpu, 1e-9),
                steady_items_per_s=stats.get("steady_items_per_s"), compile_s=stats.get("compile_s", 0.0),
                tokens=sum(len(t) for t in tokens), decode_steps=stats.get("decode_steps"), answers_as_designed=correct,
                peak_rss_mb=_status_kb("VmHWM") / 1024, rss_before_mb=rss0 / 1024,
                batch_latency_p50_s=stats.get("batch_latency_p50_s"), first_answer_s=stats.get("first_answer_s"))


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) process: a warm-up of ``warm_items`` (compiles, or loads from the cache), then the run."""
    from flexattn_jax.app.compile_cache import enable_compile_cache

    enable_compile_cache(spec["cache"])
    cfg = bench_config()
    tokenizer = build_demo_tokenizer()
    params = eos_chain_params(cfg, tokenizer)
    images = sorted(Path(spec["images"]).glob("*.jpg"))
    warm = run_one(params, cfg, tokenizer, images, spec["warm_items"], spec["max_new_tokens"], spec["batch"])
    entry = run_one(params, cfg, tokenizer, images, spec["items"], spec["max_new_tokens"], spec["batch"])
    entry.update(warm_s=warm["seconds"], warm_compile_s=warm["compile_s"])
    return entry


def throughput_table(sizes: Sequence[int], new_tokens: Sequence[int], batch_size: int = 8, warm_items: int = 8,
                     progress: bool = True) -> dict:
    """Every (max_new_tokens, N) in a fresh process (so peak RSS is that run's alone), sharing a compile cache."""
    entries = []
    with tempfile.TemporaryDirectory() as d:
        make_images(Path(d))
        for mnt in new_tokens:
            for path in ("new",):
                for n in sizes:
                    spec = dict(path=path, items=n, max_new_tokens=mnt, batch=batch_size, warm_items=warm_items,
                                images=d, cache=str(Path(d) / "jax-cache"))
                    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--child", json.dumps(spec)],
                                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                    if proc.returncode != 0:
                        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
                    e = json.loads(proc.stdout.strip().splitlines()[-1])
                    entries.append(e)
                    if progress:
                        print(f"  {path} N={n} max_new_tokens={mnt}: {e['items_per_s']:.2f} items/s, "
                              f"peak RSS {e['peak_rss_mb']:.0f} MB (before {e['rss_before_mb']:.0f})", file=sys.stderr, flush=True)
    return dict(config=f"scaled config (bench.common.scaled_config), flex-0.1M/project, fp32, batch {batch_size}",
                entries=entries, goals=goals(entries))


def _entry(entries, path, n, mnt):
    return next((e for e in entries if e["path"] == path and e["items"] == n and e["max_new_tokens"] == mnt), None)


def goals(entries: list[dict]) -> list[dict]:
    """The goals (flat memory in N, long answers cost little), each with the figures it is judged on (missing runs: not judged)."""
    out = []
    new = [e for e in entries if e["path"] == "new"]
    ns = sorted({e["items"] for e in new})
    mnts = sorted({e["max_new_tokens"] for e in new})
    if len(ns) >= 2:
        for mnt in mnts:
            a, b = _entry(entries, "new", ns[0], mnt), _entry(entries, "new", ns[-1], mnt)
            if a and b:
                r = b["peak_rss_mb"] / a["peak_rss_mb"]
                out.append(dict(goal=f"peak RSS flat in N (N={ns[-1]} / N={ns[0]}, max_new_tokens {mnt}) <= 1.10", value=r, met=r <= 1.10))
    if len(mnts) >= 2:
        both = [n for n in ns if _entry(entries, "new", n, mnts[0]) and _entry(entries, "new", n, mnts[-1])]
        if both:
            n = both[-1]
            lo, hi = _entry(entries, "new", n, mnts[0]), _entry(entries, "new", n, mnts[-1])
            r = lo["items_per_s"] / hi["items_per_s"]
            out.append(dict(goal=f"items/s at max_new_tokens {mnts[0]} / {mnts[-1]} (N={n}) <= 1.3", value=r, met=r <= 1.3))
    return out


def format_table(results: dict) -> str:
    rows = ["| path | N | max_new_tokens | items/s | items per CPU s | tokens | decode steps | batch latency p50 s | peak RSS MB |"
            " RSS before MB | run's growth MB | answers as designed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(results["entries"], key=lambda e: (e["max_new_tokens"], e["items"], e["path"])):
        lat = e["batch_latency_p50_s"]
        ipc = e.get("items_per_cpu_s")
        rows.append(f"| {e['path']} | {e['items']} | {e['max_new_tokens']} | {e['items_per_s']:.2f} | "
                    f"{'-' if ipc is None else f'{ipc:.3f}'} | {e['tokens']} | "
                    f"{e['decode_steps'] if e['decode_steps'] is not None else '-'} | {'-' if lat is None else f'{lat:.2f}'} | "
                    f"{e['peak_rss_mb']:.0f} | {e['rss_before_mb']:.0f} | {e['peak_rss_mb'] - e['rss_before_mb']:.0f} | "
                    f"{e['answers_as_designed']}/{e['items']} |")
    first = {}
    for e in results["entries"]:
        first.setdefault((e["path"], e["max_new_tokens"]), e)
    rows += ["", "Warm-up before each timed run (8 items; the first run of each row compiled, the others loaded the "
             "persistent cache): " + ", ".join(f"{p} max_new_tokens {m}: {e['warm_s']:.1f} s (compile {e['warm_compile_s']:.1f} s)"
                                               for (p, m), e in first.items())]
    rows += ["", "| goal | value | met |", "|---|---:|---|"]
    rows += [f"| {g['goal']} | {g['value']:.2f} | {'yes' if g['met'] else '**no**'} |" for g in results["goals"]]
    return f"Throughput at the {results['config']}:\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexattn-jax bench throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 16 and 64")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="N values (default 128 1024)")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[8, 64, 128])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one measurement (JSON spec), in a fresh process
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON", help="print the table of saved results (merged; runs nothing)")
    args = ap.parse_args(argv)
    if args.report:
        saved = []
        for p in args.report:
            try:
                saved.append(json.loads(p.read_text()))
                if not isinstance(saved[-1], dict) or not isinstance(saved[-1].get("entries"), list):
                    raise ValueError("not a throughput result (no 'entries' list)")
            except OSError as e:
                print(f"error: --report {p}: cannot read it ({e.strerror or e})", file=sys.stderr)
                return 2
            except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                print(f"error: --report {p}: {e}", file=sys.stderr)
                return 2
        results = dict(saved[0], entries=[e for r in saved for e in r["entries"]])
        results["goals"] = goals(results["entries"])
        print(json.dumps(results) if args.json else format_table(results))
        return 0
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    sizes = args.sizes or ([16, 64] if args.quick else [128, 1024])
    results = throughput_table(sizes, args.max_new_tokens, batch_size=args.batch_size)
    results["command"] = " ".join(["flexattn-jax bench throughput", *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
