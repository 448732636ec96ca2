"""Jitted batched generation (issue 6): transformers' greedy ``generate``, batch invariance, compiles, data parallel."""

from __future__ import annotations

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.inference import Request, answer
from flexattn_jax.generate import generate
from flexattn_jax.preprocess import pad_batch
from flexattn_jax.selection import margin_patches
from flexattn_jax.sharding import make_mesh

from .jax_models import convert_torch_model, tiny_flex_model
from .torch_models import make_images, make_prompt, make_tiny_llava

NEW_TOKENS = 8


def _left_padded(prompts: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    return pad_batch(prompts, length, pad_id=pad_id, side="left")


def test_greedy_generation_matches_transformers_generate():
    """Plain LLaVA, batch of 3 prompts of different lengths (left padding): the same 8 tokens as torch's generate."""
    model = make_tiny_llava(layers=3, seed=5)
    params, cfg = convert_torch_model(model)
    prompts = [make_prompt(model, nb, na, seed=s)[0].numpy() for s, (nb, na) in enumerate([(5, 6), (1, 2), (3, 9)])]
    ids, mask = _left_padded(prompts, max(len(p) for p in prompts), cfg.pad_token_id)
    pix = make_images(3, 56, seed=7).numpy()
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            pixel_values=torch.tensor(pix), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
        )[:, ids.shape[1]:].numpy()
    assert ref.shape == (3, NEW_TOKENS)
    with jax.default_matmul_precision("highest"):
        out = generate(params, cfg, jnp.asarray(ids), jnp.asarray(pix.transpose(0, 2, 3, 1)), jnp.asarray(mask),
                       max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert len({tuple(r) for r in ref}) == 3  # the samples really differ


@pytest.fixture(scope="module")
def flex_tiny():
    """The tiny transformers LLaVA with random HR projections, FlexAttention on (zoom 3: M = 144)."""
    model, _, params, cfg = tiny_flex_model()
    return model, params, cfg


def _flex_batch(model, cfg, specs, bucket):
    """Left-padded ids/mask, pixels and margins for prompts ``(n_before, n_after, seed, original size)``."""
    prompts = [make_prompt(model, nb, na, seed=s)[0].numpy() for nb, na, s, _ in specs]
    ids, mask = _left_padded(prompts, bucket, cfg.pad_token_id)
    pix = np.concatenate([make_images(1, 168, seed=s).numpy() for _, _, s, _ in specs]).transpose(0, 2, 3, 1)
    margin = margin_patches(np.array([ori for *_, ori in specs]), cfg.lr_grid)
    return tuple(jnp.asarray(a) for a in (ids, pix, mask, margin))


@pytest.mark.slow
def test_sample_does_not_depend_on_batch_or_bucket(flex_tiny):
    """FlexAttention on: a sample alone in bucket 64 and among 2 longer ones in bucket 128 gets the same tokens, logits, masks."""
    model, params, cfg = flex_tiny
    me = (5, 6, 11, (400, 260))
    others = [(40, 50, 12, (150, 500)), (60, 30, 13, (300, 300))]  # 106 tokens each: bucket 128
    kw = dict(max_new_tokens=NEW_TOKENS, return_logits=True, return_step_maps=True)
    with jax.default_matmul_precision("highest"):
        alone = generate(params, cfg, *_flex_batch(model, cfg, [me], 64), **kw)
        mixed = generate(params, cfg, *_flex_batch(model, cfg, [others[0], me, others[1]], 128), **kw)
    np.testing.assert_array_equal(np.asarray(mixed.tokens[1]), np.asarray(alone.tokens[0]))
    a, m = np.asarray(alone.step_logits[:, 0]), np.asarray(mixed.step_logits[:, 1])
    assert np.abs(a - m).max() <= 1e-5 * np.abs(a).max()
    np.testing.assert_array_equal(np.asarray(mixed.prefill_maps.hr_masks[:, 1]), np.asarray(alone.prefill_maps.hr_masks[:, 0]))
    np.testing.assert_array_equal(np.asarray(mixed.step_maps.hr_masks[:, :, 1]), np.asarray(alone.step_maps.hr_masks[:, :, 0]))
    assert np.asarray(alone.prefill_maps.hr_masks).any()  # something is selected, so the HR path matters
    assert not np.array_equal(np.asarray(mixed.tokens[0]), np.asarray(mixed.tokens[1]))


# ---- inference.answer: compiles per bucket, data parallel ---------------------------------------

def _tiny_answer_setup(threshold: float, std: float = 0.3):
    """tests.fixtures' tiny model (28 px LR, M = 36), its tokenizer and random parameters."""
    from tests.fixtures import random_params, tiny_config

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, threshold=threshold))
    return cfg, build_demo_tokenizer(), jax.tree.map(jnp.asarray, random_params(cfg, seed=3, std=std))


