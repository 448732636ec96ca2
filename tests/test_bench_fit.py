"""bench.fit's bookkeeping, with a stand-in compiler: the largest-batch search and --resume / --only.

(The real compiles are minutes each at 7B: bench.fit runs them; tests/test_aot_tpu.py compiles tiny models.)"""

import dataclasses
import json

import pytest

import bench.fit as fit
from flexattn_jax.app import aot

GIB = 2**30


def _fake_compile(calls):
    """Peak = 10 GiB + 7 GiB per sample per chip (plain LLaVA: 5 GiB) against 95 GiB usable: batch 12 is the
    largest that fits (plain: 17); the step is 2 s per sample per chip (plain: 1 s)."""

    def compile_program(target, model, program="train", *, per_device_batch=1, mesh=None, layers=None, model_name=None, quantize=None,
                        unroll_layers=False, **_):
        calls.append((program, getattr(target, "name", target), model_name, per_device_batch))
        plain = model_name == "llava-1.5-7b"
        peak = (10 + (5 if plain else 7) * per_device_batch) * GIB
        return aot.CompileReport(
            target=str(getattr(target, "name", target)), topology="fake", chips=8, mesh={"data": 8}, model=model_name or "m",
            program=program, layers=layers or 32, global_batch=8 * per_device_batch, per_device_batch=per_device_batch,
            seq_len=fit.SEQ, select_rows=fit.ROWS, attention_impl="auto", remat="full",
            per_chip_bytes={"arguments": GIB, "temporaries": peak - GIB, "outputs": 0, "peak": peak}, capacity_bytes=100 * GIB,
            usable_bytes=95 * GIB, fits=peak <= 95 * GIB, kernels={}, compile_seconds=1.0, flops_per_chip=1e12,
            model_flops_per_chip=1e12, step_seconds_estimate=(1.0 if plain else 2.0) * per_device_batch,
            serve_peaks={"step": peak, "slot_state": GIB * per_device_batch} if program == "serve" else {}, quantize=quantize,
            unrolled=unroll_layers, optimal_seconds=(3.0 if quantize else 4.0) * per_device_batch,  # int8 / bf16: 0.75x
            bytes_accessed_per_chip=(1.0 if quantize else 2.0) * GIB * per_device_batch)  # 0.5x

    return compile_program


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(aot, "compile_program", _fake_compile(made))
    monkeypatch.setattr(aot, "load_model_config", lambda name: name)
    return made


def test_largest_batch_finds_the_boundary(calls):
    best, tried = fit.largest_batch(lambda b: aot.compile_program("v5p-64", "m", per_device_batch=b), lambda m: None)
    assert best.per_device_batch == 12 and best.fits
    assert [r["per_device_batch"] for r in tried] == [1, 2, 12, 13] and not tried[-1]["fits"]


def test_largest_batch_converges_on_a_curved_peak_in_few_compiles(calls):
    """A peak that grows faster than linearly (5 + 1.2 b + 0.012 b^2 GiB, 90 GiB usable): the boundary, not
    one compile per batch above the first guess (the plain 7B's search once stepped 57, 58, ... 64)."""
    usable, peak = 90 * GIB, lambda b: (5 + 1.2 * b + 0.012 * b * b) * GIB
    made = []

    def compile_at(b):
        made.append(b)
        r = aot.compile_program("v5p-64", "m", per_device_batch=b)
        return dataclasses.replace(r, per_chip_bytes={**r.per_chip_bytes, "peak": peak(b)}, usable_bytes=usable, fits=peak(b) <= usable)

    best, tried = fit.largest_batch(compile_at, lambda m: None)
    want = max(b for b in range(1, fit.MAX_BATCH + 1) if peak(b) <= usable)
    assert best.per_device_batch == want and want + 1 in made and not [r for r in tried if r["per_device_batch"] == want + 1][0]["fits"]
    assert len(made) <= 6, made  # 1, 2, 64, 43, 47, 48 (stepping down from 64 took 20)


