"""``bench/hr_kernel.py``: the pooled cells read back from HR masks, the trained-model mask source (``--checkpoint``),
and the roofline built from the kernel's own cost estimate at an active block share."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from bench import hr_kernel as HK
from flexattn_jax.kernels.hr_attention import cost_estimates
from flexattn_jax.selection import _upsample_nearest


@pytest.mark.parametrize("grid", [12, 72, 24])
def test_pooled_cells_read_back_the_upsampled_selection(grid):
    """A 9 x 9 selection upsampled ``nearest`` to the HR grid (as the model does), read back cell by cell: the same cells
    (12 x 12 is not a multiple of 9: the cells cover 1 or 2 rows)."""
    cells = np.random.default_rng(grid).random((2, 3, 5, 81)) < 0.3  # (L, B, R, 81)
    hr = np.asarray(_upsample_nearest(cells.reshape(2, 3, 5, 9, 9), grid)).reshape(2, 3, 5, grid * grid)
    np.testing.assert_array_equal(HK.pooled_cells(hr, grid), cells.reshape(6, 5, 81))


def test_roofline_is_the_kernels_cost_estimate_at_the_share():
    """FLOPs scale with the share; the bytes read or written once (query side of fwd/dq, K/V of dK/dV) do not."""
    full, quarter, none = (cost_estimates(1, 4, 2, 256, 512, 128, 2, share=s) for s in (1.0, 0.25, 0.0))
    for k in ("fwd", "dq", "dkv"):
        assert quarter[k].flops == full[k].flops // 4 and none[k].flops == 0 and none[k].transcendentals == 0
        assert 0 < none[k].bytes_accessed < quarter[k].bytes_accessed < full[k].bytes_accessed
        assert quarter[k].bytes_accessed == pytest.approx(none[k].bytes_accessed + 0.25 * (full[k].bytes_accessed - none[k].bytes_accessed))
    assert none["dkv"].bytes_accessed == 2 * 2 * 2 * 512 * 128 * 2  # K, V in and dK, dV out, once per KV head
    r1, r4 = HK.roofline(1.0, "v5p"), HK.roofline(0.25, "v5p")
    assert r4["tflops"] == pytest.approx(r1["tflops"] / 4, rel=1e-6) and r1["gbytes"] / 4 < r4["gbytes"] < r1["gbytes"]
    with pytest.raises(ValueError, match="share=1.5"):
        cost_estimates(1, 4, 2, 256, 512, 128, 2, share=1.5)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The demo's model shape (``presets.demo``) with random weights, written with the demo's tokenizer."""
    from flexattn_jax import presets
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from tests.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("hrk") / "model", presets.demo(len(build_demo_tokenizer())))


def test_checkpoint_masks_are_the_models_training_row_selections(demo_checkpoint):
    """The model's own masks on the demo's training data: one row block per (layer, sample), its learnable rows
    (padding rows all-False), cells that upsample back to the share measured on the model's grid."""
    from flexattn_jax.checkpoint import read_config

    cfg = read_config(demo_checkpoint)
    cells, rows, own = HK.checkpoint_masks(demo_checkpoint, 3)
    layers = cfg.mask_layers.stop - cfg.mask_layers.start
    assert cells.shape[0] == layers * 3 and cells.shape[2] == 81 and cells.dtype == bool and rows.shape == cells.shape[:2]
    assert 0 < rows.sum(axis=1).min() and not rows.all()  # each sample has learnable rows, and padding
    assert not cells[~rows].any()
    hr = np.asarray(_upsample_nearest(cells.reshape(*cells.shape[:2], 9, 9), cfg.hr_grid)).reshape(*cells.shape[:2], -1)
    assert 0 < own < 1 and hr[rows].mean() == pytest.approx(own, rel=1e-6)


