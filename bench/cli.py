"""``flexattn-jax bench [--quick] [--json] [--out DIR]``: every benchmark, one process, side by side.

``flexattn-jax bench --accelerator [--smoke] ...`` runs :mod:`bench.accelerator` instead (the
machine's attention implementations at 7B shapes, and a train-step MFU).

Full form: FLOPs at 7B shapes (every configuration and HR strategy), wall time at the scaled
config (batch 1 and 8, workloads A and B), the PyTorch comparisons, scaling with the image size
(and its plot), peak memory at 7B shapes, the adaptive HR budget's cost against the selected
fraction (and its plot, :mod:`bench.adaptive`); then the targets of ``docs/benchmarks.md`` with the measured
figure and whether each is met. ``--quick`` (a few minutes on 2 cores): the 7B FLOP ratios of the
main configurations plus a reduced wall-time table (batch 1, xattn and flex-0.1M).

With ``--json`` one JSON object goes to stdout: ``entries`` (7B FLOPs and scaled wall time, each
with config, workload, batch, flops, seconds, flops_ratio, time_ratio and ``section``), the other
sections and ``goals``. Progress goes to stderr.

``flexattn-jax bench throughput [--quick]``: batch inference items/s and peak RSS, the streaming
pipeline (:mod:`bench.throughput`; a separate run, not part of the above).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def _machine(threads: int | None) -> dict:
    import jax

    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "threads": threads or os.cpu_count(), "load_average_start": os.getloadavg()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def _best(entries: list[dict], config: str, workload: str, key: str, batch: int | None = None) -> dict | None:
    es = [e for e in entries if e["config"].split("/")[0] == config and e["workload"] == workload
          and (batch is None or e.get("batch") == batch) and e.get(key) is not None]
    return min(es, key=lambda e: e[key]) if es else None


def goals(results: dict) -> list[dict]:
    """The targets of docs/benchmarks.md (and of the adaptive budget), each with the measured figure and whether it is met."""
    from bench.adaptive import NAME

    out = []
    f7, wt = results.get("flops_7b", []), results.get("walltime", [])

    def add(goal: str, entry: dict | None, key: str, limit: float, below: bool = True, where: str = "") -> None:
        if entry is None:
            return
        x = entry[key]
        out.append({"goal": goal, "measured": x, "met": bool(x <= limit if below else x >= limit),
                    "where": where or entry.get("config", "")})

    add("A: flex-0.1M <= 0.62x xattn FLOPs (7B shapes)", _best(f7, "flex-0.1M", "A", "flops_ratio"), "flops_ratio", 0.62)
    for b in sorted({e["batch"] for e in wt}):
        add(f"A: flex-0.1M <= 0.65x xattn wall time (scaled, batch {b})", _best(wt, "flex-0.1M", "A", "time_ratio", b), "time_ratio", 0.65)
    add("B: flex-0.1M <= 0.70x xattn FLOPs (7B shapes)", _best(f7, "flex-0.1M", "B", "flops_ratio"), "flops_ratio", 0.70)
    for b in sorted({e["batch"] for e in wt}):
        add(f"B: flex-0.1M <= 0.70x xattn wall time (scaled, batch {b})", _best(wt, "flex-0.1M", "B", "time_ratio", b), "time_ratio", 0.70)
    for e in results.get("torch_oracle", []):
        if not e.get("exact", True):
            continue  # a budget K < M computes something else than the release; reported, not a goal
        add(f"throughput >= 5x the release oracle ({e['answer_tokens']} tokens, batch {e['batch']} vs 1, {e['torch_threads']} threads)",
            e, "throughput_ratio", 5.0, below=False, where=e["config"])
    for e in results.get("torch_forward", []):
        add(f"forward >= 2x transformers (batch {e['batch']}, {e['torch_threads']} threads)", e, "speedup", 2.0, below=False,
            where="flex off")
    ad = results.get("adaptive")
    if ad:
        low = [e for e in ad["synthetic"]["project"] if e["fraction"] <= 0.25]
        worst = max(low, key=lambda e: e["A_ratio"])
        add("A: flex-adaptive (exact) <= 0.70x xattn FLOPs whenever the selection is <= 25% of M (7B)", worst, "A_ratio", 0.70,
            where=f"{NAME}/project, selection {worst['fraction']:.3f} of M")
        low = [e for e in ad["sweep"] if e["fraction"] <= 0.25]
        if low:
            worst = max(low, key=lambda e: e[f"{NAME}/project_time_ratio"])
            add("A: flex-adaptive (exact) <= 0.70x xattn wall time whenever the selection is <= 25% of M (scaled, batch 1)", worst,
                f"{NAME}/project_time_ratio", 0.70, where=f"{NAME}/project, selection {worst['fraction']:.3f} of M")
        same = {"same": float(all(e["same_tokens_as_flex_M"] for e in ad["sweep"]))}
        add("flex-adaptive answers = flex-M's at every selected fraction (scaled, 16 tokens)", same, "same", 1.0, below=False,
            where=f"{NAME}/project")
    sc = results.get("scaling", [])
    for name in dict.fromkeys(e["config"] for e in sc):
        es = sorted((e for e in sc if e["config"] == name), key=lambda e: e["zoom"])
        if len(es) < 3:
            continue
        e1, e2, e3 = es[-3:]
        quad = (e2["hr_tokens"] + e3["hr_tokens"]) / (e1["hr_tokens"] + e2["hr_tokens"])
        for key in ("flops_7b", "seconds"):
            if all(key in e for e in (e1, e2, e3)):
                r = marginal_ratio(*((e["hr_tokens"], e[key]) for e in (e1, e2, e3)))
                linear = name.split("/")[0] != "hd-seq"
                out.append({"goal": f"scaling: {name.split('/')[0]} {'linear' if linear else 'quadratic'} in M: {key} per added HR token, "
                                    f"zoom {e2['zoom']}->{e3['zoom']} over {e1['zoom']}->{e2['zoom']} (1 linear, {quad:.2f} quadratic)",
                            "measured": r, "met": bool(abs(r - 1) <= 0.15) if linear else bool(r >= quad - 0.15), "where": name})
    return out


def marginal_ratio(p1: tuple[float, float], p2: tuple[float, float], p3: tuple[float, float]) -> float:
    """Cost per added HR token from p2 to p3 over that from p1 to p2 (points (M, cost)): 1 when the cost
    is linear in M, (M2 + M3) / (M1 + M2) when it is quadratic."""
    return ((p3[1] - p2[1]) / (p3[0] - p2[0])) / ((p2[1] - p1[1]) / (p2[0] - p1[0]))


def format_goals(gs: list[dict]) -> str:
    lines = ["| goal | where | measured | met |", "|---|---|---:|---|"]
    for g in gs:
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['where']} | {g['measured']:.3f} | {met} |")
    return "\n".join(lines)


def run(quick: bool, out: Path | None, threads: int | None, skip_torch: bool, repeats: int | None, progress: bool = True,
        tiny: bool = False, command: str = "flexattn-jax bench") -> dict:
    """Every benchmark of the chosen form; returns the results (and writes them, and the plot, under ``out``).

    ``tiny``: the tests' tiny model in place of the 7B and scaled shapes (a smoke test of the command).
    """
    from bench import adaptive, flops, memory, scaling, walltime
    from bench.common import hr_strategies, smoke_config

    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    t0 = time.perf_counter()
    results: dict = {"command": command, "quick": quick, "machine": _machine(threads), "strategies": list(hr_strategies())}
    big = dict(config=smoke_config(), prompt_len=8, answer_tokens=4) if tiny else {}
    small = dict(config=smoke_config("float32"), prompt_len=8, answer_tokens=4) if tiny else {}
    small_np = {k: v for k, v in small.items() if k != "answer_tokens"}
    if not quick and not skip_torch:
        from bench.torch_compare import _torch_modules

        _torch_modules()  # fail early, with the message, if torch is missing
    log("== FLOPs at 7B shapes (XLA cost analysis, abstract shapes)")
    results["flops_7b"] = flops.flop_table(quick, log=log, **big)
    log("== wall time at the scaled config")
    if quick:
        results["walltime"] = walltime.walltime_table(configs=("flex-0.1M",), batches=(1,), repeats=repeats or 3, progress=progress,
                                                      **small)
    else:
        results["walltime"] = walltime.walltime_table(repeats=repeats or 5, progress=progress, **small)
    if not quick:
        if not skip_torch:
            from bench import torch_compare

            log("== PyTorch comparisons")
            results["torch_forward"] = torch_compare.forward_comparison(threads=threads, repeats=repeats or 5, progress=progress,
                                                                        **small_np)
            results["torch_oracle"] = torch_compare.oracle_comparison(threads=threads, repeats=max(2, (repeats or 5) - 2),
                                                                      progress=progress, **small_np)
            if threads != 1 and not tiny:  # and both single-threaded (a child process: XLA's threads are per process)
                log("== PyTorch comparisons, torch and XLA single-threaded (subprocess)")
                child = torch_compare.in_subprocess(1, repeats or 5, progress)
                results["torch_forward"] += child["torch_forward"]
                results["torch_oracle"] += child["torch_oracle"]
        log("== scaling with the image size")
        results["scaling"] = scaling.scaling_table(repeats=repeats or 5, progress=progress, flops_7b=not tiny, **small_np)
        log("== memory at 7B shapes")
        results["memory_7b"] = memory.memory_table(batches=(1, 8), progress=progress, **big)
        log("== the adaptive HR budget: cost against the selected fraction")
        tiny_ad = dict(config_7b=smoke_config(), config_scaled=smoke_config("float32"), prompt_len_7b=8, answer_tokens=4,
                       margins=(0, 1, 2), training_rows=4) if tiny else {}
        results["adaptive"] = adaptive.adaptive_table(repeats=repeats or 5, progress=progress, log=log, **tiny_ad)
    results["goals"] = goals(results)
    for e in results["flops_7b"]:
        e["section"] = "flops-7b"
    for e in results["walltime"]:
        e["section"] = "walltime-scaled"
    results["entries"] = results["flops_7b"] + results["walltime"]
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds_total"] = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if "scaling" in results:
            results["scaling_plot"] = str(scaling.plot(results["scaling"], out / "scaling.png"))
        if "adaptive" in results:
            results["adaptive_plot"] = str(adaptive.plot(results["adaptive"], out / "adaptive.png"))
        (out / ("bench-quick.json" if quick else "bench.json")).write_text(json.dumps(results, indent=1))
    return results


def format_report(results: dict) -> str:
    """Markdown tables of every section present."""
    from bench import flops, memory, scaling, walltime

    parts = [f"`{results['command']}` ({results['seconds_total']:.0f} s; {results['machine']['cpu_count']} cores, "
             f"load average {results['machine']['load_average_start'][0]:.1f} at the start)", "",
             "FLOPs per sample at 7B shapes (1008 px, 60-token prompt, 16 answer tokens for B):", "", "```",
             flops.format_table(results["flops_7b"]), "```", "",
             walltime.format_table(results["walltime"], "Wall time at the scaled config (median seconds of the batch; GFLOPs per "
                                   "sample; time/xattn: median of the per-round ratios):")]
    if "torch_forward" in results:
        from bench.torch_compare import format_tables

        parts += ["", format_tables(results["torch_forward"], results["torch_oracle"])]
    if "scaling" in results:
        parts += ["", scaling.format_table(results["scaling"])]
    parts += ["", memory.format_scaled(results["walltime"], "Prefill memory at the scaled config (fp32, the timed executables):")]
    if "memory_7b" in results:
        parts += ["", memory.format_table(results["memory_7b"], "Prefill memory at 7B shapes (fp32, XLA memory analysis):")]
    if "adaptive" in results:
        from bench.adaptive import format_table as adaptive_table

        parts += ["", "The adaptive HR budget (exact; cost against the selected fraction):", "", adaptive_table(results["adaptive"])]
    parts += ["", format_goals(results["goals"])]
    return "\n".join(parts)


class ReportError(ValueError):
    """A ``--report`` file that is missing, empty, not JSON or not a bench result."""


REPORT_KEYS = ("command", "seconds_total", "machine", "flops_7b", "walltime", "goals")


def read_report(path: Path) -> dict:
    """A saved bench.json, checked to be one; every failure names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"--report {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    if not text.strip():
        raise ReportError(f"--report {path}: the file is empty")
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"--report {path}: not valid JSON ({e})") from e
    if not isinstance(results, dict):
        raise ReportError(f"--report {path}: expected a JSON object, got {type(results).__name__}")
    missing = [k for k in REPORT_KEYS if k not in results]
    if missing:
        raise ReportError(f"--report {path}: not a bench result (missing {', '.join(missing)})")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "throughput":
        from bench import throughput

        return throughput.main(argv[1:])
    ap = argparse.ArgumentParser(prog="flexattn-jax bench", description="FLOP, wall-time, PyTorch, scaling and memory benchmarks "
                                 "(`flexattn-jax bench throughput --help`: batch inference throughput)")
    ap.add_argument("--quick", action="store_true", help="7B FLOP ratios of the main configurations + a reduced wall-time table")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--out", type=Path, default=None,
                    help="write bench.json (and scaling.png in the full form) here (default: docs/ for the full form, nothing for --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and XLA (default: all cores, XLA's default; 1 also makes XLA single-threaded)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5, quick 3)")
    ap.add_argument("--skip-torch", action="store_true", help="full form without the PyTorch comparisons")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved bench.json (runs nothing)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes everywhere
    ap.add_argument("--accelerator", action="store_true",
                    help="the accelerator benchmark instead (bench/accelerator.py: 7B wall times per attention_impl, train MFU; "
                         "its own options follow, e.g. --smoke)")
    if "--accelerator" in argv:
        from bench import accelerator

        return accelerator.main([a for a in argv if a != "--accelerator"])
    args = ap.parse_args(argv)
    if args.report is not None:
        try:
            results = read_report(args.report)
            text = json.dumps(results) if args.json else format_report(results)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (KeyError, TypeError, IndexError, ValueError) as e:  # a JSON object, but not what `bench` writes
            print(f"error: --report {args.report}: not a bench result ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(text)
        return 0
    from bench.torch_compare import SINGLE_THREAD_XLA, TorchMissing

    if args.threads == 1:  # before the first JAX computation creates the CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
    elif args.threads is not None and args.threads != os.cpu_count():
        print(f"note: XLA uses all {os.cpu_count()} cores; --threads {args.threads} sets torch's threads only", file=sys.stderr)
    out = args.out if args.out is not None else (None if args.quick else Path("docs"))

    try:
        results = run(args.quick, out, args.threads, args.skip_torch, args.repeats, progress=not args.no_progress, tiny=args.tiny,
                      command=" ".join(["flexattn-jax", "bench", *argv]))
    except TorchMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results) if args.json else format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
