"""Batch inference at dataset scale (issue 14): early-stopping generation, the streaming pipeline, --resume, Ctrl-C.

* ``generate``'s ``while_loop`` gives the tokens of a ``lax.scan`` over every step (the previous
  implementation, rebuilt here from the same prefill / decode_step / sample_token) for every HR
  strategy, rows stopping at different steps and a batch where none stops, and it stops early.
* ``stream_answers`` reads a generator lazily (items in flight bounded by the window), answers bad
  items in place and gives the same answers as the list wrapper; ``InputOrder`` restores the order.
* ``AnswerLog`` (the resumable output file): a partial last line, foreign lines, merging runs.
* The CLI killed with SIGINT mid-run (input from a FIFO, so the stop point is deterministic) exits
  130 without a traceback; ``--resume`` then ends with the file of an uninterrupted run, loading the
  compiled program from the persistent cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bench.common import smoke_config
from flexattn_jax.app.cli import main
from flexattn_jax.app.demo_data import build_demo_tokenizer
from flexattn_jax.app.inference import Answer, InputOrder, Request, answer, stream_answers
from flexattn_jax.app.resume import AnswerLog, ResumeError, content_key, make_header
from flexattn_jax.generate import decode_step, generate, prefill, sample_token
from flexattn_jax.selection import margin_patches

from .checkpoints import write_tiny_checkpoint
from .signals import open_fifo_for_writing, with_signals

STEPS = 6


def _tiny(threshold: float = 47.5):
    from tests.fixtures import random_params, tiny_config

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, threshold=threshold))
    return cfg, jax.tree.map(jnp.asarray, random_params(cfg, seed=4, std=0.3))


def _scan_generate(params, cfg, ids, pix, mask, margin, rng, *, n, temperature, strategy):
    """The decode loop as it was: a ``lax.scan`` over all ``n`` steps, finished rows fed ``pad``."""
    state, logits, _ = prefill(params, cfg, ids, pix, mask, margin, max_len=ids.shape[1] + n, hr_strategy=strategy)
    keys = jax.random.split(rng, n) if rng is not None else None

    def step(carry, i):
        state, logits, done = carry
        tok = sample_token(logits, None if keys is None else keys[i], temperature, 1.0)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        state, logits, _ = decode_step(params, cfg, state, tok)
        return (state, logits, done | (tok == cfg.eos_token_id)), tok

    _, tokens = jax.lax.scan(step, (state, logits, jnp.zeros(ids.shape[0], bool)), jnp.arange(n))
    return tokens.T


def _inputs(cfg, batch=4, length=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 400, (batch, length)).astype(np.int32)
    ids[:, 2 : 2 + cfg.num_image_tokens] = cfg.image_token_id
    mask = np.ones((batch, length), bool)
    mask[1, :3] = False  # left padding on one row
    ids[1, :3] = cfg.pad_token_id
    pix = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    margin = margin_patches(np.array([(40, 30), (20, 50), (33, 33), (60, 10)][:batch]), cfg.lr_grid)
    return tuple(jnp.asarray(a) for a in (ids, pix, mask, margin))


def _stop_at(tokens: np.ndarray, eos: int, pad: int) -> np.ndarray:
    """The scan's tokens with ``eos`` as EOS, from its tokens when nothing stops: a row's inputs are the same up to
    its EOS, and afterwards the scan emits ``pad``."""
    out = tokens.copy()
    for row in out:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1 :] = pad
    return out


@pytest.fixture(scope="module")
def scan_reference():
    """The tiny model, its inputs and the scan's greedy tokens (HR strategy 'project') with an EOS it never emits."""
    cfg, params = _tiny()
    inputs = _inputs(cfg)
    none_cfg = dataclasses.replace(cfg, eos_token_id=cfg.text.vocab_size - 1)
    with jax.default_matmul_precision("highest"):
        free = np.asarray(jax.jit(_scan_generate, static_argnames=("cfg", "n", "temperature", "strategy"))(
            params, none_cfg, *inputs, None, n=STEPS, temperature=0.0, strategy="project"))
    assert not (free == none_cfg.eos_token_id).any()
    return cfg, params, inputs, none_cfg, free