def test_resume_compiles_only_the_missing_jobs(calls, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert fit.main(["--quick", "--only", "infer", "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert len(first["inference"]) == 4 and not first["train"] and {c[0] for c in calls} == {"prefill", "decode"}
    calls.clear()
    assert fit.main(["--only", "train", "--target", "v4-32", "--resume", "--out", str(out)]) == 0
    assert {(c[1], c[2]) for c in calls} == {("v4-32", m) for m in fit.TRAIN_MODELS}  # one target, its three models
    same = json.loads(out.read_text())["same_batch"]  # plain LLaVA compiled again at FlexAttention's largest batch
    first_13b = next(i for i, c in enumerate(calls) if c[2] == "llava-flexattn-13b")  # the slow 13B search comes last
    assert calls[first_13b - 1] == ("train", "v4-32", "llava-1.5-7b", 12) and all("13b" in c[2] for c in calls[first_13b:])
    assert same == [{"target": "v4-32", "per_device_batch": 12, "flexattention_step_seconds": 24.0, "llava_step_seconds": 12.0,
                     "step_ratio": 2.0, "llava": same[0]["llava"]}] and same[0]["llava"]["per_device_batch"] == 12
    out.write_text(json.dumps(first))
    calls.clear()
    assert fit.main(["--only", "train", "--target", "v4-32", "--model", "llava-1.5-7b", "--resume", "--out", str(out)]) == 0
    assert {c[2] for c in calls} == {"llava-1.5-7b"}  # the search of one model (and no same-batch: no FlexAttention row)
    out.write_text(json.dumps(first))
    calls.clear()
    assert fit.main(["--quick", "--resume", "--out", str(out)]) == 0  # the train and depth jobs, not the inference again
    second = json.loads(out.read_text())
    assert second["inference"] == first["inference"] and {c[0] for c in calls} == {"train"}
    assert [e["largest"]["per_device_batch"] for e in second["train"]] == [12, 17] and len(second["depth"]) == 2
    assert [c["step_ratio"] for c in second["same_batch"]] == [2.0]
    calls.clear()
    assert fit.main(["--quick", "--resume", "--out", str(out)]) == 0 and calls == []  # nothing left to compile
    assert "llava-flexattn-7b" in capsys.readouterr().out


def test_resume_refuses_results_made_with_other_settings(calls, tmp_path):
    out = tmp_path / "fit.json"
    out.write_text(json.dumps({"settings": {**fit.SETTINGS, "seq_len": 4096}, "train": [], "inference": [], "depth": []}))
    with pytest.raises(SystemExit, match="other settings"):
        fit.main(["--quick", "--resume", "--out", str(out)])
    with pytest.raises(SystemExit):
        fit.main(["--resume"])  # --resume needs --out


def test_rows_from_before_the_loop_scaling_get_the_current_estimate():
    """A stored v5p row without step_seconds_estimate: re-derived from its own optimal_seconds and FLOPs."""
    row = {"target": "v5p-64", "optimal_seconds": 0.5, "flops_per_chip": 1e14, "model_flops_per_chip": 4e14, "mfu_estimate": 4.4}
    fit.rederive_estimate(row)
    assert row["step_seconds_estimate"] == pytest.approx(2.0)  # 0.5 s x (model / compiler FLOPs)
    assert row["mfu_estimate"] == pytest.approx(4e14 / (2.0 * 459e12))
    kept = {"target": "v5p-64", "optimal_seconds": 0.5, "step_seconds_estimate": 3.0, "mfu_estimate": 0.3}
    assert fit.rederive_estimate(dict(kept)) == kept  # a current row is left as it is


def test_compile_find_batch_is_the_one_search(calls):
    """`flexattn-jax compile --find-batch` runs the same search as the fit table: the boundary, a limit, none fitting."""
    at = lambda b: aot.compile_program("v5p-64", "m", per_device_batch=b)
    best, tried = aot.find_batch(at)
    assert best.per_device_batch == 12 and [r.per_device_batch for r in tried] == [1, 2, 12, 13]
    best, tried = aot.find_batch(at, limit=8)
    assert best.per_device_batch == 8 and all(r.fits for r in tried)
    tiny = lambda b: dataclasses.replace(at(b), fits=False)
    assert aot.find_batch(tiny) == (None, [tiny(1)])


def test_serve_rows_search_the_most_slots_and_resume(calls, tmp_path, capsys):
    """--only serve: the engine's largest slot count per (model, target, mesh) of fit.SERVE, its programs' peaks kept in
    the row; --resume compiles none of them again."""
    out = tmp_path / "fit.json"
    assert fit.main(["--only", "serve", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(e["model"], e["target"], e["mesh"]) for e in res["serve"]] == [tuple(r) for r in fit.SERVE]
    assert {c[0] for c in calls} == {"serve"} and not res["train"] and not res["inference"]
    assert all(e["largest"]["per_device_batch"] == 12 and "serve_peaks" in e["largest"] for e in res["serve"])
    assert "serve" in capsys.readouterr().out
    calls.clear()
    assert fit.main(["--only", "serve", "--resume", "--out", str(out)]) == 0 and calls == []


def test_lora_rows_compile_their_jobs_at_full_depth_and_compare_steps(calls, tmp_path, monkeypatch, capsys):
    """``--only lora`` compiles each of LORA_JOBS once, of its own model, the whole decoder; a train row on a target with a
    full fine-tune row at its batch carries the two step estimates' ratio; the unrolled decode steps pair up int8 / bf16;
    --resume keeps the rows; the composed rows are the 7B's train jobs on the chip composed from."""
    from flexattn_jax import presets

    monkeypatch.setattr(aot, "load_model_config", presets.preset)  # the composition reads the real 7B config
    monkeypatch.setattr(fit, "state_bytes_per_chip", lambda cfg, target, mesh, lora: 32 * GIB)
    out = tmp_path / "fit.json"
    full = {"model": "llava-flexattn-7b", "target": "v5p-64", "largest": None,
            "tried": [{"per_device_batch": b, "step_seconds_estimate": 4.0 * b} for b in (18, 19)]}
    out.write_text(json.dumps({"settings": fit.SETTINGS, "train": [full]}))
    assert fit.main(["--only", "lora", "--resume", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["lora"]
    assert [c[:3] for c in calls] == [(j["program"], j["target"], j.get("model", "llava-flexattn-7b")) for j in fit.LORA_JOBS]
    assert ("train", "h100x1", "llava-flexattn-13b") in [c[:3] for c in calls]
    assert [(r["name"], r["target"]) for r in rows] == [(j["name"], j["target"]) for j in fit.LORA_JOBS]
    assert all(r["layers"] == 32 for r in rows if r["model"] == "llava-flexattn-7b")  # no cut decoder
    v5p = [r for r in rows if r["program"] == "train" and r["target"] == "v5p-64"]
    assert [r["per_device_batch"] for r in v5p] == [19]
    assert v5p[0]["step_ratio"] == pytest.approx(2.0 * 19 / (4.0 * 19)) and v5p[0]["full_step_seconds"] == 76.0
    assert all("step_ratio" not in r for r in rows if r["target"] != "v5p-64")  # no full fine-tune row to compare
    text = capsys.readouterr().out
    assert "7B QLoRA, int4 base" in text and "0.50x the full fine-tune's step" in text
    # the unrolled decode steps pair up by batch: int8 / bf16 of optimal_seconds and bytes accessed (the fake's 0.75x, 0.5x)
    ratios = fit.quant_decode_ratios(rows)
    assert [(c["quantize"], c["per_device_batch"]) for c in ratios] == [("int8", 8), ("int8", 1)]
    assert all(c["time_ratio"] == 0.75 and c["bytes_accessed_ratio"] == 0.5 for c in ratios)
    assert "int8 / bf16 decode step, unrolled, batch 8 on v5p-8: optimal_seconds 0.75x (24000.00 vs 32000.00 ms)" in text
    calls.clear()
    assert fit.main(["--only", "lora", "--resume", "--out", str(out)]) == 0 and calls == []
    # composed: the full fine-tune's temporaries at each compiled batch + the LoRA state (here 32 GiB: the fake's)
    res = json.loads(out.read_text())
    tried = [{"per_device_batch": b, "per_chip_bytes": {"temporaries": (b + 0.5) * GIB}} for b in (1, 2, 3)]
    res["train"] = [{"model": "llava-flexattn-7b", "target": fit.COMPOSED_FROM, "largest": None, "tried": tried}]
    out.write_text(json.dumps(res))
    assert fit.main(["--only", "lora", "--resume", "--out", str(out)]) == 0 and calls == []
    composed = json.loads(out.read_text())["composed"]
    v5e = [j["target"] for j in fit.LORA_JOBS if j["program"] == "train" and j["target"].startswith("v5e")]
    assert [c["target"] for c in composed] == v5e and len(v5e) == 2  # only the 7B jobs on the chip composed from
    assert "13B QLoRA, int4 base" not in [c["name"] for c in composed]
    for c in composed:  # v5e: 16 GiB x 0.95 usable; 32 GiB of state fits no batch
        assert c["peak_by_batch"] == {str(b): 32 * GIB + (b + 0.5) * GIB for b in (1, 2, 3)} and c["largest_batch"] is None
