"""The adaptive HR budget (issue 16): exactly K = M's tokens, logits and masks, at the cost of the rung taken.

Selections are steered through the inputs so that one compiled program serves every case: the
margin (an input) zeroes bands of the LR attention map, ``[2, 0]`` all of it on the tiny model's
4 x 4 grid (a constant map: nothing selected), ``[1, 1]`` all but a small central region; no margin
leaves most of the image. Threshold 128 makes the selection sizes vary from step to step and layer
to layer, so the run takes every rung of the ladder (asserted).
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.generate import generate
from flexattn_jax.model import forward
from flexattn_jax.overrides import apply_overrides, parse_hr_budget
from flexattn_jax.selection import compact, margin_patches, rungs_taken, selection_mask

from .jax_models import tiny_flex_model
from .oracle import OracleFlexConfig, oracle_forward, oracle_generate
from .torch_models import make_images, make_prompt

STEPS = 8
THRESHOLD = 128.0
ORACLE = OracleFlexConfig(lowres_size=56, highres_size=168, first_select_layer=1, threshold=THRESHOLD)
# per call, the two samples' margins (rows, cols zeroed at each side of the 4 x 4 LR map) and the original
# sizes the oracle derives the same margins from (None: no original size gives it)
CALLS = {
    "nothing": ([[2, 0], [2, 0]], None),
    "small": ([[1, 1], [2, 0]], None),
    "most": ([[0, 0], [1, 0]], [(300, 300), (400, 200)]),
}


def _budget(cfg: ModelConfig, budget) -> ModelConfig:
    return dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=budget))


@pytest.fixture(scope="module")
def setup():
    """The tiny model, a left-padded batch of two prompts, and ``run(budget, strategy, call)`` (memoised)."""
    model, hd, params, cfg = tiny_flex_model(threshold=THRESHOLD)
    a, b = make_prompt(model, 5, 6, seed=1), make_prompt(model, 2, 4, seed=2)
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=b.dtype), b], 1)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :pad] = False
    pix = make_images(2, 168, seed=3)
    inputs = (jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)), jnp.asarray(mask.numpy()))

    @functools.cache
    def run(budget, strategy: str, call: str):
        with jax.default_matmul_precision("highest"):
            return generate(params, _budget(cfg, budget), *inputs, jnp.asarray(CALLS[call][0], jnp.int32), max_new_tokens=STEPS,
                            hr_strategy=strategy, return_logits=True, return_step_maps=True)

    return SimpleNamespace(model=model, hd=hd, params=params, cfg=cfg, inputs=inputs, prompts=(a, b), pixels=pix, run=run)


def _all_masks(out) -> np.ndarray:
    """(steps + 1, L, B, M): the prefill's masks, then each decode step's."""
    return np.concatenate([np.asarray(out.prefill_maps.hr_masks)[None], np.asarray(out.step_maps.hr_masks)])


@pytest.mark.parametrize("strategy", [pytest.param("project", marks=pytest.mark.slow), pytest.param("cache", marks=pytest.mark.slow),
                                      "incremental"])  # the fast twin: the strategy with the most state (its cache)
def test_adaptive_equals_k_equals_m_in_every_rung_one_compile(setup, strategy):
    """Left-padded batches landing in every rung: tokens, per-step logits and per-layer masks of K = M, one compile."""
    cfg = _budget(setup.cfg, "adaptive")
    taken = set()
    for call in CALLS:
        setup.run(None, "project", call)  # the reference first: its compile is not counted
    before = generate._cache_size()
    for call in CALLS:
        ref, out = setup.run(None, "project", call), setup.run("adaptive", strategy, call)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=call)
        want = np.asarray(ref.step_logits)
        assert np.abs(np.asarray(out.step_logits) - want).max() <= 1e-5 * np.abs(want).max(), call
        np.testing.assert_array_equal(_all_masks(out), _all_masks(ref), err_msg=call)
        taken |= set(np.asarray(rungs_taken(cfg, _all_masks(out))).ravel().tolist())
    assert generate._cache_size() - before == 1  # one compile for the bucket, whichever rungs run
    assert taken == set(range(len(cfg.hr_rungs))), (taken, cfg.hr_rungs)  # every rung, from 'nothing selected' to all M
    counts = _all_masks(setup.run("adaptive", strategy, "nothing")).sum(-1)
    assert not counts.any()  # the constant map selects nothing


def test_adaptive_matches_release_oracle(setup):
    """Each sample of the left-padded batch against the release oracle run alone (batch 1, no padding)."""
    model, hd, (a, b), pix = setup.model, setup.hd, setup.prompts, setup.pixels
    out = setup.run("adaptive", "project", "most")
    for i, (ids, ori) in enumerate(zip((a, b), CALLS["most"][1], strict=True)):
        with torch.no_grad():
            ref = oracle_generate(model, hd, ORACLE, ids, pix[i: i + 1], [ori], max_new_tokens=STEPS)
        assert np.asarray(out.tokens[i]).tolist() == list(ref["tokens"])
        for step, want in enumerate(ref["step_logits"]):
            got = np.asarray(out.step_logits[step, i])
            assert np.abs(got - want.numpy()).max() <= 1e-5 * np.abs(want.numpy()).max(), f"sample {i} step {step}"
        for layer, m in ref["step_masks"][0].items():
            np.testing.assert_array_equal(np.asarray(out.prefill_maps.hr_masks[layer, i]), m.numpy()[-1])
        for step, masks in enumerate(ref["step_masks"][1:]):
            for layer, m in masks.items():
                np.testing.assert_array_equal(np.asarray(out.step_maps.hr_masks[step, layer, i]), m.numpy()[0])


@pytest.mark.parametrize("budget", ["adaptive", 30])
def test_training_rows_match_oracle(setup, budget):
    """Many select rows (the learnable rows of training): the adaptive switch (rungs with R x K < M) and a
    fixed K < M with R x K >= M (all M projected once, the selection as a mask) both equal the oracle."""
    model, hd = setup.model, setup.hd
    cfg = _budget(dataclasses.replace(setup.cfg, flex=dataclasses.replace(setup.cfg.flex, threshold=64.0)), budget)
    ids = make_prompt(model, 4, 10)
    labels = torch.full_like(ids, -100)
    labels[0, -8:-5] = ids[0, -8:-5]
    labels[0, -3:] = ids[0, -3:]
    rows = np.nonzero(labels[0, 1:].numpy() != -100)[0][None].astype(np.int32)  # R = 6 rows
    oc = dataclasses.replace(ORACLE, threshold=64.0, hr_budget=None if budget == "adaptive" else budget)
    pix = make_images(1, 168)
    if budget == "adaptive":
        assert [k for k in cfg.hr_rungs if rows.shape[1] * k < cfg.num_hr_tokens] == [9, 18]  # two switched rungs + all M
    else:
        assert rows.shape[1] * cfg.hr_budget_tokens >= cfg.num_hr_tokens
    with torch.no_grad():
        ref = oracle_forward(model, hd, oc, ids, pix, [(400, 260)], labels=labels, alpha=0.3)
    with jax.default_matmul_precision("highest"):
        out = forward(setup.params, cfg, jnp.asarray(ids.numpy()), jnp.asarray(pix.numpy().transpose(0, 2, 3, 1)),
                      margin=jnp.asarray(margin_patches(np.array([(400, 260)]), cfg.lr_grid)), select_rows=jnp.asarray(rows),
                      alpha=0.3, return_maps=True)
    rl = ref["logits"].numpy()
    assert np.abs(rl - np.asarray(out.logits)).max() <= 1e-5 * np.abs(rl).max()
    for layer, m in ref["masks"][0].items():
        np.testing.assert_array_equal(np.asarray(out.hr_masks[layer, 0])[: m.shape[0]], m.numpy(), err_msg=f"layer {layer}")


# ---- pieces ---------------------------------------------------------------------------------------

def test_compact_keeps_every_selected_token_in_order():
    rng = np.random.default_rng(0)
    mask = rng.random((3, 2, 50)) < np.array([0.0, 0.1, 0.3])[:, None, None]
    k = int(mask.sum(-1).max())
    sel = compact(jnp.asarray(mask), k)
    np.testing.assert_array_equal(np.asarray(selection_mask(sel, 50)), mask)
    idx, valid = np.asarray(sel.index), np.asarray(sel.valid)
    for b in range(3):
        for r in range(2):
            assert idx[b, r][valid[b, r]].tolist() == np.nonzero(mask[b, r])[0].tolist()


def test_ladder_config_and_cli_parse(setup):
    cfg = setup.cfg
    ad = _budget(cfg, "adaptive")
    assert ad.hr_rungs == (9, 18, 36, 72, 144) and ad.hr_budget_tokens == 144
    assert apply_overrides(ad, ["flex.hr_ladder=[0.5, 0.25]"]).hr_rungs == (36, 72, 144)  # M is always the top rung
    assert ModelConfig.from_dict(ad.to_dict()) == ad and hash(ModelConfig.from_dict(ad.to_dict()))  # JSON lists -> tuple
    assert [parse_hr_budget(x) for x in ("all", "adaptive", "0.1", "20")] == [None, "adaptive", 0.1, 20]
    for bad in ("most", "1.5", "0"):
        with pytest.raises(ConfigError, match="--hr-budget"):
            parse_hr_budget(bad, name="--hr-budget")
    with pytest.raises(ConfigError, match="flex.hr_budget 'adaptve'"):
        apply_overrides(cfg, ["flex.hr_budget=adaptve"])
    with pytest.raises(ConfigError, match="flex.hr_ladder"):
        apply_overrides(cfg, ["flex.hr_ladder=[0.5, 2]"])
    from flexattn_jax.app.generate_cli import generate_parser

    assert "adaptive" in generate_parser().format_help()
