"""The serving engine in-process (issue 35): decode slots exact against `generate` whatever the neighbours, per-slot
sampling in one step program, UTF-8-safe streaming with stop sequences, the image feature cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from flexattn_jax.app.chat import ChatRequest
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.engine import Engine, FeatureCache, TextStream
from flexattn_jax.app.inference import Answer, Request, answer, answer_text
from flexattn_jax.app.serve import Job
from flexattn_jax.slots import decode_slots

from .fixtures import random_params, tiny_config

MAX_NEW = 12
QUESTIONS = ["what is it?", "which colour?", "describe the picture.", "is there a square?", "what pattern is shown here?"]


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return random_params(cfg, seed=2, std=0.3), cfg, build_demo_tokenizer()


def _requests(n: int) -> list[Request]:
    """``n`` questions about six images (the seventh request asks about the first image again)."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
              for shape in [(30, 40), (50, 20), (24, 24), (40, 64), (33, 33), (20, 45)]]
    return [Request(images[i % 6], QUESTIONS[i % 5]) for i in range(n)]


class _Run:
    """Engine jobs submitted at once; each one's text deltas and its result."""

    def __init__(self, engine: Engine, chats: list[ChatRequest]):
        self.deltas: list[list[str]] = [[] for _ in chats]
        self.results: list[Answer | BaseException | None] = [None] * len(chats)
        self.done = [threading.Event() for _ in chats]
        for i, chat in enumerate(chats):
            def deliver(r, i=i):
                self.results[i] = r
                self.done[i].set()
            assert engine.submit(Job(chat, deliver, on_text=self.deltas[i].append))

    def wait(self) -> list[Answer]:
        for d in self.done:
            assert d.wait(300), "no answer"
        assert all(isinstance(r, Answer) and r.error is None for r in self.results), self.results
        return self.results


def _engine(model, **kw) -> Engine:
    params, cfg, tok = model
    engine = Engine(params, cfg, tok, max_new_tokens=MAX_NEW, buckets=(64,), **kw)
    engine.start()
    return engine


@pytest.mark.parametrize("strategy", ["project", pytest.param("cache", marks=pytest.mark.slow),
                                      pytest.param("incremental", marks=pytest.mark.slow)])
def test_slots_give_generate_tokens_whatever_the_neighbours(model, strategy):
    """10 greedy requests through 3 slots, answers of mixed max_tokens so slots free and refill at different steps,
    prefilled alone and in batches of 2: every request's tokens are generate's (a prefix where max_tokens cuts)."""
    params, cfg, tok = model
    reqs = _requests(10)
    ref = answer(params, cfg, tok, reqs, batch_size=8, max_new_tokens=MAX_NEW, hr_strategy=strategy, buckets=(64,), progress=False)
    assert len({tuple(a.tokens) for a in ref}) > 5  # the answers really differ
    max_tokens = [MAX_NEW, 2, MAX_NEW, 5, 1, MAX_NEW, 3, MAX_NEW, 7, MAX_NEW]
    engine = _engine(model, slots=3, prefill_batch=2, hr_strategy=strategy)
    try:
        got = _Run(engine, [ChatRequest(r, m) for r, m in zip(reqs, max_tokens, strict=True)]).wait()
    finally:
        engine.close(60)
    for g, r, m in zip(got, ref, max_tokens, strict=True):
        assert g.tokens == r.tokens[:m]
    assert engine.cache.misses == 6 and engine.cache.hits == 4  # six distinct images


