"""One bad item never sinks the others; one answers file, one writer (issue 33).

The CLI rows run through the hostile-input table's checks (:func:`tests.test_hostile_inputs.run_case`: exit status,
a one-line error naming the culprit, no traceback, inputs untouched, nothing written but what the row allows).
The rest need two processes, a server's scheduler or a file-size limit, and assert the same things by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_hostile_inputs import GEN, Case, World, make_world, run_case

ROOT = Path(__file__).resolve().parents[1]
BAD = "what \ud800 is it?"  # the JSON escape \ud800: an unpaired surrogate, not encodable as UTF-8


def _batch(case: Path, prompts: list[str], world: World, name: str = "in.jsonl") -> Path:
    path = case / name
    path.write_text("".join(json.dumps({"image": str(world.img), "prompt": p}) + "\n" for p in prompts))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()[1:]]


def _surrogate_batch(world: World, case: Path) -> None:
    _batch(case, ["what is it?", BAD, "which pattern?", "is it square?"], world)


def _answered(n_ok: int, err: str):
    def check(world: World, case: Path, out: str, stderr: str) -> None:
        rows = _records(case / "out.jsonl")
        assert [r["index"] for r in rows] == list(range(len(rows)))
        assert sum(r["error"] is None and r["answer"] is not None for r in rows) == n_ok, rows
        bad = [r for r in rows if r["error"] is not None]
        assert len(bad) == len(rows) - n_ok and all(re.search(err, r["error"]) for r in bad), bad

    return check


def _existing_answers(world: World, case: Path) -> None:
    (case / "out.jsonl").write_text('{"flexattn_jax": "generate answers"}\n{"index": 0, "answer": "kept"}\n')


def _vqa_surrogate(world: World, case: Path) -> None:
    (case / "imgs").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(case / "imgs" / "a.png")
    lines = [json.dumps({"question_id": i, "image": "a.png", "question": q, "answers": ["no"]})
             for i, q in enumerate(["Is it red?", "Is it \ud800 blue?", "Is it green?"])]
    (case / "vqa.jsonl").write_text("\n".join(lines) + "\n")


def _eval_two_scored(world: World, case: Path, out: str, err: str) -> None:
    m = json.loads((case / "eval" / "metrics.json").read_text())
    assert (m["items"], m["scored"], m["failed"]) == (3, 2, 1), m
    assert re.search(r"its question is not valid UTF-8 text \(an unpaired surrogate U\+D800", m["failures"][0]["error"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("hostile-items"))


def _eval_full_disk(world: World, case: Path) -> None:
    _vqa_surrogate(world, case)
    (case / "eval").mkdir()
    (case / "eval" / "predictions.jsonl").symlink_to("/dev/full")


G = "generate"
CASES: list[Case] = [
    Case("generate --batch: an unpaired surrogate in one line, its neighbours answered", "culprit",
         (G, "--checkpoint", "{ckpt}", "--batch", "{case}/in.jsonl", "--output", "{case}/out.jsonl", *GEN), 0, None,
         setup=_surrogate_batch, creates=("{case}/out.jsonl",), loads=True,
         check=_answered(3, r"in\.jsonl line 2: field 'prompt' is not valid UTF-8 text \(an unpaired surrogate U\+D800")),
    Case("eval: an unpaired surrogate in one question, the others scored", "culprit",
         ("eval", "vqa", "--checkpoint", "{ckpt}", "--data", "{case}/vqa.jsonl", "--images", "{case}/imgs", "--out", "{case}/eval",
          "--max-new-tokens", "2", "--no-compile-cache", "--no-progress"), 0, None, setup=_vqa_surrogate,
         creates=("{case}/eval",), loads=True, check=_eval_two_scored),
    Case("eval: predictions.jsonl on a full disk", "lost",
         ("eval", "vqa", "--checkpoint", "{ckpt}", "--data", "{case}/vqa.jsonl", "--images", "{case}/imgs", "--out", "{case}/eval",
          "--max-new-tokens", "2", "--no-compile-cache", "--no-progress"), 1,
         r"cannot write \S*eval/predictions\.jsonl \(No space left on device\); the finished items written before are kept: free "
         r"space, then re-run the same command to resume", setup=_eval_full_disk, loads=True),
    Case("generate: an existing --output without --resume or --overwrite", "lost",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/out.jsonl", *GEN), 2,
         r"--output \S*out\.jsonl already exists \(\d+ bytes of answers\); it was left as it is: pass --resume to finish it, "
         r"--overwrite to replace it", setup=_existing_answers),
    Case("generate --overwrite with --resume", "values",
         (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--output", "{case}/out.jsonl", "--resume", "--overwrite"), 2,
         r"--overwrite needs --batch and --output, and not --resume"),
    Case("generate --seed 2**64", "values", (G, "--checkpoint", "{ckpt}", "--batch", "{batch}", "--seed", str(2**64)), 2,
         r"--seed 18446744073709551616 must be a 64-bit integer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_item(case: Case, world: World, tmp_path, capsys, monkeypatch):
    run_case(case, world, tmp_path, capsys, monkeypatch)


# ---- per-item isolation in the pipeline and the server's waves ----------------------------------------

@pytest.fixture(scope="module")
def model(world):
    from flexattn_jax.app.inference import load_for_inference
    from flexattn_jax.tokenizer import load_tokenizer

    params, cfg, _ = load_for_inference(str(world.ckpt), None, None, 4)
    return params, cfg, load_tokenizer(str(world.ckpt))


def _exploding_tokenizer(monkeypatch, marker: str) -> None:
    """Tokenizing a prompt holding ``marker`` raises a TypeError, as the tokenizer does on odd text."""
    import flexattn_jax.app.inference as inference

    real = inference.tokenize_with_image

    def tokenize(text, *a, **k):
        if marker in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(text, *a, **k)

    monkeypatch.setattr(inference, "tokenize_with_image", tokenize)


def test_stream_answers_any_exception_is_that_items_error(model, world, monkeypatch):
    from flexattn_jax.app.inference import Request, stream_answers

    params, cfg, tok = model
    _exploding_tokenizer(monkeypatch, "BOOM")
    reqs = [Request(str(world.img), q) for q in ("what is it?", "BOOM here", "which pattern?", BAD, "is it square?")]
    got = dict(stream_answers(params, cfg, tok, reqs, batch_size=4, max_new_tokens=2, progress=False))
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert got[1].error.startswith("TypeError: TextEncodeInput")
    assert got[3].error == "the prompt is not valid UTF-8 text (an unpaired surrogate U+D800 at character 5)"
    assert all(got[i].error is None and got[i].tokens for i in (0, 2, 4))


def test_one_bad_request_never_fails_its_wave(model, world, monkeypatch):
    """7 good requests and one whose preparation raises share a wave: the 7 are answered, the bad one gets its error
    (the HTTP layer answers it 400 naming the problem), no request gets the 500 of a failed batch."""
    from flexattn_jax.app.chat import ChatRequest
    from flexattn_jax.app.inference import Answer, GenerationOptions, Request
    from flexattn_jax.app.serve import Job, Scheduler

    params, cfg, tok = model
    _exploding_tokenizer(monkeypatch, "BOOM")
    sched = Scheduler(params, cfg, tok, GenerationOptions(max_new_tokens=2, batch_size=4, buckets=(64, 128)))
    results: dict[int, object] = {}
    prompts = ["what is it?"] * 3 + ["BOOM"] + ["which pattern?"] * 4
    jobs = [Job(ChatRequest(Request(str(world.img), p), 2), lambda r, i=i: results.__setitem__(i, r)) for i, p in enumerate(prompts)]
    for j in jobs:
        assert sched.submit(j)
    sched._run_wave(jobs)
    assert sorted(results) == list(range(8)) and sched.pending == 0
    assert all(isinstance(r, Answer) for r in results.values()), results  # no exception handed to the wave
    assert results[3].error.startswith("TypeError:") and all(results[i].error is None for i in range(8) if i != 3)


@pytest.mark.parametrize(("raw", "status", "param", "message"), [
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "a \ud800"}]}), 400, "messages[0].content",
     r"messages\[0\]\.content is not valid UTF-8 text \(an unpaired surrogate U\+D800 at character 2\)"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}), 400,
     "messages[0].content[0].text", r"content\[0\]\.text is not valid UTF-8 text"),
    (json.dumps({"model": "tiny", "stop": ["\ud800"], "messages": []}), 400, "stop", r"stop is not valid UTF-8"),
    ("[" * 100_000 + "]" * 100_000, 400, None, r"nests lists/objects more than 16 levels deep"),
    (json.dumps({"model": "tiny", "x": json.loads("[" * 17 + "]" * 17)}), 400, None, r"nests lists/objects 18 levels deep"),
    (json.dumps({"model": "tiny", "seed": 2**64}), 400, "seed", r"'seed' must be a 64-bit integer .*got 18446744073709551616"),
    (json.dumps({"model": "tiny", "max_tokens": -(2**70)}), 400, "max_tokens", r"'max_tokens' must be a 64-bit integer"),
])
def test_chat_body_limits_are_400_naming_the_field(raw, status, param, message):
    from flexattn_jax.app.chat import ChatError, Limits, parse_chat

    with pytest.raises(ChatError) as e:
        parse_chat(raw.encode("utf-8", "surrogatepass"), Limits("tiny", 8))
    assert (e.value.status, e.value.param) == (status, param) and re.search(message, str(e.value)), str(e.value)


# ---- one writer per output --------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from flexattn_jax.app.resume import lock_output
    lock = lock_output(sys.argv[1], "--x")
    print("held", flush=True)
    time.sleep(120)
""")


