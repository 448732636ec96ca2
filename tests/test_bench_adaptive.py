"""bench/adaptive.py on the tiny config: per-rung FLOPs, the rung mix, the staircase, the goals, the plot (no timed assertions)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import adaptive, cli, common


@pytest.fixture(scope="module")
def rung_flops():
    return adaptive.rung_flops(common.smoke_config(), strategies=("project",), prompt_len=8, answer_tokens=4)


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_rung_flops_grow_with_k_and_mix(rung_flops):
    rf = rung_flops
    per = rf["per_rung"]["project"]
    pre = [per[str(k)][0] for k in rf["rungs"]]
    step = [per[str(k)][1] for k in rf["rungs"]]
    assert rf["rungs"][-1] == rf["M"] and len(rf["rungs"]) == 5
    assert all(np.diff(pre) > 0) and all(np.diff(step) > 0)  # the HR projections and attention follow K
    lh = 2  # tiny: 4 layers, selection at layer 1
    a, b = adaptive.mix_flops(rf, "project", np.array([0, 4]), np.array([[1, 1], [2, 3]]))
    assert a == pytest.approx((pre[0] + pre[4]) / lh)  # a layer at rung 0 and one at M: the mean of the two programs
    assert b == pytest.approx(a + step[1] + (step[2] + step[3]) / 2)
    rows = adaptive.synthetic_rows(rf, "project", np.linspace(0, 1, 17), answer_tokens=4)
    ratios = [e["A_ratio"] for e in rows]
    assert all(np.diff(ratios) >= 0) and ratios[0] < ratios[-1] == pytest.approx(rows[-1]["flex_M_A_ratio"])
    assert rows[0]["rung"] == rf["rungs"][0] and rows[-1]["rung"] == rf["M"]
    assert next(e for e in rows if e["fraction"] == 0.25)["rung"] == rf["rungs"][2]  # M/4 holds a quarter of M


@pytest.mark.slow  # a benchmark end to end; its arithmetic is tested fast elsewhere
def test_goals_and_plot(rung_flops, tmp_path):
    from PIL import Image

    syn = adaptive.synthetic_rows(rung_flops, "project", np.linspace(0, 1, 9), answer_tokens=4)
    sweep = [{"margin": m, "batch": 1, "fraction": f, "prefill_rungs": [9, 9], "same_tokens_as_flex_M": True,
              "flops_7b_A_ratio": r, "flops_7b_B_ratio": r, f"{adaptive.NAME}/project_time_ratio": t, "flex-M/project_time_ratio": 0.9,
              "flex-0.1M/project_time_ratio": 0.6} for m, f, r, t in ((0, 1.0, 0.9, 0.95), (3, 0.2, 0.6, 0.65))]
    res = {"rung_flops_7b": rung_flops, "synthetic": {"project": syn}, "sweep": sweep}
    gs = [g for g in cli.goals({"adaptive": res}) if "adaptive" in g["goal"]]
    assert len(gs) == 3
    assert gs[1]["measured"] == 0.65 and gs[1]["met"] and gs[2]["met"]
    assert gs[0]["measured"] == max(e["A_ratio"] for e in syn if e["fraction"] <= 0.25)
    with Image.open(adaptive.plot(res, tmp_path / "adaptive.png")) as im:
        assert im.format == "PNG" and im.size[0] > 600
    assert "| 3 | 0.200 |" in adaptive.format_table(res)


@pytest.mark.slow
def test_adaptive_table_tiny_end_to_end():
    res = adaptive.adaptive_table(common.smoke_config(), common.smoke_config("float32"), prompt_len_7b=8, answer_tokens=4, repeats=1,
                                  progress=False, margins=(0, 2), training_rows=4)
    assert [e["margin"] for e in res["sweep"]] == [0, 2]
    assert all(e["same_tokens_as_flex_M"] for e in res["sweep"])
    assert res["sweep"][1]["fraction"] == 0.0 and res["sweep"][1]["prefill_rungs"][0] == res["rung_flops_7b"]["rungs"][0]
    tm = res["training_hr_memory"]
    assert tm["per_row_projection"]["temp_bytes"] > 0 and tm["all_M_and_mask"]["temp_bytes"] > 0