@pytest.mark.parametrize("strategy", [pytest.param("project", marks=pytest.mark.slow), pytest.param("cache", marks=pytest.mark.slow),
                                      "incremental"])  # the fast twin: the strategy with the most state (its cache)
def test_while_loop_tokens_equal_the_scan(scan_reference, strategy):
    """Every strategy's while_loop against the scan (strategies give the same tokens: test_hr_cache), with an EOS that
    rows emit at different steps (some never) and with one that no row emits."""
    cfg, params, inputs, none_cfg, free = scan_reference

    def first_steps(tok):
        return [next((s for s, t in enumerate(r) if t == tok), None) for r in free.tolist()]

    eos = max(sorted(set(free.ravel().tolist())), key=lambda t: len(set(first_steps(t))))
    assert len(set(first_steps(eos))) >= 2, first_steps(eos)
    stop_cfg = dataclasses.replace(cfg, eos_token_id=int(eos))
    with jax.default_matmul_precision("highest"):
        for c, want in ((none_cfg, free), (stop_cfg, _stop_at(free, eos, cfg.pad_token_id))):
            out = generate(params, c, *inputs, max_new_tokens=STEPS, hr_strategy=strategy)
            np.testing.assert_array_equal(np.asarray(out.tokens), want)
            first_eos = [next((s for s, t in enumerate(r) if t == c.eos_token_id), STEPS - 1) for r in want.tolist()]
            np.testing.assert_array_equal(np.asarray(out.lengths), np.array(first_eos) + 1)
            assert int(out.steps) == max(first_eos)  # the loop ran until the last row stopped, no further


@pytest.mark.slow  # two more compiles (sampling is static); the greedy tests above cover the loop
def test_while_loop_sampling_equals_the_scan():
    """Temperature sampling: the same keys per step, the same tokens."""
    cfg, params = _tiny()
    inputs = _inputs(cfg, seed=1)
    key = jax.random.key(7)
    with jax.default_matmul_precision("highest"):
        want = _scan_generate(params, cfg, *inputs, key, n=STEPS, temperature=1.5, strategy="project")
        out = generate(params, cfg, *inputs, key, max_new_tokens=STEPS, temperature=1.5)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want))
    assert len({tuple(r) for r in np.asarray(want).tolist()}) > 1


# ---- the pipeline ------------------------------------------------------------------------------

