"""bench/convert_memory.py at ~20 MB: runs end to end and prints a well-formed JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_convert_memory_bench_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "convert_memory.py"), "--size-gb", "0.02", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[0])
    keys = {"checkpoint_bytes", "output_bytes", "peak_rss_bytes", "baseline_rss_bytes", "peak_over_checkpoint", "params"}
    assert keys <= set(result)
    assert 15e6 < result["checkpoint_bytes"] < 40e6
    assert result["output_bytes"] > 0.9 * result["checkpoint_bytes"]
    assert result["peak_rss_bytes"] > result["baseline_rss_bytes"] > 0
    assert result["peak_over_checkpoint"] == round(result["peak_rss_bytes"] / result["checkpoint_bytes"], 3)
    assert "peak RSS (convert)" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the work directory is removed