def test_per_slot_sampling_is_one_program_and_reproducible_from_the_seed(model):
    """Five temperatures (and top_p values) decode together in the one step program; the same seed gives the same
    answer in another slot beside other neighbours; greedy requests beside them stay generate's."""
    params, cfg, tok = model
    reqs = _requests(5)
    sampling = [(0.3, 1.0, 11), (0.7, 0.9, 12), (1.0, 0.5, 13), (1.3, 1.0, 14), (2.0, 0.8, 15)]
    chats = [ChatRequest(reqs[i], MAX_NEW, t, p, s) for i, (t, p, s) in enumerate(sampling)]
    engine = _engine(model, slots=8, prefill_batch=4, decode_steps=1)  # one token per call (the others: 4)
    try:
        before = decode_slots._cache_size()
        first = _Run(engine, chats).wait()
        assert decode_slots._cache_size() - before <= 1  # one step program (0 if an earlier test compiled it)
        greedy = [ChatRequest(r, MAX_NEW) for r in _requests(3)]
        again = _Run(engine, greedy + chats[::-1]).wait()  # other slots, other neighbours
        assert decode_slots._cache_size() - before <= 1
        other_seed = _Run(engine, [ChatRequest(reqs[4], MAX_NEW, 2.0, 0.8, 99)]).wait()
    finally:
        engine.close(60)
    assert [a.tokens for a in again[3:]] == [a.tokens for a in first[::-1]]
    ref = answer(params, cfg, tok, _requests(3), batch_size=8, max_new_tokens=MAX_NEW, buckets=(64,), progress=False)
    assert [a.tokens for a in again[:3]] == [a.tokens for a in ref]
    assert other_seed[0].tokens != first[4].tokens  # at temperature 2 a different seed draws differently
    greedy_of_first = answer(params, cfg, tok, reqs, batch_size=8, max_new_tokens=MAX_NEW, buckets=(64,), progress=False)
    assert sum(a.tokens != g.tokens for a, g in zip(first, greedy_of_first, strict=True)) >= 3  # they really sample


