"""The grounding term: box -> LR-cell target, the maps' cross-entropy, records with boxes, and a step that trains it."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexattn_jax.app.demo_data import build_demo_tokenizer, make_split
from flexattn_jax.selection import box_cell_counts, grounding_cross_entropy, grounding_target
from flexattn_jax.sharding import make_mesh
from tests.fixtures import TEST_BATCH, TEST_SEQ_LEN, random_params, small_train_config, synthetic_batch, tiny_config
from train.config import DataConfig, TrainConfig
from train.data import TrainData
from train.step import global_batch, loss_sums, make_step, split_microbatches

CFG = tiny_config(flex=dataclasses.replace(tiny_config().flex, first_select_layer=0))  # maps of layers 0 and 1 are used


def test_box_cell_counts_follow_the_square_padding():
    square = box_cell_counts(np.array([14, 14, 28, 28]), (168, 168), 12)
    assert square[1, 1] == 14 * 14 and square.sum() == 14 * 14
    # a 168 x 84 image is padded by 42 px above and below: its top-left 14 px sit in HR row 3 of the square grid
    wide = box_cell_counts(np.array([0, 0, 14, 14]), (168, 84), 12)
    assert wide[3, 0] == 14 * 14 and wide.sum() == 14 * 14
    # a box across a cell border splits its pixels; the target is their share
    split = grounding_target(np.array([35, 0, 49, 14]), (168, 168), 4)
    assert split.shape == (16,) and split[0] == pytest.approx(7 / 14) and split[1] == pytest.approx(7 / 14)
    with pytest.raises(ValueError, match=r"box \[0, 0, 200, 10\].*168x168"):
        box_cell_counts(np.array([0, 0, 200, 10]), (168, 168), 4)


def test_grounding_cross_entropy_by_hand():
    g = 4
    maps = jnp.ones((2, 3, 2, g)) * 0.1  # (L, B, R, G): uniform maps of any scale
    maps = maps.at[1, 0, 0].set(jnp.array([0.7, 0.1, 0.1, 0.1]))
    target = jnp.array([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 0]])  # sample 2 has no box
    valid = jnp.array([[True, True], [True, False], [True, True]])
    total, count = grounding_cross_entropy(maps, target, valid)
    assert int(count) == 2 * 3  # 2 layers x (2 rows of sample 0 + 1 valid row of sample 1)
    assert float(total) == pytest.approx(5 * math.log(4) - math.log(0.7), rel=1e-5)


def test_records_with_boxes_give_targets_and_bad_boxes_are_skipped():
    items = make_split(11, 6, hr_size=84, obj_px=6)
    records = [
        {"id": str(i), "image": img, "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
         "box": meta["bbox"]}
        for i, (img, q, a, meta) in enumerate(items)
    ]
    del records[4]["box"]
    records[1]["box"] = [80, 0, 90, 10]  # outside the 84 px image
    dcfg = DataConfig(max_len=TEST_SEQ_LEN, threads=1, shuffle=False, group_by_length=False)
    data = TrainData(CFG, dcfg, build_demo_tokenizer(), 5, records=records)
    with pytest.warns(UserWarning, match=r"skipping sample '1'.*outside the 84x84 image.*\[bad_box\]"):
        batch = next(data.iterator())
    # (prefetching may already have met sample 1 again in the next epoch: count >= 1)
    assert set(data.stats()["skipped"]) == {"bad_box"} and 1 not in batch["_index"] and 4 in batch["_index"]
    for row, i in zip(batch["grounding"], batch["_index"], strict=True):
        if i == 4:
            assert not row.any()  # no box: no target
            continue
        np.testing.assert_array_equal(row, grounding_target(np.asarray(items[i][3]["bbox"]), (84, 84), CFG.lr_grid))
        assert row.sum() == pytest.approx(1.0)


def _batch_with_targets(cfg):
    b = synthetic_batch(cfg, TEST_BATCH, TEST_SEQ_LEN, seed=3)
    target = np.zeros((TEST_BATCH, cfg.lr_grid**2), np.float32)
    target[:, 0] = 1.0  # every sample's detail in the top-left LR cell
    return {**b, "grounding": target}


@pytest.mark.slow
def test_grounding_term_trains_the_maps_and_leaves_the_loss_metric_alone():
    params = random_params(CFG, seed=0)
    host = _batch_with_targets(CFG)
    mesh = make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])

    def run(weight, steps):
        tcfg = small_train_config(grounding_weight=weight)
        fns = make_step(CFG, tcfg, mesh, tcfg.steps)
        state = fns.init_state(params)
        batch = global_batch(fns, split_microbatches(host, 1))
        out = []
        for _ in range(steps):
            state, m = fns.step(state, batch)
            out.append(jax.device_get(m))
        return out

    grounded = run(1.0, 25)
    sums = loss_sums(params, CFG, host, jnp.float32(0.0), grounding=True)
    assert float(grounded[0]["loss"]) == pytest.approx(float(sums.ce / sums.tokens), rel=1e-5)  # the answers' CE alone
    assert float(grounded[0]["grounding"]) == pytest.approx(float(sums.grounding / sums.grounding_rows), rel=1e-5)
    assert float(grounded[0]["grounding"]) > 0.9 * math.log(CFG.lr_grid**2)  # random init: a near-uniform map
    assert float(grounded[-1]["grounding"]) < 0.5 * float(grounded[0]["grounding"])


def test_grounding_needs_flexattention_and_a_non_negative_weight():
    plain = dataclasses.replace(CFG, flex=dataclasses.replace(CFG.flex, enabled=False))
    mesh = make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="needs FlexAttention"):
        make_step(plain, small_train_config(grounding_weight=0.5), mesh, 10)
    with pytest.raises(ValueError, match="grounding_weight=-1"):
        TrainConfig(grounding_weight=-1.0)


@pytest.mark.slow  # 30 s; gradient accumulation's exactness has its default test in test_train_step.py
def test_grounding_with_gradient_accumulation_equals_one_batch():
    """Both terms are normalised over the whole batch, so two microbatches give the one-batch update."""
    params = random_params(CFG, seed=1)
    host = _batch_with_targets(CFG)
    host["grounding"][1::3] = 0.0  # some samples without a box: the microbatches hold different numbers of targets
    mesh = make_mesh("data=1,fsdp=1,tensor=1", devices=jax.devices()[:1])
    tcfg = small_train_config(grounding_weight=1.0)
    fns = make_step(CFG, tcfg, mesh, tcfg.steps)
    out = []
    for accum in (1, 2):
        state, m = fns.step(fns.init_state(params), global_batch(fns, split_microbatches(host, accum)))
        out.append((jax.device_get(state.params), jax.device_get(m)))
    (p1, m1), (p2, m2) = out
    assert float(m1["grounding"]) == pytest.approx(float(m2["grounding"]), rel=1e-5)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True))
    assert diff < 1e-5, diff