def _image(rng, size=(40, 30)):
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _requests(n: int, seed: int = 0, bad_every: int = 0):
    """``n`` requests of 1..4 extra words (two length buckets with bucket 64/128 prompts); every ``bad_every``-th empty."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        prompt = "" if bad_every and i % bad_every == bad_every - 1 else "what " + "square " * (1 + i % 4 + 40 * (i % 5 == 0)) + "?"
        yield Request(_image(rng, [(40, 30), (20, 50), (33, 33)][i % 3]), prompt)


def test_stream_reads_lazily_and_answers_like_the_list_wrapper():
    cfg, params = _tiny(threshold=47.25)
    tokenizer = build_demo_tokenizer()
    n, batch, window = 40, 4, 8
    pulled = 0

    def source():
        nonlocal pulled
        for req in _requests(n, bad_every=7):
            pulled += 1
            yield req

    got: dict[int, Answer] = {}
    stats: dict = {}
    order = InputOrder()
    in_order, skipped = [], []

    def skip(i, req):
        if i % 10 == 3:
            order.skip(i)
            skipped.append(i)
            return True
        return False

    for i, a in stream_answers(params, cfg, tokenizer, source(), batch_size=batch, max_new_tokens=3, window=window,
                               workers=2, progress=False, stats=stats, skip=skip):
        assert i not in got
        got[i] = a
        # in memory: the window, the batch running, the batch being read back, the reader's queue and the item it holds
        assert pulled - len(got) - len(skipped) <= window + 3 * batch + 1
        in_order += [j for j, _ in order.push(i, a)]
    assert in_order == [i for i in range(n) if i % 10 != 3] and len(order) == 0
    ref = answer(params, cfg, tokenizer, list(_requests(n, bad_every=7)), batch_size=batch, max_new_tokens=3, progress=False)
    for i in range(n):
        if i % 10 == 3:
            continue
        if i % 7 == 6:
            assert got[i].error and "empty prompt" in got[i].error and ref[i].error == got[i].error
        else:
            assert got[i].error is None and got[i].tokens == ref[i].tokens, i
    n_bad = sum(i % 7 == 6 and i % 10 != 3 for i in range(n))
    assert stats["items"] == n and stats["skipped"] == 4 and stats["failed"] == n_bad and stats["answered"] == n - 4 - n_bad
    assert stats["compiles"] <= 2 and stats["steady_items_per_s"] > 0 and stats["decode_steps"] <= stats["batches"] * 2


def test_stream_memory_does_not_grow_with_the_number_of_items():
    """Traced host memory (numpy pixels included) of 24 vs 96 items through a window of 8: flat, and far below 96 images."""
    cfg, params = _tiny(threshold=47.25)
    tokenizer = build_demo_tokenizer()
    one_image = cfg.image_size**2 * 3 * 4
    peaks = []
    for n in (24, 96):
        kw = dict(batch_size=4, max_new_tokens=3, window=8, workers=2, progress=False)  # the shapes of the test above
        list(stream_answers(params, cfg, tokenizer, _requests(4), **kw))  # warm: compile outside the measurement
        tracemalloc.start()
        for _ in stream_answers(params, cfg, tokenizer, _requests(n), **kw):
            pass
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0] + 4 * one_image, peaks
    assert peaks[1] < 40 * one_image, (peaks, one_image)


# ---- the resumable answer file ------------------------------------------------------------------

def _record(i, image="a.png", prompt="q", answer="x", error=None):
    return json.dumps({"index": i, "line": i + 1, "image": image, "prompt": prompt, "answer": answer, "error": error}) + "\n"


HEADER = make_header("generate answers", checkpoint={"params_digest": "p"}, settings={"max_new_tokens": 2}, input={"path": "b"})


def test_answer_log_cuts_a_partial_line_merges_runs_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "out.jsonl"
    top = json.dumps(HEADER) + "\n"
    out.write_text(top + _record(0) + _record(1, error="boom") + _record(3, prompt="old") + _record(5) + '{"index": 6, "ans')
    log = AnswerLog.scan(out, HEADER)
    assert out.read_text().endswith(_record(5)) and log.runs == [(len(top), out.stat().st_size)]
    assert log.is_done(0, content_key("a.png", "q")) and not log.is_done(1, content_key("a.png", "q"))  # failed: retried
    assert log.is_done(3, content_key("a.png", "old")) and not log.is_done(3, content_key("a.png", "new"))
    with open(out, "a") as f:  # this run: the retried item 1, item 3 whose prompt changed, the missing 2, 4, 6
        f.write(_record(1) + _record(2) + _record(3, prompt="new") + _record(4) + _record(6))
    assert log.finalize()
    final = top + "".join([_record(0), _record(1), _record(2), _record(3, prompt="new"), _record(4), _record(5), _record(6)])
    assert out.read_text() == final
    assert AnswerLog.scan(out, HEADER).runs == [(len(top), out.stat().st_size)] and not AnswerLog.scan(out, HEADER).finalize()
    other = {**HEADER, "settings": {"max_new_tokens": 3}}
    with pytest.raises(ResumeError, match=r"another run; changed: settings\.max_new_tokens \(file 2, now 3\)"):
        AnswerLog.scan(out, other)
    assert out.read_text() == final  # refused: not edited
    for foreign in (b"image,prompt\na.png,q\n", b'{"keep": true}', _record(0).encode(), _record(0).encode()[:-1]):
        out.write_bytes(foreign)  # not written by the command, whatever its last byte: refused, left as it is
        with pytest.raises(ResumeError, match=r"out\.jsonl was not written by this command"):
            AnswerLog.scan(out, HEADER)
        assert out.read_bytes() == foreign
    assert AnswerLog.scan(tmp_path / "none.jsonl", HEADER).done == {}


# ---- the CLI: Ctrl-C, --resume, the compile cache ------------------------------------------------

@pytest.fixture(scope="module")
def ckpt_and_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-cli")
    rng = np.random.default_rng(0)
    images = []
    for k in range(3):
        images.append(d / f"img{k}.png")
        _image(rng, (30 + 10 * k, 40)).save(images[-1])
    return write_tiny_checkpoint(d / "ckpt"), images


def _cli_env(cache_home: Path) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("FLEXATTN_JAX_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test session's shared cache (conftest): this test checks the CLI's own
    env["FLEXATTN_JAX_COMPILE_CACHE"] = "1"  # conftest turns it off for in-process calls
    env["XLA_FLAGS"] = ""  # one CPU device, as users run it
    return env


@pytest.mark.slow
def test_sigint_then_resume_equals_an_uninterrupted_run(ckpt_and_images, tmp_path):
    ckpt, images = ckpt_and_images
    lines = [json.dumps({"image": str(images[i % 3]), "prompt": f"what is {'it ' * (i % 4)}?"}) + "\n" for i in range(24)]
    lines[5] = '{"image": "broken\n'  # a bad line, answered in place
    full = tmp_path / "in.jsonl"
    full.write_text("".join(lines))
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out, cache_home = tmp_path / "out.jsonl", tmp_path / "cache"
    gen = ["--max-new-tokens", "3", "--batch-size", "4", "--window", "8"]
    cmd = [sys.executable, "-m", "flexattn_jax.app.cli", "generate", "--checkpoint", str(ckpt), "--output", str(out), *gen]
    # the child's SIGINT is ignored, as in a background job or under nohup: the command installs its own handler
    proc = subprocess.Popen(with_signals([*cmd, "--batch", str(fifo)], sigint="ignore"), env=_cli_env(cache_home),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # for opening the FIFO and for the first answers
        fd = open_fifo_for_writing(fifo, proc, timeout=240)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w") as w:  # the first 16 lines now; the reader then waits for more, mid-run
            w.write("".join(lines[:16]))
            w.flush()
            while (not out.exists() or len(out.read_text().splitlines()) < 8) and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "--resume to finish" in err, err
    written = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert 8 <= len(written) < 24 and [r["index"] for r in written] == list(range(len(written)))
    assert list((cache_home / "flexattn-jax" / "jax").iterdir())  # the compiled programs were stored

    # the same input (the header holds the --batch file's identity: the same pipe), now written in full
    resumed = subprocess.Popen(with_signals([*cmd, "--batch", str(fifo), "--resume"]), env=_cli_env(cache_home),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(fifo, "w") as w:
            w.write("".join(lines))
        _, resumed_err = resumed.communicate(timeout=300)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == 0, resumed_err
    n_done = sum(r["error"] is None for r in written)  # failed items are retried
    assert f"{n_done} already done" in resumed_err and "resumed:" in resumed_err
    assert "persistent cache:" in resumed_err and " 0 misses" in resumed_err, resumed_err  # loaded, not compiled
    reference = tmp_path / "ref.jsonl"
    assert main(["generate", "--checkpoint", str(ckpt), "--batch", str(full), "--output", str(reference), *gen,
                 "--no-compile-cache"]) == 0
    # the headers name different inputs, and the bad line's error its file
    assert out.read_text().replace(str(fifo), str(full)).splitlines()[1:] == reference.read_text().splitlines()[1:]
    rows = [json.loads(x) for x in reference.read_text().splitlines()[1:]]
    assert [r["index"] for r in rows] == list(range(24)) and rows[5]["error"].startswith(f"{full} line 6: not JSON")


@pytest.mark.slow
def test_throughput_bench_model_answers_in_one_to_three_tokens(tmp_path):
    """bench/throughput.py's EOS-chain weights (at a tiny size): every item answers as designed."""
    from bench import throughput as T

    cfg = smoke_config("float32")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=4096), image_token_id=4095)
    tokenizer = build_demo_tokenizer()
    params = T.eos_chain_params(cfg, tokenizer)
    images = T.make_images(tmp_path, 2, size=(64, 48))
    e = T.run_one(params, cfg, tokenizer, images, n=6, max_new_tokens=8, batch_size=3)
    assert e["answers_as_designed"] == 6 and e["tokens"] == 2 * (1 + 2 + 3), e
    assert e["peak_rss_mb"] >= e["rss_before_mb"] > 0
    goals = T.goals([dict(path="new", items=16, max_new_tokens=8, peak_rss_mb=100.0, items_per_s=2.0),
                     dict(path="new", items=64, max_new_tokens=8, peak_rss_mb=105.0, items_per_s=2.0)])
    assert [(round(g["value"], 2), g["met"]) for g in goals] == [(1.05, True)]