@pytest.mark.slow  # ~1 min: the scaled model's forward too
def test_checkpoint_source_in_the_table(demo_checkpoint, capsys):
    assert HK.main(["--rows", "16", "--checkpoint", str(demo_checkpoint), "--samples", "2"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert set(res["shares"]) == {"scaled-model", "trained-model", "synthetic-0.25"}
    assert {r["masks"] for r in res["roofline"]} >= {"trained-model"} and "trained-model: selected" in err


def test_checkpoint_errors(tmp_path, capsys):
    """A directory that is no model, and a model that selects nothing: one line each, exit 2, before any model runs."""
    import dataclasses

    from tests.checkpoints import write_tiny_checkpoint
    from tests.fixtures import tiny_config

    assert HK.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"python -m bench.hr_kernel: --checkpoint {tmp_path / 'nothing'}: "
                                                            "no metadata.json (want a model directory, e.g. demo_out/model)"]
    cfg = tiny_config()
    plain = write_tiny_checkpoint(tmp_path / "plain", dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, enabled=False)))
    assert HK.main(["--checkpoint", str(plain)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"python -m bench.hr_kernel: --checkpoint {plain}: FlexAttention is off "
                                                            "in its config, so it selects nothing"]


def test_hr_goals_rows_and_goals(tmp_path, capsys):
    """``bench/hr_goals.py`` without compiling: the rows' configs, the full-depth scaling of a cut compile's figures,
    the fit.json reference re-derived, and the goals read from the rows."""
    from bench import hr_goals as G
    from flexattn_jax import flops as F
    from flexattn_jax.app import aot

    sel, unrolled, share = G.row_config("selected-0.25"), G.row_config("check-flex-unrolled", 0.4), G.row_config("splash_hr-share", 0.4)
    assert (sel.flex.train_hr_budget, sel.flex.train_hr_fallback, sel.scan_layers) == (0.25, False, True)
    assert not unrolled.scan_layers and unrolled.flex.hr_kernel_block_share == 0.4 and share.flex.hr_kernel_block_share == 0.4
    llava = G.row_config("check-llava-unrolled")
    assert not llava.flex.enabled and not llava.scan_layers and G.row_config("check-llava-scanned").scan_layers
    assert (G.row_layers("check-flex-scanned"), G.row_layers("check-llava-unrolled"), G.row_layers("splash_hr")) == (3, 2, 10)
    assert (G.row_impl("check-llava-scanned"), G.row_impl("check-flex-unrolled")) == ("auto", "splash_hr")
    cfg = G.row_config("splash_hr")
    report = aot.CompileReport(target=G.TARGET, topology="v5p:4x4x2", chips=32, mesh={}, model=G.MODEL, program="train", layers=10,
                               global_batch=608, per_device_batch=19, seq_len=2048, select_rows=2048, attention_impl="splash_hr",
                               remat="full", per_chip_bytes={"peak": 2**30}, capacity_bytes=1, usable_bytes=1, fits=True, kernels={},
                               compile_seconds=1.0, flops_per_chip=5e13, model_flops_per_chip=1e15, optimal_seconds=0.25)
    row = G.full_depth(report, cfg)
    full = F.train_flops(aot.program_config(cfg, program="train"), 608, 2048, 2048) / 32
    assert row["full_model_flops_per_chip"] == pytest.approx(full) and row["full_step_seconds"] == pytest.approx(0.25 * full / 5e13)
    ref = G.fit_reference(Path("docs/fit.json"))
    assert ref["llava"]["step_seconds"] == pytest.approx(5.678, abs=1e-3)  # LLaVA-1.5's model FLOPs are as stored
    res = {"rows": [{"row": "splash_hr", "share": 1.0, **row}], "reference": ref}
    goals = {g["row"]: g for g in G.goals(res) if "step" in g["goal"]}
    assert goals["splash_hr"]["value"] == pytest.approx(row["full_step_seconds"] / ref["llava"]["step_seconds"])
    split = next(g for g in G.goals(res) if g.get("split") and "step" in g["goal"])
    assert split["value"] == pytest.approx(G.split_estimate({"row": "splash_hr", "share": 1.0, **row})[0] / ref["llava"]["step_seconds"])
    flops_goal = next(g for g in G.goals(res) if g["row"] == "flops")
    assert flops_goal["met"] and 1.1 < flops_goal["value"] < 1.2
    assert G.main(["--out", str(tmp_path / "none.json")]) == 0 and not (tmp_path / "none.json").exists()
    assert "selected-only at 25%" in capsys.readouterr().err


def test_hr_goals_check_rows_and_shares(tmp_path):
    """``bench/hr_goals.py``'s scanned-vs-unrolled check: the scanned cut's estimate scaled by model / counted FLOPs
    against the unrolled cut's own time and FLOPs; a pair at different shares is refused; the roofline columns; the
    share rows are kept one per share (a ``--row`` compile replaces only its own share's row)."""
    from bench import hr_goals as G

    def row(name, share, flops, optimal, model=1e15, nbytes=None):
        return {"row": name, "share": share, "layers": 3, "flops_per_chip": flops, "optimal_seconds": optimal,
                "model_flops_per_chip": model, "step_seconds_estimate": optimal * model / flops,
                "mfu_estimate": flops / (optimal * 459e12), "bytes_accessed_per_chip": nbytes,
                "full_step_seconds": 10.0, "full_mfu": 0.5, "per_chip_bytes": {"peak": 2**30}}

    scan, unr = row("check-flex-scanned", 0.432, 2.5e14, 0.5), row("check-flex-unrolled", 0.432, 8e14, 2.5)
    (c,) = G.check({"rows": [scan, unr, row("splash_hr", 1.0, 1e14, 1.0)]})
    assert c["model"] == "flex" and c["scaled_seconds"] == pytest.approx(2.0) and c["unrolled_seconds"] == 2.5
    assert c["unrolled_scaled_seconds"] == pytest.approx(3.125) and c["seconds_diff"] == pytest.approx(2.0 / 3.125 - 1)
    assert c["raw_seconds_diff"] == pytest.approx(-0.2) and c["flops_diff"] == pytest.approx(-0.2)
    assert c["split_diff"] == pytest.approx(G.split_estimate(scan, full=False)[0] / G.split_estimate(unr, full=False)[0] - 1)
    assert G.check({"rows": [scan]}) == []
    with pytest.raises(SystemExit, match="check-flex: the scanned and unrolled rows differ in share"):
        G.check({"rows": [scan, {**unr, "share": 1.0}]})
    roof = G.roofline(row("splash_hr", 1.0, 459e12, 2.0, nbytes=2.76e12))
    assert roof == {"compute_s": pytest.approx(1.0), "memory_s": pytest.approx(1.0), "optimal_s": 2.0}
    assert G.roofline(row("splash_hr", 1.0, 1e12, 1.0))["memory_s"] is None

    out = tmp_path / "goals.json"
    out.write_text(json.dumps({"rows": [row("splash_hr-share", 0.39, 1e14, 1.0), row("splash_hr-share", 0.432, 1e14, 1.0)]}))
    new = row("splash_hr-share", 0.432, 2e14, 3.0)
    with mock.patch.object(G, "compile_row", return_value=new) as compile_row:
        assert G.main(["--row", "splash_hr-share", "--share", "0.432", "--out", str(out)]) == 0
    compile_row.assert_called_once_with("splash_hr-share", 0.432)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["share"], r["optimal_seconds"]) for r in rows] == [(0.39, 1.0), (0.432, 3.0)]