@contextlib.contextmanager
def _holder(output: Path):
    """Another process holding ``output``'s lock; killed with SIGKILL at the end (its lock file stays, stale)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _run(argv: list[str]) -> tuple[int, str]:
    from flexattn_jax.app.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_a_second_writer_is_refused_and_a_killed_ones_lock_taken_over(world, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(world.ckpt), "--batch", str(world.batch), "--output", str(out), *GEN]
    with _holder(out) as pid:
        code, err = _run(argv)
        assert code == 2 and "Traceback" not in err, err
        assert re.fullmatch(rf"error: --output \S*out\.jsonl is being written by another run \(PID {pid}, lock file \S*out\.jsonl\.lock\); "
                            r"nothing was written: wait for it to finish, or use another --output\n", err), err
        assert not out.exists()  # nothing written
        code, err = _run(argv + ["--resume"])
        assert code == 2 and f"PID {pid}" in err and not out.exists()
    assert (tmp_path / "out.jsonl.lock").read_text().strip() == str(pid)  # killed: its lock file is left, stale
    code, err = _run(argv)
    assert code == 0, err
    assert f"took over the lock of {out} left by PID {pid} (no longer running)" in err
    assert len(_records(out)) == 2 and not (tmp_path / "out.jsonl.lock").exists()  # released at the end


def test_overwrite_replaces_and_resume_keeps(world, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(world.ckpt), "--batch", str(world.batch), "--output", str(out), *GEN]
    assert _run(argv)[0] == 0
    done = out.read_bytes()
    code, err = _run(argv)
    assert code == 2 and "already exists" in err and out.read_bytes() == done
    assert _run(argv + ["--resume"])[0] == 0 and out.read_bytes() == done
    out.write_text('{"not": "answers"}\n')
    assert _run(argv + ["--overwrite"])[0] == 0 and out.read_bytes() == done


def test_eval_out_has_one_writer(world, tmp_path):
    from tests.eval_fixtures import write_pope

    data = write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    argv = ["eval", "vqa", "--checkpoint", str(world.ckpt), "--data", str(data), "--images", str(data.parent / "val2014"),
            "--out", str(out), "--max-new-tokens", "2",
            "--no-compile-cache", "--no-progress"]
    with _holder(out) as pid:
        code, err = _run(argv)
        assert code == 2 and re.fullmatch(rf"error: --out \S*eval is being written by another run \(PID {pid}, .*\n", err), err
        assert not out.exists()
    code, err = _run(argv)
    assert code == 0 and f"left by PID {pid}" in err and (out / "metrics.json").is_file(), err
    assert not (tmp_path / "eval.lock").exists()


# ---- a full disk ----------------------------------------------------------------------------------

FSIZE = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    from flexattn_jax.app.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_a_full_disk_keeps_the_answers_and_resume_finishes(world, tmp_path):
    batch = _batch(tmp_path, [f"question {i}?" for i in range(6)], world)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", str(world.ckpt), "--batch", str(batch), *GEN, "--no-compile-cache"]
    assert _run(argv + ["--output", str(ref)])[0] == 0
    lines = ref.read_bytes().splitlines(keepends=True)
    room = len(lines[0]) + len(lines[1]) + len(lines[2]) + 5  # the header, two records and part of the third
    p = subprocess.run([sys.executable, "-c", FSIZE, str(room), *argv, "--output", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, timeout=600)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and re.fullmatch(
        rf"error: cannot write --output {re.escape(str(out))} \(File too large\); the 2 answers written before it are kept "
        r"there: free space, then run the same command with --resume to finish", errors[0]), p.stderr
    assert out.read_bytes().startswith(b"".join(lines[:3]))
    assert _run(argv + ["--output", str(out), "--resume"])[0] == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.skipif(not os.access("/dev", os.W_OK), reason="--output /dev/full needs a writable /dev for the path check")
def test_output_dev_full_is_one_line(world, capsys):
    code, err = _run(["generate", "--checkpoint", str(world.ckpt), "--batch", str(world.batch), "--output", "/dev/full", *GEN])
    assert code == 1 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [
        "error: cannot write --output /dev/full (No space left on device); the 0 answers written before it are kept there: "
        "free space, then run the same command with --resume to finish"]


# ---- eval data: annotations ----------------------------------------------------------------------

def test_vstar_unreadable_or_missing_annotations_are_named_failures(tmp_path):
    from flexattn_jax.app.eval.data import BadSample, Sample, read_task
    from tests.eval_fixtures import write_vstar

    root = write_vstar(tmp_path / "vstar")
    d = root / "direct_attributes"
    (d / "sa_dir.json").mkdir()
    (d / "sa_loop.json").symlink_to(d / "sa_loop.json")  # unreadable whoever runs it (root reads a chmod 000 file)
    Image.new("RGB", (20, 20)).save(d / "sa_orphan.jpg")
    items = list(read_task("vstar", root))
    bad = {b.id: b.error for b in items if isinstance(b, BadSample)}
    assert re.fullmatch(r"\S*sa_dir\.json: cannot read the annotation \(Is a directory\)", bad["direct_attributes/sa_dir"])
    assert re.fullmatch(r"\S*sa_loop\.json: cannot read the annotation \(Too many levels of symbolic links\)",
                        bad["direct_attributes/sa_loop"])
    assert re.fullmatch(r"image \S*sa_orphan\.jpg has no annotation sa_orphan\.json next to it", bad["direct_attributes/sa_orphan"])
    assert sum(isinstance(i, Sample) for i in items) == 5  # the good ones are all there


# ---- grounding boxes and weight ------------------------------------------------------------------

def _loader(records):
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from tests.fixtures import TEST_SEQ_LEN, tiny_config
    from train.config import DataConfig
    from train.data import SampleLoader

    return SampleLoader(records, tiny_config(), DataConfig(max_len=TEST_SEQ_LEN), build_demo_tokenizer())


def _record(box, fmt=None, size=(84, 84)):
    r = {"id": "s", "image": Image.new("RGB", size), "box": box,
         "conversations": [{"from": "human", "value": "<image>\nwhere?"}, {"from": "gpt", "value": "here"}]}
    if fmt is not None:
        r["box_format"] = fmt
    return r


@pytest.mark.parametrize(("box", "fmt", "message"), [
    ([0.0, 0.0, 1.0, 1.0], None, r"'box' \[0\.0, 0\.0, 1\.0, 1\.0\] lies in \[0, 1\] on a 84x84 image: boxes are in pixels; "
                                 r"for \[0, 1\] coordinates set \"box_format\": \"normalized\""),
    ([0.2, 0.2, 0.9, 0.9], None, r"lies in \[0, 1\] on a 84x84 image"),
    ([True, 0, 10, 10], None, r"'box' must be \[x0, y0, x1, y1\], four finite numbers \(pixels\), got \[True, 0, 10, 10\]"),
    ([0, 0, float("inf"), 10], None, r"'box' must be .*four finite numbers.*inf"),
    ([0, 0, float("nan"), 10], None, r"'box' must be .*four finite numbers.*nan"),
    ([0.1, 0.1, 1.5, 0.5], "normalized", r"'box' \[0\.1, 0\.1, 1\.5, 0\.5\] with 'box_format' 'normalized' must lie in \[0, 1\]"),
    ([1, 1, 5, 5], "percent", r"'box_format' 'percent': use one of 'pixels', 'normalized'"),
])
def test_bad_boxes_are_refused_naming_the_box(box, fmt, message):
    from train.data import BadSample

    out = _loader([_record(box, fmt)])((0, 0))
    assert isinstance(out, BadSample) and out.reason == "bad_box" and re.search(message, out.message), out


@pytest.mark.parametrize(("box", "pixels"), [([0.0, 0.0, 1.0, 1.0], [0, 0, 84, 84]), ([0.2, 0.2, 0.9, 0.9], [16, 16, 76, 76])])
def test_normalized_boxes_cover_their_share_of_the_image(box, pixels):
    from flexattn_jax.selection import grounding_target
    from tests.fixtures import tiny_config

    out = _loader([_record(box, "normalized"), _record(pixels)])
    got, want = out((0, 0))["grounding"], out((1, 0))["grounding"]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, grounding_target(np.asarray(pixels), (84, 84), tiny_config().lr_grid))
    assert got.sum() == pytest.approx(1.0) and (got > 0).sum() > 1  # not pulled to the top-left cell


def test_a_tiny_image_keeps_its_pixel_box():
    out = _loader([_record([0, 0, 1, 1], size=(3, 3))])((0, 0))
    assert out["grounding"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), -1.0])
def test_grounding_weight_must_be_finite_and_non_negative(weight):
    from train.config import TrainConfig

    with pytest.raises(ValueError, match=rf"grounding_weight={weight} must be a finite number >= 0"):
        TrainConfig(grounding_weight=weight)


def test_a_grounding_weight_on_data_without_boxes_warns_with_the_count(monkeypatch):
    import train.loop
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from tests.fixtures import TEST_SEQ_LEN, small_train_config, tiny_config
    from train.config import DataConfig
    from train.data import TrainData

    records = [{k: v for k, v in _record(None).items() if k != "box"} for _ in range(6)]
    data = TrainData(tiny_config(), DataConfig(max_len=TEST_SEQ_LEN, threads=1), build_demo_tokenizer(), 2, records=records)

    class Reached(Exception):
        pass

    def stop(*a, **k):
        raise Reached

    monkeypatch.setattr(train.loop, "make_step", stop)
    with pytest.warns(UserWarning, match=r"grounding weight 0\.5, but none of the 6 records has a 'box': the grounding term does nothing"):
        with pytest.raises(Reached):
            train.loop.train(tiny_config(), None, data, small_train_config(grounding_weight=0.5, batch_size=2, grad_accum=1))
    records[2]["box"] = [1, 1, 9, 9]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Reached):
            train.loop.train(tiny_config(), None, TrainData(tiny_config(), DataConfig(max_len=TEST_SEQ_LEN, threads=1),
                                                            build_demo_tokenizer(), 2, records=records),
                             small_train_config(grounding_weight=0.5, batch_size=2, grad_accum=1))


# ---- compile: one-line errors naming the flag, libtpu quiet --------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--program", "train", "--select-rows", "0"], r"--select-rows 0 must be at least 1"),
    (["--program", "train", "--select-rows", "-1"], r"--select-rows -1 must be at least 1"),
    (["--program", "prefill", "--seq-len", "64"], r"--seq-len 64 is shorter than a sample: the image alone is 576 tokens; "
                                                  r"use at least 577"),
    (["--mesh", "fsdp=3"], r"--mesh fsdp=3: mesh .* uses 3 devices, which does not divide the 4 available"),
    (["--mesh", "fsdp=8"], r"--mesh fsdp=8: mesh .* needs 8 devices; only 4 are available"),
])
def test_compile_errors_name_the_flag_in_one_line(flags, message, capfd):
    pytest.importorskip("libtpu")
    from flexattn_jax.app.cli import main

    code = main(["compile", "--target", "v5e:2x2", "--model", "llava-1.5-7b", "--layers", "1", *flags])
    out, err = capfd.readouterr()  # file descriptors: libtpu writes there, past sys.stderr
    assert code == 2 and out == "", (out, err)
    assert len(err.splitlines()) == 1 and re.fullmatch(rf"flexattn-jax compile: {message}.*\n", err), err


def test_import_flexattn_jax_keeps_libtpu_quiet_on_a_host_without_tpu(tmp_path):
    pytest.importorskip("libtpu")
    from flexattn_jax import tpu_chips_present

    if tpu_chips_present() is not False:
        pytest.skip("this host has TPU chips (or no sysfs)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import flexattn_jax, jax; print(jax.default_backend())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "cpu" and p.stderr == "", p.stderr
    # jax imported first: the library updates its setting before the backends start
    p = subprocess.run([sys.executable, "-c", "import jax, flexattn_jax; print(jax.default_backend())"], capture_output=True,
                       text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_lock_file_sits_next_to_the_output(tmp_path):
    from flexattn_jax.app.resume import OutputBusyError, lock_output, lock_path

    assert lock_path(tmp_path / "a.jsonl") == tmp_path / "a.jsonl.lock" and lock_path(tmp_path / "run") == tmp_path / "run.lock"
    with lock_output(tmp_path / "a.jsonl", "--output") as held:
        assert held.stale_pid is None and (tmp_path / "a.jsonl.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputBusyError, match=rf"PID {os.getpid()}"):  # another open file description: refused too
            lock_output(tmp_path / "a.jsonl", "--output")
    assert not (tmp_path / "a.jsonl.lock").exists()
    assert lock_output("/dev/full", "--output").path is None  # not a regular file: nothing to lock
