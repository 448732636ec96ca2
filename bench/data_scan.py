"""The multi-host data scan's cost: records checked per second (tokens + image header, no pixels) on this host.

Before a run's first step every record of the data file is checked once (:func:`train.data.scan_records`);
on P processes each checks 1/P of them. ``python -m bench.data_scan --records 4000 --threads 2`` writes a
LLaVA-format dataset of that many records (demo images, PNG) to a temporary folder, times the scan and the
full load of the same records (decoded, preprocessed pixels) for comparison, in wall and CPU seconds (CPU time
is the figure to read on a shared machine), and prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from flexattn_jax.app import demo_data
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.config import ModelConfig
from train.config import DataConfig
from train.data import SampleLoader, scan_records


def write_dataset(root: Path, n: int, hr_size: int) -> list[dict]:
    """``n`` records over ``min(n, 64)`` distinct PNG images under ``root`` (the scan reads each record's header)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = demo_data.make_split(0, min(n, 64), hr_size)
    for i, (image, *_rest) in enumerate(items):
        image.save(root / "images" / f"{i}.png", format="PNG")
    return [{"id": str(i), "image": f"images/{i % len(items)}.png",
             "conversations": [{"from": "human", "value": "<image>\n" + items[i % len(items)][1]},
                               {"from": "gpt", "value": items[i % len(items)][2]}]} for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_scan", description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hr-size", type=int, default=336, help="image side in pixels")
    a = ap.parse_args(argv)
    cfg = ModelConfig()  # LLaVA-1.5 shapes: 336 px, 576 image tokens
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = write_dataset(root, a.records, a.hr_size)
        dcfg = DataConfig(images=str(root), max_len=2048, threads=a.threads)
        loader = SampleLoader(records, cfg, dcfg, build_demo_tokenizer())
        t0, c0 = time.perf_counter(), time.process_time()
        codes, _ = scan_records(loader, 0, 1, a.threads)
        scan_s, scan_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        sample = min(a.records, 200)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(sample):
            loader((i, 0))
        load_s = (time.perf_counter() - t0) / sample * a.records
        load_cpu_s = (time.process_time() - c0) / sample * a.records
    out = {"records": a.records, "threads": a.threads, "usable": int((codes == 0).sum()), "scan_s": scan_s,
           "scan_cpu_s": scan_cpu_s, "scan_records_per_s": a.records / scan_s, "scan_records_per_cpu_s": a.records / scan_cpu_s,
           "full_load_s_estimate": load_s, "full_load_cpu_s_estimate": load_cpu_s, "scan_share_of_one_load_cpu": scan_cpu_s / load_cpu_s}
    print(json.dumps(out))
    print(f"{'records':>8} {'scan s':>8} {'scan cpu s':>10} {'records/cpu s':>13} {'1 full load cpu s':>17} {'scan / load':>11}")
    print(f"{a.records:>8} {scan_s:>8.2f} {scan_cpu_s:>10.2f} {out['scan_records_per_cpu_s']:>13.0f} {load_cpu_s:>17.2f} "
          f"{out['scan_share_of_one_load_cpu']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
