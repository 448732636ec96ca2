"""The demo's quick path runs end to end and writes well-formed outputs."""

import json

from flexattn_jax.cli import main


def test_demo_quick_writes_report_and_png(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["modes"]) == {"flexattention", "lr-only", "random-selection"}
    for row in report["modes"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_s"] > 0
    assert report["flops_per_sample_prefill"] > 0
    png = (tmp_path / "attention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