def test_hr_goals_kernel_cost():
    """The HR kernels' part of a counted FlexAttention row: the forward twice, dq and dK/dV of one hierarchical layer for
    19 samples, at the row's share, over all M keys (5184, padded to 5248) or the selected-only budget's U slots; the
    stored compiles' FLOPs differ between share 1 and 0.39 by exactly the skipped part of it."""
    from bench import hr_goals as G

    est = cost_estimates(19, 32, 1, 2048, 5248, 128, 2, share=0.5)
    k = G.kernel_cost("splash_hr-share", 0.5)
    assert k["keys"] == 5184 and k["flops"] == 2 * est["fwd"].flops + est["dq"].flops + est["dkv"].flops
    assert k["bytes"] == 2 * est["fwd"].bytes_accessed + est["dq"].bytes_accessed + est["dkv"].bytes_accessed
    assert k["seconds"] >= k["bytes"] / 2.76e12 and k["seconds"] >= k["flops"] / 459e12
    sel = G.kernel_cost("selected-0.25", 1.0)
    assert sel["keys"] == 1296 and sel["flops"] == pytest.approx(G.kernel_cost("splash_hr", 1.0)["flops"] * 1408 / 5248)
    assert G.kernel_cost("check-llava-scanned", 1.0) is None
    rows = {(r["row"], r["share"]): r for r in json.loads(Path("docs/hr_goals.json").read_text())["rows"]}
    full, part = rows[("splash_hr", 1.0)]["flops_per_chip"], rows[("splash_hr-share", 0.39)]["flops_per_chip"]
    assert full - part == pytest.approx(G.kernel_cost("splash_hr", 1.0)["flops"] * (1 - 0.39), rel=1e-3)