def _requests(n_words: list[int], seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (20, 50), (33, 33)]
    return [
        Request(Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8)), "what " + "square " * n + "?")
        for i, n in enumerate(n_words)
    ]


@pytest.mark.slow
def test_answer_compiles_generate_once_per_bucket(caplog):
    """10 prompts of 42..112 tokens, batches of 4: three batches over buckets 64 and 128, two compiles of generate."""
    cfg, tokenizer, params = _tiny_answer_setup(threshold=47.0625)  # a config no other test compiles
    requests = _requests([0, 3, 7, 12, 18, 25, 33, 41, 50, 70])
    before = generate._cache_size()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        stats: dict = {}
        answers = answer(params, cfg, tokenizer, requests, batch_size=4, max_new_tokens=2, progress=False, stats=stats)
    compiles = [r.getMessage() for r in caplog.records if re.search(r"Finished XLA compilation of jit\(generate\)", r.getMessage())]
    assert len(compiles) == 2, compiles
    assert stats["compiles"] == 2, stats  # the summary's count (traces seen through jax.monitoring) agrees
    assert generate._cache_size() - before == 2
    assert all(a.error is None and len(a.tokens) >= 1 for a in answers)


def test_data_parallel_answers_equal_single_device():
    """8 host devices, data=8: the same tokens, masks and maps as one device; a batch not divisible by 8 is refused."""
    cfg, tokenizer, params = _tiny_answer_setup(threshold=48.0)
    requests = _requests([0, 5, 9, 14, 2, 20, 17, 11, 7], seed=1)  # 9 items in bucket 64: batches of 8 and 1 (padded)
    kw = dict(batch_size=8, max_new_tokens=3, progress=False)
    single = answer(params, cfg, tokenizer, requests, **kw)
    mesh = make_mesh("data=8")
    sharded = answer(params, cfg, tokenizer, requests, mesh=mesh, **kw)
    for i, (a, b) in enumerate(zip(single, sharded, strict=True)):
        assert a.tokens == b.tokens and a.text == b.text, i
        np.testing.assert_array_equal(a.hr_masks, b.hr_masks, err_msg=str(i))
        np.testing.assert_allclose(a.image_attention, b.image_attention, rtol=1e-5, atol=1e-6, err_msg=str(i))
    assert any(a.hr_masks.any() for a in single)
    with pytest.raises(ValueError, match=r"batch_size=6 is not a multiple of the mesh's data axis \(8\)"):
        answer(params, cfg, tokenizer, requests, mesh=mesh, batch_size=6, max_new_tokens=4, progress=False)


@pytest.mark.slow  # ~35 s on 2 cores; CI runs the slow tests too
def test_tensor_and_data_parallel_answers_equal_single_device():
    """8 host devices, data=2 x tensor=4: the parameters sharded by the rules table (heads, MLP, vocabulary over tensor),
    batches over data; the same tokens as one device, for each HR strategy."""
    from flexattn_jax.sharding import param_shardings

    cfg, tokenizer, params = _tiny_answer_setup(threshold=48.0)
    requests = _requests([0, 5, 9, 14, 2, 20, 17, 11, 7], seed=1)
    mesh = make_mesh("data=2,tensor=4")
    specs = [s.spec for s in jax.tree.leaves(param_shardings(params, mesh))]
    assert sum("tensor" in str(s) for s in specs) >= 5  # really sharded, not replicated
    for strategy in ("project", "incremental"):
        kw = dict(batch_size=4, max_new_tokens=4, progress=False, hr_strategy=strategy)
        single = answer(params, cfg, tokenizer, requests, **kw)
        sharded = answer(params, cfg, tokenizer, requests, mesh=mesh, **kw)
        assert [a.tokens for a in sharded] == [a.tokens for a in single], strategy
        assert all(np.array_equal(a.hr_masks, b.hr_masks) for a, b in zip(single, sharded, strict=True))
