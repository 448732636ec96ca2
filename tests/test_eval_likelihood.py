"""The option-likelihood scorer (V* release protocol) equals a loop of single-option forwards, and teacher-forced
cached decoding through generation's own prefill and decode steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.eval.likelihood import OptionQuestion, OptionScorer, option_tokens
from flexattn_jax.config import IGNORE_INDEX
from flexattn_jax.generate import decode_step, prefill
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


def _single(params, cfg, ids, labels, pixels, ori):
    """One unpadded forward of one option; the mean token cross-entropy of its labels."""
    ids, labels = ids[None], labels[None]
    n = int((labels[0, 1:] != IGNORE_INDEX).sum())
    r, v, _ = learnable_rows(labels[0], True, n)
    rows, valid = jnp.asarray(r[None]), jnp.asarray(v[None])
    out = _forward(params, cfg, jnp.asarray(ids), jnp.asarray(pixels[None]), jnp.ones(ids.shape, bool),
                  margin=jnp.asarray(margin_patches(np.array([ori]), cfg.lr_grid)), select_rows=rows, select_valid=valid)
    targets = labels[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], jnp.asarray(np.where(targets < 0, 0, targets)))
    m = targets != IGNORE_INDEX
    return float(jnp.sum(jnp.where(m, ce, 0)) / m.sum())


def _score(params, cfg, questions, rows=6):
    got = list(OptionScorer(params, cfg, rows=rows).score(enumerate(questions)))
    return {pos: losses for pos, losses, _, _ in got}, [(pos, real) for pos, _, _, real in got]


@pytest.fixture(scope="module")
def packed(setup):
    """Scorer losses: 6 rows, so questions 0 and 1 (4 + 2 options) share a forward, then question 2
    (3 options) runs with 3 padding rows."""
    params, cfg, tok = setup
    questions = _questions(cfg, tok)
    losses, owners = _score(params, cfg, questions)
    assert owners == [(0, 6), (1, 6), (2, 3)]
    return questions, losses


def test_packed_batches_equal_single_option_forwards(setup, packed):
    params, cfg, tok = setup
    questions, got = packed
    for pos, q in enumerate(questions):
        want = [_single(params, cfg, i, lab, q.pixels, q.ori_size) for i, lab in zip(q.ids, q.labels, strict=True)]
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
    # the option rows see the HR path: other HR projections give other losses
    attn = params["text"]["layers"]["attn"]
    noisy = {**params, "text": {**params["text"], "layers": {**params["text"]["layers"], "attn": {
        **attn, "k_hr": {"kernel": jnp.asarray(np.random.default_rng(1).normal(0, 0.3, attn["k_hr"]["kernel"].shape),
                                               attn["k_hr"]["kernel"].dtype)}}}}}
    other, _ = _score(noisy, cfg, questions[:1], rows=4)
    assert np.abs(np.subtract(other[0], losses[0])).max() > 1e-3


def test_too_many_options_for_the_batch(setup):
    params, cfg, tok = setup
    q = _questions(cfg, tok)[0]
    with pytest.raises(ValueError, match="use --batch-size 4 or more"):
        list(OptionScorer(params, cfg, rows=2).score([(0, q)]))


def test_data_parallel_scorer_equals_one_device(setup, packed):
    from flexattn_jax.sharding import make_mesh

    params, cfg, _ = setup
    questions, losses = packed
    got = {pos: x for pos, x, _, _ in OptionScorer(params, cfg, rows=8, mesh=make_mesh("data=8"))
           .score(enumerate(questions))}
    for pos in range(len(questions)):
        np.testing.assert_allclose(got[pos], losses[pos], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="not a multiple of the mesh's data axis"):
        OptionScorer(params, cfg, rows=6, mesh=make_mesh("data=8"))


# ---- two independent paths: the scorer's losses = teacher-forced decoding through generation's own steps ----

_prefill = jax.jit(prefill, static_argnames=("cfg", "max_len", "hr_strategy"))
_decode = jax.jit(decode_step, static_argnames=("cfg",))
BUDGETS = {"K=M": None, "K<M": 6, "adaptive": "adaptive"}
FAST = [("cache", "K<M")]  # the default run's twin (a K < M budget that truncates); -m slow runs the other eight pairs
FULL = [(s, b) for s in ("project", "cache", "incremental") for b in BUDGETS if (s, b) not in FAST]


def _teacher_forced(params, cfg, q: OptionQuestion, strategy: str) -> np.ndarray:
    """Per option: the mean cross-entropy of its tokens when generation's prefill runs the prompt and its
    decode steps are fed the option's tokens one at a time (each the select row of its own step)."""
    n = int(np.argmax(q.labels[0] != IGNORE_INDEX))  # the prompt's length, shared by the options
    assert all(np.array_equal(ids[:n], q.ids[0][:n]) for ids in q.ids)
    answers = [ids[n:] for ids in q.ids]
    b, lens = len(answers), np.array([len(a) for a in answers])
    prompt = np.repeat(q.ids[0][None, :n], b, 0)
    margin = margin_patches(np.array([q.ori_size] * b), cfg.lr_grid)
    state, logits, _ = _prefill(params, cfg, jnp.asarray(prompt), jnp.asarray(np.repeat(q.pixels[None], b, 0)),
                                jnp.ones(prompt.shape, bool), jnp.asarray(margin), max_len=n + int(lens.max()), hr_strategy=strategy)
    total = np.zeros(b)
    for j in range(int(lens.max())):
        token = np.array([a[j] if j < len(a) else cfg.pad_token_id for a in answers], np.int32)
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
        total -= np.where(j < lens, logp[np.arange(b), token], 0.0)
        if j + 1 < lens.max():
            state, logits, _ = _decode(params, cfg, state, jnp.asarray(token))
    return total / lens


@pytest.fixture(scope="module")
def scored(setup):
    """Scorer losses per budget (computed once per budget)."""
    params, cfg, tok = setup
    questions, cache = _questions(cfg, tok), {}

    def get(budget: str):
        if budget not in cache:
            c = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_budget=BUDGETS[budget]))
            cache[budget] = (c, _score(params, c, questions)[0])
        return cache[budget]

    return questions, get


def _check_teacher_forced(setup, scored, strategy, budget):
    params, _, _ = setup
    questions, get = scored
    cfg, losses = get(budget)
    rel = 0.0
    for pos, q in enumerate(questions):
        want = _teacher_forced(params, cfg, q, strategy)
        rel = max(rel, float(np.max(np.abs(np.asarray(losses[pos]) - want) / np.abs(want))))
        np.testing.assert_allclose(losses[pos], want, rtol=2e-5, atol=1e-6)
    print(f"teacher-forced vs likelihood ({strategy}, {budget}): max rel diff {rel:.2e}")


@pytest.mark.parametrize(("strategy", "budget"), FAST)
def test_likelihood_equals_teacher_forced_decoding(setup, scored, strategy, budget):
    _check_teacher_forced(setup, scored, strategy, budget)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "budget"), FULL)
def test_likelihood_equals_teacher_forced_decoding_all_pairs(setup, scored, strategy, budget):
    _check_teacher_forced(setup, scored, strategy, budget)


def test_budget_below_m_truncates(setup, scored):
    """K < M really drops selected tokens here, so that budget's agreement is not K = M's in disguise."""
    _, get = scored
    for pos in range(len(OPTIONS)):
        assert np.abs(np.subtract(get("K<M")[1][pos], get("K=M")[1][pos])).max() > 1e-4