def test_count_loops():
    """``aot.count_loops``: the ``while`` instructions of compiled HLO text, not names that contain the word."""
    from flexattn_jax.app import aot

    hlo = ("%while.3 = (s32[], f32[8]) while(%tuple.1), condition=%cond, body=%body\n"
           "%fusion.while_body = f32[8] fusion(%p), kind=kLoop\n  %w2 = (s32[]) while(%t), condition=%c2, body=%b2\n")
    assert aot.count_loops(hlo) == 2 and aot.count_loops("%add = f32[] add(%a, %b)") == 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_hr_goals_matmul_check_counts_a_small_matmul_exactly():
    """``bench/hr_goals.py --matmul-check`` at a size where the compiler makes no collective-matmul loop: the forward's
    FLOPs are 2 B T d f per chip and ``d/dw`` twice that (the forward and the weight gradient)."""
    from bench import hr_goals as G

    mm = G.matmul_check("v5e:2x2", batch=2, seq=128, d=256, f=512)
    assert mm["model_flops_per_chip"] == 2.0 * 2 * 128 * 256 * 512
    assert mm["forward"]["while_loops"] == 0 and mm["forward"]["flops_per_chip"] == pytest.approx(mm["model_flops_per_chip"], rel=0.01)
    assert mm["grad_w"]["flops_per_chip"] == pytest.approx(2 * mm["model_flops_per_chip"], rel=0.01)


def test_hr_goals_split_estimate():
    """The step with the HR kernels kept out of the scaling: the XLA part (counted minus one hierarchical layer's kernels)
    scaled by its model FLOPs (less the HR attention) / counted FLOPs, plus the kernels' roofline seconds once per
    hierarchical layer (23 at full depth, 1 in the 10-layer cut); a lower share shortens it; LLaVA-1.5 rows scale plainly."""
    from bench import hr_goals as G
    from flexattn_jax import flops as F
    from flexattn_jax.app import aot

    row = {"row": "splash_hr-share", "share": 0.5, "layers": 10, "flops_per_chip": 7e13, "optimal_seconds": 0.35}
    kc = G.kernel_cost("splash_hr-share", 0.5)
    full = aot.program_config(G.row_config("splash_hr-share", 0.5), program="train")
    model = F.train_flops(full, 608, 2048, 2048) / 32
    attention = 3 * 19 * 23 * F.hr_attention_flops(full, 2048, 5184)
    step, mfu = G.split_estimate(row)
    assert step == pytest.approx(23 * kc["seconds"] + (0.35 - kc["seconds"]) * (model - attention) / (7e13 - kc["flops"]))
    assert mfu == pytest.approx(model / (step * 459e12))
    cut = aot.program_config(G.row_config("splash_hr-share", 0.5), program="train", layers=10)
    cut_step = G.split_estimate(row, full=False)[0]
    cut_model = F.train_flops(cut, 608, 2048, 2048) / 32 - 3 * 19 * F.hr_attention_flops(cut, 2048, 5184)
    assert cut_step == pytest.approx(kc["seconds"] + (0.35 - kc["seconds"]) * cut_model / (7e13 - kc["flops"]))
    quarter = G.kernel_cost("splash_hr-share", 0.25)  # the same XLA part, half the kernels' work: 23 x the saving shorter
    fewer = {**row, "share": 0.25, "flops_per_chip": 7e13 - kc["flops"] / 2, "optimal_seconds": 0.35 - kc["seconds"] + quarter["seconds"]}
    assert G.split_estimate(fewer)[0] == pytest.approx(step - 23 * (kc["seconds"] - quarter["seconds"]))
    llava = {"row": "check-llava-scanned", "share": 1.0, "layers": 2, "flops_per_chip": 5e13, "optimal_seconds": 0.2}
    plain = F.train_flops(aot.program_config(aot.load_model_config("llava-1.5-7b"), program="train"), 608, 2048, 2048) / 32
    assert G.split_estimate(llava)[0] == pytest.approx(0.2 * plain / 5e13)


