"""The option-likelihood scorer (V* release protocol) equals a loop of single-option forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.eval.likelihood import OptionQuestion, OptionScorer, option_tokens
from flexattn_jax.config import IGNORE_INDEX
from flexattn_jax.model import forward
from flexattn_jax.preprocess import format_prompt, preprocess_image
from flexattn_jax.selection import learnable_rows, margin_patches
from tests.fixtures import random_params, tiny_config

# one question about three images, options of one or two of the tiny tokenizer's words: few shapes to compile
QUESTION = "what is the small square?"
OPTIONS = [["yes", "no", "small square", "image"], ["square", "pattern"], ["picture", "small image", "no"]]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    return random_params(cfg, seed=3, std=0.3), cfg, build_demo_tokenizer()


def _questions(cfg, tok):
    rng = np.random.default_rng(0)
    out = []
    for n, options in enumerate(OPTIONS):
        from PIL import Image

        img = Image.fromarray(rng.integers(0, 256, (20 + 7 * n, 30, 3), dtype=np.uint8))
        pixels, ori = preprocess_image(img, cfg.image_size)
        prompt = format_prompt(QUESTION + "\nAnswer the question using a single word or phrase.")
        toks = [option_tokens(prompt, o, tok, cfg) for o in options]
        out.append(OptionQuestion([i for i, _ in toks], [lab for _, lab in toks], pixels, ori))
    return out


_forward = jax.jit(forward, static_argnames=("cfg",))


def _single(params, cfg, ids, labels, pixels, ori, mode):
    """One unpadded forward of one option; the mean token cross-entropy of its labels."""
    ids, labels = ids[None], labels[None]
    rows = valid = None
    if mode == "release":
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        r, v, _ = learnable_rows(labels[0], True, n)
        rows, valid = jnp.asarray(r[None]), jnp.asarray(v[None])
    out = _forward(params, cfg, jnp.asarray(ids), jnp.asarray(pixels[None]), jnp.ones(ids.shape, bool),
                  margin=jnp.asarray(margin_patches(np.array([ori]), cfg.lr_grid)), select_rows=rows, select_valid=valid)
    targets = labels[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], jnp.asarray(np.where(targets < 0, 0, targets)))
    m = targets != IGNORE_INDEX
    return float(jnp.sum(jnp.where(m, ce, 0)) / m.sum())


@pytest.fixture(scope="module")
def packed(setup):
    """Scorer losses per mode: 6 rows, so questions 0 and 1 (4 + 2 options) share a forward, then question 2
    (3 options) runs with 3 padding rows."""
    params, cfg, tok = setup
    questions = _questions(cfg, tok)
    out = {}
    for mode in ("release", "inference"):
        got = list(OptionScorer(params, cfg, rows=6, mode=mode).score(enumerate(questions)))
        assert [(pos, real) for pos, _, _, real in got] == [(0, 6), (1, 6), (2, 3)]
        out[mode] = {pos: losses for pos, losses, _, _ in got}
    return questions, out


@pytest.mark.parametrize("mode", ["release", "inference"])
def test_packed_batches_equal_single_option_forwards(setup, packed, mode):
    params, cfg, tok = setup
    questions, losses = packed
    got = losses[mode]
    for pos, q in enumerate(questions):
        want = [_single(params, cfg, i, lab, q.pixels, q.ori_size, mode) for i, lab in zip(q.ids, q.labels, strict=True)]
        np.testing.assert_allclose(got[pos], want, rtol=2e-5, atol=2e-5)
        assert len(set(np.round(want, 4))) == len(want)  # the options are told apart


def test_select_rows_matter_and_labels_are_the_option(setup, packed):
    params, cfg, tok = setup
    questions, losses = packed
    q = questions[0]
    prompt_len = len(q.ids[0]) - int((q.labels[0] != IGNORE_INDEX).sum())
    for ids, lab in zip(q.ids, q.labels, strict=True):
        assert (lab[:prompt_len] == IGNORE_INDEX).all() and (lab[prompt_len:] == ids[prompt_len:]).all()
    assert tok.decode(q.ids[2][prompt_len:]).strip() == "small square"
    assert len(q.ids[2]) == prompt_len + 2 and len(q.ids[0]) == prompt_len + 1
    # the release's learnable rows select other HR tokens than the last row does
    assert not np.allclose(losses["release"][0], losses["inference"][0])


def test_too_many_options_for_the_batch(setup):
    params, cfg, tok = setup
    q = _questions(cfg, tok)[0]
    with pytest.raises(ValueError, match="use --batch-size 4 or more"):
        list(OptionScorer(params, cfg, rows=2).score([(0, q)]))


def test_data_parallel_scorer_equals_one_device(setup, packed):
    from flexattn_jax.sharding import make_mesh

    params, cfg, _ = setup
    questions, losses = packed
    got = {pos: x for pos, x, _, _ in OptionScorer(params, cfg, rows=8, mode="release", mesh=make_mesh("data=8"))
           .score(enumerate(questions))}
    for pos in range(len(questions)):
        np.testing.assert_allclose(got[pos], losses["release"][pos], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="not a multiple of the mesh's data axis"):
        OptionScorer(params, cfg, rows=6, mesh=make_mesh("data=8"))
