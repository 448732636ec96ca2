"""``flexattn-jax bench --accelerator --smoke``: the accelerator benchmark's code on tiny shapes, on CPU."""

from __future__ import annotations

import json

import pytest

from bench import cli


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_accelerator_smoke(tmp_path, capsys):
    out = tmp_path / "acc.json"
    assert cli.main(["--accelerator", "--smoke", "--batch", "1", "--repeats", "1", "--impl", "xla_chunked",
                     "--configs", "flex-0.1M", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "cpu" and res["smoke"] and res["impls"] == ["xla_chunked"]
    (inf,) = res["inference"]
    assert inf["config"].startswith("flex-0.1M") and inf["prefill_seconds"] > 0 and inf["decode_step_seconds"] > 0
    (train,) = res["train"]
    assert train["attention_impl"] == "xla_chunked" and train["flops"] > 0 and train["seconds"] > 0 and train["mfu"] is None
    assert "| flex-0.1M/project | xla_chunked | 1 |" in capsys.readouterr().out
