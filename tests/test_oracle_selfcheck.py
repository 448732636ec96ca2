"""Fast self-checks of the torch FlexAttention oracle (tests/oracle.py) on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.oracle import OracleFlexConfig, oracle_forward, oracle_generate, select_hr_mask
from tests.torch_models import make_hd_weights, make_images, make_prompt, make_tiny_llava

LAYERS = 4
ORI = [(400, 200)]  # wide image: one padded band row at top and bottom of the 4x4 map


@pytest.fixture(scope="module")
def tiny():
    """Model, HD weights, prompt ids (1, 27), HR pixels (1, 3, 168, 168)."""
    model = make_tiny_llava(gqa=True, layers=LAYERS, seed=0)
    return model, make_hd_weights(model, seed=1), make_prompt(model, 5, 6, seed=0), make_images(1, 168, seed=0)


def _cfg(**kw) -> OracleFlexConfig:
    return OracleFlexConfig(lowres_size=56, highres_size=168, **kw)


PLAIN = dict(first_select_layer=LAYERS - 1)  # no hierarchical layer


def test_plain_matches_hf(tiny):
    """(a) HR path disabled: logits and hidden states equal transformers' own LLaVA forward."""
    model, hw, ids, px = tiny
    out = oracle_forward(model, hw, _cfg(**PLAIN), ids, px, ORI)
    lr = F.interpolate(px, size=56, mode="bilinear", antialias=True)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=lr, output_hidden_states=True)
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-5, rtol=0)
    for a, b in zip(out["hidden_states"][:-1], ref.hidden_states[:-1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert set(out["masks"][0]) == {LAYERS - 1}  # the last layer still makes an (unused) mask


def test_plain_left_padding_matches_hf(tiny):
    """(a') Left-padded batch (image + text-only sample): valid rows equal HF with positions cumsum(mask)-1."""
    model, hw, ids, px = tiny
    n = ids.shape[1]
    text = torch.randint(1, 100, (1, n - 9), generator=torch.Generator().manual_seed(5))
    batch = torch.cat(
        [torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.cat([torch.zeros(1, 12, dtype=torch.long), text], 1)]
    )
    am = (torch.arange(n + 3)[None] >= torch.tensor([[3], [12]])).long()
    out = oracle_forward(model, hw, _cfg(**PLAIN), batch, px, ORI, attention_mask=am)
    lr = F.interpolate(px, size=56, mode="bilinear", antialias=True)
    pos = (am.cumsum(1) - 1).masked_fill(am == 0, 1)
    with torch.no_grad():
        ref = model(input_ids=batch, pixel_values=lr, attention_mask=am, position_ids=pos).logits
    valid = am.bool()
    torch.testing.assert_close(out["logits"][valid], ref[valid], atol=1e-5, rtol=0)
    assert out["masks"][1] == {}  # text-only sample: no HR path


def test_nothing_selected_equals_plain(tiny):
    """(b) K = M and threshold 256 (no map passes): hierarchical layers reproduce plain attention."""
    model, hw, ids, px = tiny
    plain = oracle_forward(model, hw, _cfg(**PLAIN), ids, px, ORI)
    hier = oracle_forward(model, hw, _cfg(first_select_layer=1, threshold=256.0, hr_budget=144), ids, px, ORI)
    assert sorted(hier["masks"][0]) == [1, 2, 3]
    assert all(not m.any() for m in hier["masks"][0].values())
    torch.testing.assert_close(hier["logits"], plain["logits"], atol=1e-5, rtol=0)


def test_hr_changes_output(tiny):
    """Attention selection at threshold 64 selects something and changes only the select (last) row."""
    model, hw, ids, px = tiny
    plain = oracle_forward(model, hw, _cfg(**PLAIN), ids, px, ORI)
    hier = oracle_forward(model, hw, _cfg(first_select_layer=1), ids, px, ORI)
    assert hier["rows"][0].tolist() == [ids.shape[1] - 1]
    assert all(0 < int(m.sum()) < 144 for m in hier["masks"][0].values())
    torch.testing.assert_close(hier["logits"][:, :-1], plain["logits"][:, :-1], atol=1e-5, rtol=0)
    assert (hier["logits"][:, -1] - plain["logits"][:, -1]).abs().max() > 1e-3


def test_paper_all_deterministic_and_differs(tiny):
    """(c) selection='all' + hr_mode='paper': deterministic, every row sees all HR tokens, differs from plain."""
    model, hw, ids, px = tiny
    cfg = _cfg(first_select_layer=1, selection="all", hr_mode="paper")
    a = oracle_forward(model, hw, cfg, ids, px, ORI)
    b = oracle_forward(model, hw, cfg, ids, px, ORI)
    plain = oracle_forward(model, hw, _cfg(**PLAIN), ids, px, ORI)
    assert torch.equal(a["logits"], b["logits"])
    assert all(m.all() and m.shape == (ids.shape[1], 144) for m in a["masks"][0].values())
    assert (a["logits"] - plain["logits"]).abs().amax(-1).min() > 1e-3  # every row changed


def test_generate_first_token_matches_forward(tiny):
    """(d) Cached generation's first step equals the forward's last row."""
    model, hw, ids, px = tiny
    cfg = _cfg(first_select_layer=1)
    fwd = oracle_forward(model, hw, cfg, ids, px, ORI)
    gen = oracle_generate(model, hw, cfg, ids, px, ORI, max_new_tokens=3)
    assert len(gen["tokens"]) == len(gen["step_logits"]) == len(gen["step_masks"]) == 3
    assert gen["tokens"][0] == int(fwd["logits"][0, -1].argmax())
    torch.testing.assert_close(gen["step_logits"][0], fwd["logits"][0, -1], atol=1e-5, rtol=0)
    for li, m in fwd["masks"][0].items():
        assert torch.equal(gen["step_masks"][0][li], m)


def test_paper_generate_equals_full_forward(tiny):
    """In the 'paper' variant cached decoding equals re-running the forward on the longer sequence."""
    model, hw, ids, px = tiny
    cfg = _cfg(first_select_layer=1, hr_mode="paper")
    gen = oracle_generate(model, hw, cfg, ids, px, ORI, max_new_tokens=3)
    longer = torch.cat([ids, torch.tensor([gen["tokens"][:2]])], 1)
    fwd = oracle_forward(model, hw, cfg, longer, px, ORI)
    for t in range(3):
        torch.testing.assert_close(gen["step_logits"][t], fwd["logits"][0, ids.shape[1] - 1 + t], atol=1e-4, rtol=0)


def test_release_generate_differs_from_full_forward(tiny):
    """In the release variant a generated token's cached K/V carry HR information (spec: not a full re-run)."""
    model, hw, ids, px = tiny
    cfg = _cfg(first_select_layer=1)
    gen = oracle_generate(model, hw, cfg, ids, px, ORI, max_new_tokens=3)
    longer = torch.cat([ids, torch.tensor([gen["tokens"][:2]])], 1)
    fwd = oracle_forward(model, hw, cfg, longer, px, ORI)
    torch.testing.assert_close(gen["step_logits"][0], oracle_forward(model, hw, cfg, ids, px, ORI)["logits"][0, -1])
    assert (gen["step_logits"][2] - fwd["logits"][0, -1]).abs().max() > 1e-4


def test_left_padding_invariance(tiny):
    """A left-padded image sample gives the same logits and masks as the same sample unpadded."""
    model, hw, ids, px = tiny
    cfg = _cfg(first_select_layer=1)
    ref = oracle_forward(model, hw, cfg, ids, px, ORI)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    am = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    out = oracle_forward(model, hw, cfg, padded, px, ORI, attention_mask=am)
    torch.testing.assert_close(out["logits"][:, 4:], ref["logits"], atol=1e-5, rtol=0)
    assert all(torch.equal(out["masks"][0][k], ref["masks"][0][k]) for k in ref["masks"][0])


def test_training_rows_and_alpha(tiny):
    """Training: select rows are label positions - 1, one mask per row; alpha=0 reproduces plain logits."""
    model, hw, ids, px = tiny
    n = ids.shape[1]
    labels = torch.full_like(ids, -100)
    labels[0, n - 5 : n - 3] = 3
    labels[0, n - 1] = 4
    cfg = _cfg(first_select_layer=1)
    out = oracle_forward(model, hw, cfg, ids, px, ORI, labels=labels, alpha=0.0)
    assert out["rows"][0].tolist() == [n - 6, n - 5, n - 2]
    assert all(m.shape == (3, 144) for m in out["masks"][0].values())
    plain = oracle_forward(model, hw, _cfg(**PLAIN), ids, px, ORI)
    torch.testing.assert_close(out["logits"], plain["logits"], atol=1e-5, rtol=0)
    full = oracle_forward(model, hw, cfg, ids, px, ORI, labels=labels, alpha=1.0)
    assert (full["logits"][0, n - 2] - plain["logits"][0, n - 2]).abs().max() > 1e-3


def test_select_hr_mask_semantics():
    """Margin zeroing, min-max + threshold, pool 4->9 with overlapping bins, nearest upsample, top-K ties, NaN maps."""
    g, side = 4, 12
    amap = torch.zeros(2, g, g)
    amap[0, 0, 0] = 5.0  # in the top band: zeroed for a wide image
    amap[0, 1, 2] = 1.0
    amap[0, 2, 1] = 0.5
    # row 1 stays all zero: constant map (after margin zeroing) -> NaN after min-max -> nothing selected
    cfg = OracleFlexConfig(lowres_size=56, highres_size=168, threshold=64.0)
    mask, score = select_hr_mask(amap.flatten(1), (400, 200), cfg, side)
    assert mask.shape == (2, side * side) and not mask[1].any()
    hot = {(1, 2), (2, 1)}  # cells over the threshold after zeroing the band and min-max
    pooled = torch.zeros(9, 9)
    for i in range(9):
        for j in range(9):  # PyTorch adaptive bins: [floor(i*g/9), ceil((i+1)*g/9))
            cells = {(r, c) for r in range(i * g // 9, -(-(i + 1) * g // 9)) for c in range(j * g // 9, -(-(j + 1) * g // 9))}
            pooled[i, j] = float(bool(cells & hot))
    expect = pooled[torch.arange(side) * 9 // side][:, torch.arange(side) * 9 // side].flatten().bool()
    assert torch.equal(mask[0], expect)
    k = 10
    cfg_k = OracleFlexConfig(lowres_size=56, highres_size=168, threshold=64.0, hr_budget=k)
    mask_k, _ = select_hr_mask(amap.flatten(1), (400, 200), cfg_k, side)
    kept = mask_k[0].nonzero().flatten()
    assert kept.numel() == k and bool(mask[0][kept].all())
    # the kept ones have the top scores; among equal scores the lowest indices win
    sel = mask[0].nonzero().flatten()
    order = sorted(sel.tolist(), key=lambda t: (-float(score[0, t]), t))
    assert kept.tolist() == sorted(order[:k])
