"""The FLOPs table (bench/flops.py) on a tiny config: well-formed, xattn is the reference."""

import json

from bench import flops


def test_flop_table_tiny():
    entries = flops.flop_table(
        quick=True, config=flops.tiny_config(), prompt_len=8, answer_tokens=4, configs=("xattn", "flex-M", "flex-0.1M")
    )
    keys = {"config", "workload", "flops", "analytic_flops", "flops_ratio", "seconds"}
    assert entries
    for e in entries:
        assert keys <= set(e), e
        assert e["workload"] in ("A", "B")
        assert e["flops"] > 0 and e["analytic_flops"] > 0
        assert e["seconds"] is None or e["seconds"] > 0
    json.dumps({"entries": entries})
    by = {(e["config"], e["workload"]): e for e in entries}
    for wl in ("A", "B"):
        assert by[("xattn", wl)]["flops_ratio"] == 1.0
        assert by[("flex-0.1M/cache", wl)]["flops"] <= by[("flex-M/cache", wl)]["flops"]
    assert by[("flex-0.1M/project", "A")]["flops"] <= by[("flex-M/cache", "A")]["flops"]
    assert flops.format_table(entries).count("\n") == len(entries)