def test_stream_deltas_concatenate_to_the_answer_and_stop_sequences_end_it(model):
    """Through the engine: the deltas of every request concatenate to its final text; a stop sequence taken from a greedy
    answer ends the request there (fewer tokens) and is never sent."""
    reqs = _requests(4)
    engine = _engine(model, slots=4)
    try:
        run = _Run(engine, [ChatRequest(r, MAX_NEW) for r in reqs])
        plain = run.wait()
        long = max(plain, key=lambda a: len(a.text))
        i = plain.index(long)
        stop = next(long.text[j:j + 3] for j in range(len(long.text) // 2, len(long.text) - 3)
                    if "\ufffd" not in long.text[j:j + 3])
        cut = long.text.find(stop)
        stopped = _Run(engine, [ChatRequest(reqs[i], MAX_NEW, stop=[stop])])
        s = stopped.wait()[0]
    finally:
        engine.close(60)
    for deltas, a in zip(run.deltas, plain, strict=True):
        assert "".join(deltas) == a.text  # whole answers: nothing held back at the end
    assert "".join(stopped.deltas[0]) == long.text[:cut] and stop not in "".join(stopped.deltas[0])
    assert len(s.tokens) < len(long.tokens) and s.tokens == long.tokens[: len(s.tokens)]


def test_text_stream_never_sends_a_broken_character_or_a_stop_prefix():
    """Byte-level tokens splitting multi-byte characters: no delta holds U+FFFD, the deltas concatenate to the answer;
    an ending that may start a stop sequence waits, and the stop sequence itself is never sent."""
    tok = build_demo_tokenizer()
    cfg = tiny_config()
    text = "naïve 漢字 café ✓ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some token really ends inside a character
    stream = TextStream(tok, cfg, [])
    deltas = [stream.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == answer_text(tok, cfg, ids) == text
    stream = TextStream(tok, cfg, ["字 ca"])
    sent = ""
    for i in ids:
        sent += stream.push(i)
        assert "字 ca" not in sent and text.startswith(sent)
        if stream.stopped:
            break
    assert stream.stopped and sent == "naïve 漢"


def test_feature_cache_is_an_lru_bounded_in_bytes():
    cache = FeatureCache(max_bytes=3000)
    a, b, c = (np.full(250, v, np.float32) for v in (1, 2, 3))  # 1000 bytes each
    keys = [FeatureCache.key(np.full((2, 2), v, np.float32)) for v in (1, 2, 3, 4)]
    assert len(set(keys)) == 4
    for k, v in zip(keys, (a, b, c), strict=False):
        cache.put(k, (v, None))
    assert cache.get(keys[0]) is not None  # now the most recent
    cache.put(keys[3], (a, None))  # over 3000 bytes: the least recently used (keys[1]) goes
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is not None and cache.bytes == 3000
    assert (cache.hits, cache.misses) == (2, 1)
    cache.put(FeatureCache.key(np.zeros(9)), (np.zeros(1000, np.float32), None))  # larger than the whole cache: not kept
    assert cache.bytes == 3000 and len(cache) == 3


def test_a_failed_prefill_answers_its_requests_with_the_error_and_the_engine_goes_on(model, monkeypatch):
    """A program that raises (e.g. device memory) settles the requests it held with the exception; the next request is
    answered as usual."""
    import flexattn_jax.app.engine as engine_module

    real = engine_module.prefill_rows

    def failing(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    engine = _engine(model, slots=4)
    try:
        monkeypatch.setattr(engine_module, "prefill_rows", failing)
        run = _Run(engine, [ChatRequest(r, 3) for r in _requests(2)])
        for d in run.done:
            assert d.wait(60)
        assert all(isinstance(r, RuntimeError) and "RESOURCE_EXHAUSTED" in str(r) for r in run.results)
        monkeypatch.setattr(engine_module, "prefill_rows", real)
        (ok,) = _Run(engine, [ChatRequest(_requests(1)[0], 3)]).wait()
        assert len(ok.tokens) >= 1 and engine.pending == 0
    finally:
        engine.close(60)


def test_a_bad_request_gets_its_error_and_any_64_bit_seed_samples(model, monkeypatch):
    """A request whose preparation raises (any exception) is answered with its error, not a 500, beside a sampled
    request whose seed is the largest 64-bit integer the API accepts (folded into the slot's int32)."""
    engine = _engine(model, slots=4)
    try:
        good, bad = _requests(2)
        big = ChatRequest(good, 3, temperature=1.0, seed=2**63 - 1)
        run = _Run(engine, [big, ChatRequest(Request(bad.image, "   "), 3), ChatRequest(Request(b"not an image", "what?"), 3)])
        for d in run.done:
            assert d.wait(120)
        again = _Run(engine, [big]).wait()
    finally:
        engine.close(60)
    assert run.results[0].error is None and run.results[0].tokens == again[0].tokens
    assert "empty prompt" in run.results[1].error and run.results[2].error


@pytest.mark.slow  # ~2 min on 2 shared cores (8 host devices); CI runs the slow tests too
def test_sharded_slots_give_single_device_and_generate_tokens():
    """8 host devices, data=2 x tensor=4: parameters by the rules table, the slot state sharded (slots over data, the
    text and HR K/V heads over tensor); 6 greedy requests through 4 slots give the single-device engine's tokens and
    generate's, with the incremental HR cache."""
    import dataclasses

    import jax
    from jax.sharding import PartitionSpec as P

    from flexattn_jax.sharding import make_mesh

    base = tiny_config()
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_kv_heads=4))  # 4 K/V heads: split 4 ways
    params, tok = random_params(cfg, seed=2, std=0.3), build_demo_tokenizer()
    mesh = make_mesh("data=2,tensor=4")
    reqs = _requests(6)
    max_tokens = [MAX_NEW, 3, MAX_NEW, 5, 1, MAX_NEW]
    ref = answer(params, cfg, tok, reqs, batch_size=8, max_new_tokens=MAX_NEW, hr_strategy="incremental", buckets=(64,),
                 progress=False)
    got = {}
    for name, m in (("single", None), ("mesh", mesh)):
        engine = _engine((params, cfg, tok), mesh=m, slots=4, prefill_batch=2, hr_strategy="incremental")
        try:
            got[name] = [a.tokens for a in _Run(engine, [ChatRequest(r, n) for r, n in zip(reqs, max_tokens, strict=True)]).wait()]
        finally:
            engine.close(60)
        if m is not None:
            k = engine.state.decode.cache.k
            assert k.sharding.spec == P("data", None, None, None, "tensor") and len(k.sharding.device_set) == 8
            assert engine.state.decode.hr_kv.k.sharding.spec[4] == "tensor"
            q = engine.params["text"]["layers"]["attn"]["q"]["kernel"]
            assert "tensor" in str(q.sharding.spec) and isinstance(q.sharding, jax.sharding.NamedSharding)
    assert got["mesh"] == got["single"] == [r.tokens[:n] for r, n in zip(ref, max_tokens, strict=True)]
    with pytest.raises(ValueError, match=r"batch_size=3 is not a multiple of the mesh's data axis \(2\)"):
        Engine(params, cfg, tok, mesh=mesh, slots=3)
