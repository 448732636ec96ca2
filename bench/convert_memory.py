"""Peak host memory of the converter on a synthetic llava-hf checkpoint of a chosen size.

Writes a random llava-hf (transformers 4.x names, sharded safetensors + index) checkpoint whose
widths are scaled so the fp32 total is about ``--size-gb``, converts it with ``python -m convert``
in a subprocess while polling its peak RSS (the child's ``/proc/self/status`` VmHWM, polled and
reported at exit), and prints one JSON line and a short table. A second subprocess that only
imports the converter gives the baseline RSS (Python + jax + orbax).

    python bench/convert_memory.py --size-gb 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.export import hf_config  # noqa: E402
from convert.mapping import BY_OURS, RULES, export_name, torch_shape  # noqa: E402
from flexattn_jax.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from flexattn_jax.params import abstract_params, flatten  # noqa: E402

SHARD_BYTES = 256 * 2**20


def shapes_of(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg)).items()}


def scaled_config(size_gb: float) -> ModelConfig:
    """A LLaVA-7B-shaped config (32 + 24 layers, vocab 32064) with widths scaled to about ``size_gb`` in fp32."""
    best = None
    for d in range(64, 8192 + 1, 64):
        dv = max(64, (d // 4) // 64 * 64)
        cfg = ModelConfig(
            vision=VisionConfig(hidden_size=dv, intermediate_size=4 * dv, num_layers=24, num_heads=dv // 64),
            text=TextConfig(hidden_size=d, intermediate_size=int(round(d * 2.6875 / 64)) * 64, num_heads=d // 64,
                            num_kv_heads=d // 64, head_dim=64),
        )
        n = sum(int(np.prod(s)) for s in shapes_of(cfg).values())
        if best is None or abs(4 * n - size_gb * 1e9) < abs(4 * best[1] - size_gb * 1e9):
            best = (cfg, n)
        if 4 * n > size_gb * 1e9:
            break
    return best[0]


def write_checkpoint(cfg: ModelConfig, directory: Path, seed: int = 0) -> tuple[int, int]:
    """Random fp32 tensors in llava-hf 4.x names, sharded; returns (bytes of weights, largest tensor bytes)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config(cfg, "hf4")))
    shapes = shapes_of(cfg)
    entries = []
    for rule in RULES:
        if rule.ours in shapes:
            shape = shapes[rule.ours]
            for idx in range(shape[0]) if rule.stacked else [None]:
                torch = torch_shape(BY_OURS[rule.ours].kind, shape[1:] if rule.stacked else shape)
                entries.append((export_name(rule, idx, "hf4", cfg), torch))
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size, total, largest = 0, 0, 0
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(directory / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}

    weight_map: dict[str, str] = {}
    for key, shape in entries:
        x = rng.standard_normal(shape, dtype=np.float32)
        if size and size + x.nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][key] = x
        size += x.nbytes
        total += x.nbytes
        largest = max(largest, x.nbytes)
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, largest


_REPORT = """
import sys
def _report():
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
    sys.stderr.write(f"\\nVMHWM_KB={hwm}\\n")
"""
MEASURE_MODULE = _REPORT + """
import runpy
mod, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
finally:
    _report()
"""
MEASURE_IMPORTS = _REPORT + """
import convert.importer, flexattn_jax.checkpoint, jax, orbax.checkpoint
jax.devices()
_report()
"""


def run_measured(code: str, args: list[str], poll: float = 0.02) -> tuple[int, float]:
    """Run ``python -c code *args``; returns (peak RSS bytes, seconds).

    The peak is the child's own VmHWM (reported at exit, and polled meanwhile), which counts only
    the memory after exec, unlike ``ru_maxrss`` (that also sees the parent's image at fork).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    peak_kb = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(poll)
    _, err = proc.communicate()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"python -c ... {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    reported = [int(line.split("=", 1)[1]) for line in err.splitlines() if line.startswith("VMHWM_KB=")]
    return max([peak_kb, *reported]) * 1024, secs


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="fp32 checkpoint size to synthesise (default 1)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="converter output dtype")
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="convert-mem-", dir=args.workdir))
    try:
        cfg = scaled_config(args.size_gb)
        src, out = work / "src", work / "out"
        ckpt_bytes, largest = write_checkpoint(cfg, src)
        base_rss, _ = run_measured(MEASURE_IMPORTS, [])
        peak, secs = run_measured(MEASURE_MODULE, ["convert", str(src), str(out), "--no-progress", "--dtype", args.dtype])
        out_bytes = dir_bytes(out / "params")
        n = sum(int(np.prod(s)) for s in shapes_of(cfg).values())
        result = {
            "size_gb_target": args.size_gb,
            "params": n,
            "checkpoint_bytes": ckpt_bytes,
            "largest_tensor_bytes": largest,
            "output_dtype": args.dtype,
            "output_bytes": out_bytes,
            "peak_rss_bytes": peak,
            "baseline_rss_bytes": base_rss,
            "peak_over_checkpoint": round(peak / ckpt_bytes, 3),
            "overhead_over_output": round((peak - base_rss) / max(out_bytes, 1), 3),
            "convert_seconds": round(secs, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    mib = 2**20
    rows = [
        ("checkpoint (fp32, safetensors)", f"{ckpt_bytes / mib:,.1f} MiB"),
        ("largest tensor", f"{largest / mib:,.1f} MiB"),
        (f"output ({args.dtype}, orbax)", f"{out_bytes / mib:,.1f} MiB"),
        ("baseline RSS (imports)", f"{base_rss / mib:,.1f} MiB"),
        ("peak RSS (convert)", f"{peak / mib:,.1f} MiB"),
        ("peak / checkpoint", f"{result['peak_over_checkpoint']:.2f}"),
        ("(peak - baseline) / output", f"{result['overhead_over_output']:.2f}"),
        ("convert time", f"{secs:.1f} s"),
    ]
    for name, value in rows:
        print(f"{name:32s} {value:>14s}")
    return result


if __name__ == "__main__":
    main()
