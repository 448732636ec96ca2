"""The benchmarks of bench/ on tiny configs: well-formed output, xattn is the reference, the CLI's JSON parses.

No timed assertions: only shapes of the output, FLOP orderings and parity side checks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing

import jax
import pytest

from bench import cli, common, memory, scaling
from flexattn_jax import generate as G
from flexattn_jax.flops import cost_flops, counting_config
from flexattn_jax.params import abstract_params

REQUIRED = {"config", "workload", "flops", "seconds", "flops_ratio", "time_ratio"}


def test_variants_cover_every_strategy():
    cfg = common.smoke_config()
    labels = [v.label for v in common.variants(cfg)]
    strategies = typing.get_args(G.HRStrategy)
    assert common.hr_strategies() == strategies
    for name in common.BUDGETS:
        assert [lb for lb in labels if lb.startswith(name + "/")] == [f"{name}/{s}" for s in strategies]
    assert {"lr", "hd-seq", "xattn"} <= set(labels)
    hd = common.variant(cfg, "hd-seq")
    assert hd.views == 1 + cfg.zoom**2 and common.sequence_length(hd, 8) == 8 + cfg.num_image_tokens + cfg.num_hr_tokens
    with pytest.raises(ValueError, match="HR strategy"):
        common.variant(cfg, "flex-M", "nope")


def test_counting_config_counts_every_layer():
    """XLA counts a loop body once: project_all_hr (a lax.map over Lh layers when scanned) is counted Lh times
    on flexattn_jax.flops.counting_config, where the loop is unrolled."""
    cfg = dataclasses.replace(common.smoke_config(), scan_layers=True)
    lh = cfg.text.num_layers - cfg.flex.first_select_layer - 1
    ap = abstract_params(cfg)
    m, d = cfg.num_hr_tokens, cfg.text.head_dim
    hr = G.HRContext(*(jax.ShapeDtypeStruct(s, t) for s, t in (
        ((1, m, cfg.text.hidden_size), jax.numpy.bfloat16), ((1, m, d), jax.numpy.float32), ((1, m, d), jax.numpy.float32),
        ((1,), jax.numpy.int32), ((1, 2), jax.numpy.int32), ((1,), jax.numpy.bool_))))
    once = cost_flops(lambda p, h: G.project_all_hr(p["text"], cfg, h), ap, hr)
    counted = counting_config(cfg)
    unrolled = cost_flops(lambda p, h: G.project_all_hr(p["text"], counted, h), ap, hr)
    assert lh > 1 and unrolled == pytest.approx(lh * once, rel=1e-4)  # (the loop counter: a few FLOPs)


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_memory_table_tiny():
    entries = memory.memory_table(common.smoke_config(), prompt_len=8, answer_tokens=4, configs=("flex-0.1M",), progress=False)
    assert [e["config"] for e in entries] == [v.label for v in common.variants(common.smoke_config(), ("flex-0.1M",))]
    for e in entries:
        assert e["peak_bytes"] == e["argument_bytes"] + e["output_bytes"] + e["temp_bytes"] - e["alias_bytes"] > 0
        assert e["argument_bytes"] >= e["params_bytes"] > 0 and e["dtype"] == "float32"
    by = {e["config"]: e for e in entries}
    assert by["flex-0.1M/cache"]["decode_state_bytes"] > by["flex-0.1M/project"]["decode_state_bytes"]  # all M projected K/V
    assert memory.format_table(entries).count("\n") == len(entries) + 1  # one batch size: a row per entry


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_scaling_tiny_and_plot(tmp_path):
    from PIL import Image

    configs = ("flex-0.1M", "hd-seq")
    entries = scaling.scaling_table(common.smoke_config("float32"), zooms=(1, 2), configs=configs, prompt_len=8, repeats=1,
                                    flops_7b=False, progress=False)
    assert len(entries) == 2 * len(configs)
    for e in entries:
        assert e["seconds"] > 0 and e["flops"] > 0 and isinstance(e["zoom"], int)
    by = {(e["config"], e["zoom"]): e for e in entries}
    for name in ("flex-0.1M/project", "hd-seq"):
        assert by[(name, 2)]["flops"] > by[(name, 1)]["flops"]
        assert by[(name, 2)]["hr_tokens"] == 4 * by[(name, 1)]["hr_tokens"]
    path = scaling.plot(entries, tmp_path / "scaling.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200
    assert "hd-seq" in scaling.format_table(entries)


def test_torch_comparisons_tiny():
    pytest.importorskip("torch")
    from bench import torch_compare

    cfg = common.smoke_config("float32")
    fwd = torch_compare.forward_comparison(cfg, batches=(1,), prompt_len=8, repeats=1, progress=False)
    assert fwd[0]["speedup"] > 0 and fwd[0]["max_abs_logit_diff_over_scale"] < 1e-4
    assert fwd[0]["torch_threads"] >= 1 and fwd[0]["xla_threads"] >= 1
    strategy = common.hr_strategies()[0]
    orc = torch_compare.oracle_comparison(cfg, answer_tokens=(3,), batch=2, prompt_len=8, repeats=1, strategies=(strategy,),
                                          configs=("flex-M",), progress=False)
    assert orc[0]["config"] == f"flex-M/{strategy}" and orc[0]["throughput_ratio"] > 0 and orc[0]["exact"]
    assert orc[0]["tokens_match"] == 1.0  # same weights, fp32: the oracle's greedy tokens
    assert "oracle" in torch_compare.format_tables(fwd, orc)


def test_torch_missing_is_a_clear_error(monkeypatch):
    from bench import torch_compare

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(torch_compare.TorchMissing, match="need torch"):
        torch_compare.forward_comparison(common.smoke_config("float32"), progress=False)


def test_goals_say_met_or_not():
    results = {
        "flops_7b": [{"config": "flex-0.1M/project", "workload": "A", "flops_ratio": 0.61},
                     {"config": "flex-0.1M/cache", "workload": "A", "flops_ratio": 0.94},
                     {"config": "flex-0.1M/project", "workload": "B", "flops_ratio": 1.16}],
        "walltime": [{"config": "flex-0.1M/project", "workload": "A", "batch": 1, "time_ratio": 0.9}],
        "torch_forward": [{"batch": 1, "speedup": 3.0, "torch_threads": 2}],
    }
    gs = {g["goal"]: g for g in cli.goals(results)}
    a = gs["A: flex-0.1M <= 0.62x xattn FLOPs (7B shapes)"]
    assert a["met"] is True and a["measured"] == 0.61 and a["where"] == "flex-0.1M/project"
    assert gs["B: flex-0.1M <= 0.70x xattn FLOPs (7B shapes)"]["met"] is False
    assert gs["A: flex-0.1M <= 0.65x xattn wall time (scaled, batch 1)"]["met"] is False
    assert gs["forward >= 2x transformers (batch 1, 2 threads)"]["met"] is True
    assert "**no**" in cli.format_goals(list(gs.values()))
    assert cli.marginal_ratio((1, 10), (2, 20), (4, 40)) == pytest.approx(1.0)  # linear
    assert cli.marginal_ratio((1, 1), (2, 4), (3, 9)) == pytest.approx((2 + 3) / (1 + 2))  # quadratic


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_cli_quick_json_tiny(capsys, tmp_path):
    assert cli.main(["--quick", "--json", "--tiny", "--no-progress", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "bench-quick.json").read_text()) == out
    assert cli.main(["--report", str(tmp_path / "bench-quick.json")]) == 0  # the tables again, from the saved file
    report = capsys.readouterr().out
    assert "| flex-0.1M/" in report and "| goal |" in report
    assert out["entries"] and {"goals", "machine", "flops_7b", "walltime"} <= set(out)
    for e in out["entries"]:
        assert REQUIRED <= set(e), e
        assert e["workload"] in ("A", "B") and e["flops"] > 0
    wall = [e for e in out["walltime"]]
    assert {e["config"] for e in wall} == {"xattn"} | {f"flex-0.1M/{s}" for s in common.hr_strategies()}
    for e in wall:
        assert isinstance(e["seconds"], float) and e["seconds"] > 0 and e["batch"] == 1
        assert isinstance(e["flops_ratio"], float) and isinstance(e["time_ratio"], float)
        if e["config"] == "xattn":
            assert e["flops_ratio"] == 1.0 and e["time_ratio"] == 1.0
        if e["config"].endswith("/incremental"):  # how often its fast path suffices, from the step masks
            assert e["new_hr_tokens_per_step_max"] >= 0 and 0.0 <= e["fallback_step_share"] <= 1.0
    for e in out["flops_7b"]:
        assert e["seconds"] is None and (e["flops_ratio"] == 1.0) == (e["config"] == "xattn")