def test_cycle_breakdown_by_source_line():
    """``aot.cycle_breakdown``: each instruction's ``estimated_cycles`` summed by the source line its stack frame names
    (HLO text's FileNames / FunctionNames / FileLocations / StackFrames tables); ``hr_goals.by_function`` sums the lines
    of one function into shares."""
    from bench import hr_goals as G
    from flexattn_jax.app import aot

    hlo = "\n".join([
        '%fusion.1 = bf16[4] fusion(%a), kind=kOutput, metadata={op_name="jit(f)/dot_general" stack_frame_id=2}, '
        'backend_config={"window_config":{"estimated_cycles":"300","iteration_bounds":["1"]}}',
        '%fusion.2 = bf16[4] fusion(%b), kind=kLoop, metadata={op_name="jit(f)/add" stack_frame_id=3}, '
        'backend_config={"window_config":{"estimated_cycles":"100"}}',
        '%fusion.3 = bf16[4] fusion(%c), kind=kLoop, metadata={op_name="jit(f)/mul" stack_frame_id=2}, '
        'backend_config={"window_config":{"estimated_cycles":"50"}}',
        '%copy.4 = bf16[4] copy(%d), backend_config={"window_config":{"estimated_cycles":"7"}}',
        '%add.5 = bf16[4] add(%d, %d)',
        "", "FileNames", '1 "/src/flexattn_jax/hierarchical.py"', '2 "/src/flexattn_jax/text.py"',
        "", "FunctionNames", '1 "hr_kv"', '2 "mlp"',
        "", "FileLocations", "1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=4 end_column=9}",
        "2 {file_name_id=2 function_name_id=2 line=20 end_line=20 column=4 end_column=9}",
        "3 {file_name_id=2 function_name_id=2 line=21 end_line=21 column=4 end_column=9}",
        "", "StackFrames", "1 {file_location_id=1 parent_frame_id=1}", "2 {file_location_id=2 parent_frame_id=2}",
        "3 {file_location_id=3 parent_frame_id=1}", ""])  # a frame's parent is its parent_frame_id - 1 (0: none)
    cycles = aot.cycle_breakdown(hlo)
    assert cycles == {"flexattn_jax/text.py:20:mlp < flexattn_jax/hierarchical.py:10:hr_kv": 350, "flexattn_jax/text.py:21:mlp": 100,
                      "(no source)": 7}
    shares = G.by_function({**cycles, "flexattn_jax/text.py:22:mlp < flexattn_jax/hierarchical.py:12:hr_kv": 43})
    assert shares == {"flexattn_jax/text.py:mlp < flexattn_jax/hierarchical.py:hr_kv": pytest.approx(0.786),
                      "flexattn_jax/text.py:mlp": pytest.approx(0.2), "(no source)": pytest.approx(0.014)}
    assert G.by_file(cycles) == {"flexattn_jax/hierarchical.py": pytest.approx(350 / 457), "flexattn_jax/text.py": pytest.approx(100 / 457),
                                 "(no source)": pytest.approx(7 / 457)}
