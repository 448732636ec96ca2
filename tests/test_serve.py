"""`flexattn-jax serve` (issues 23, 35): a real server in a subprocess on localhost, the real `openai` client, raw HTTP.

One module-scoped server (tiny checkpoint, the decode slots engine, --warmup, the compile cache
shared with the `generate` reference run) answers the chat, streaming, concurrency and bad-input
cases; a second one with 64-token answers shows real streaming, a short request overtaking a long
one and the image feature cache. Short-lived servers show a full queue (503 with Retry-After) and
SIGTERM draining the requests in flight (exit status 0), for the engine and for the wave
scheduler. `bench.serve --smoke` runs the benchmark end to end at small counts.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.serve import ServerProcess
from flexattn_jax.app.chat import ChatError, Limits, parse_chat

from .checkpoints import write_tiny_checkpoint

MAX_NEW = 8
ROOT = Path(__file__).resolve().parents[1]
SERVE = ["--max-new-tokens", str(MAX_NEW), "--max-prompt-tokens", "64", "--max-batch", "8"]  # one bucket: one program
QUESTIONS = ["what is it?", "which colour?", "describe the picture.", "is there a square?"]


def _env(cache: Path) -> dict[str, str]:
    """Subprocesses share one persistent compile cache: the server compiles, `generate` and later servers load."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the session's (conftest): their own
    return {**env, "PYTHONPATH": str(ROOT), "FLEXATTN_JAX_COMPILE_CACHE": "1", "FLEXATTN_JAX_CACHE": str(cache)}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels in a few bytes (its size is read before any decoding)."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _body(image_url: str, question: str = "what is it?", **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}], **kw}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The checkpoint, an image root (images, a symbolic link out of it), an image outside it, the cache directory."""
    d = tmp_path_factory.mktemp("serve")
    ckpt = write_tiny_checkpoint(d / "tiny")
    root, outside = d / "root", d / "outside"
    root.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(30, 40, 3), (50, 20, 3), (24, 24, 3), (40, 64, 3)]):
        (root / f"img{i}.png").write_bytes(_png(rng.integers(0, 256, shape, dtype=np.uint8)))
    (outside / "secret.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (root / "link.png").symlink_to(outside / "secret.png")
    return {"ckpt": ckpt, "root": root, "outside": outside, "cache": d / "cache", "dir": d}


@pytest.fixture(scope="module")
def server(world):
    args = ["--checkpoint", str(world["ckpt"]), "--model-name", "tiny", *SERVE, "--batch-window-ms", "50", "--warmup",
            "--image-root", str(world["root"]), "--max-image-bytes", "200000"]
    with ServerProcess(args, env=_env(world["cache"]), ready_timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def items(world):
    """16 (image file, question) pairs and `flexattn-jax generate`'s answer to each (its batch of 8, the same options)."""
    pairs = [(world["root"] / f"img{i % 4}.png", QUESTIONS[(i // 4 + i) % 4]) for i in range(16)]
    batch, out = world["dir"] / "batch.jsonl", world["dir"] / "answers.jsonl"
    batch.write_text("".join(json.dumps({"image": str(p), "prompt": q}) + "\n" for p, q in pairs))
    subprocess.run([sys.executable, "-m", "flexattn_jax.app.cli", "generate", "--checkpoint", str(world["ckpt"]), "--batch", str(batch),
                    "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", "8"],
                   env=_env(world["cache"]), check=True, capture_output=True, timeout=300)
    records = [json.loads(line) for line in out.read_text().splitlines()][1:]  # after the header record
    answers = [r["answer"] for r in records]
    return [(p, q, a) for (p, q), a in zip(pairs, answers, strict=True)]


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_with_an_image_and_streaming_equal_generate(server, items):
    client = _client(server)
    path, question, expected = items[0]
    message = [{"role": "user", "content": [{"type": "text", "text": question},
                                            {"type": "image_url", "image_url": {"url": _data_url(path.read_bytes())}}]}]
    r = client.chat.completions.create(model="tiny", messages=message)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= MAX_NEW
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny", messages=message, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    short = client.chat.completions.create(model="tiny", messages=message, max_tokens=2)  # fewer tokens: a prefix of the answer
    assert short.usage.completion_tokens <= 2 and expected.startswith(short.choices[0].message.content.strip())
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_sixteen_concurrent_requests_each_equal_generate(server, items):
    """Paths and data: URLs mixed, all at once: batches unlike generate's, the same answers (greedy)."""
    client = _client(server)

    def ask(i: int) -> str:
        path, question, _ = items[i]
        url = _data_url(path.read_bytes()) if i % 2 else path.name
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}])
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [a for _, _, a in items]
    metrics = _metrics(server)
    assert metrics['flexattn_requests_total{code="200"}'] >= 16 and metrics["flexattn_queue_depth"] == 0
    assert metrics["flexattn_slots"] == 8 and metrics["flexattn_slots_in_use"] == 0
    assert metrics["flexattn_time_to_first_token_seconds_count"] >= 16 and metrics["flexattn_queue_wait_seconds_count"] >= 16
    assert metrics["flexattn_inter_token_latency_seconds_count"] >= 1 and metrics["flexattn_request_latency_seconds_count"] >= 16
    assert metrics["flexattn_image_cache_hits_total"] >= 12  # 16 requests about 4 images


def _metrics(server) -> dict[str, float]:
    """The server's /metrics samples by name (labels included, as Prometheus prints them)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.slow
def test_sampling_requests_with_a_seed(server, items):
    """A sampled request with a seed repeats itself (its own key in its slot)."""
    client = _client(server)
    path, question, _ = items[0]
    message = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": path.name}}]}]
    a, b = (client.chat.completions.create(model="tiny", messages=message, temperature=1.0, top_p=0.9, seed=5) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content and 1 <= a.usage.completion_tokens <= MAX_NEW


def _bad_cases(world) -> list[tuple[str, object, int, str]]:
    img = (world["root"] / "img0.png").read_bytes()
    ok = _body(_data_url(img))
    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("unknown model", {**ok, "model": "gpt-4o"}, 404, "'gpt-4o' does not exist"),
        ("no image", {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}, 400, "no image"),
        ("missing image file", _body("nothere.png"), 400, "image file not found under --image-root: nothere.png"),
        ("two images", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(img)}},
            {"type": "image_url", "image_url": {"url": "img1.png"}}, {"type": "text", "text": "compare"}]}]}, 400, "2 images"),
        ("undecodable image", _body(_data_url(b"this is not an image")), 400, "cannot read image data"),
        ("not base64", _body("data:image/png;base64,@@@@"), 400, "not valid base64"),
        ("huge image (pixels)", _body(_data_url(_png_header(10_000, 10_000))), 400, "more than the limit of 89,478,485"),
        ("extreme aspect", _body(_data_url(_png_header(5000, 10))), 400, "aspect ratio of 500:1"),
        ("huge image (bytes)", _body(_data_url(os.urandom(300_000))), 413, "--max-image-bytes"),
        ("path escape ..", _body("../outside/secret.png"), 403, "outside --image-root"),
        ("absolute path outside", _body(str(world["outside"] / "secret.png")), 403, "outside --image-root"),
        ("symlink out of the root", _body("link.png"), 403, "outside --image-root"),
        ("remote URL", _body("https://example.com/a.png"), 400, "remote image URLs are not fetched"),
        ("max_tokens 0", {**ok, "max_tokens": 0}, 400, "'max_tokens' must be at least 1, got 0"),
        ("max_tokens negative", {**ok, "max_tokens": -5}, 400, "'max_tokens' must be at least 1, got -5"),
        ("max_tokens above the server's", {**ok, "max_tokens": 10_000}, 400, "--max-new-tokens 8"),
        ("temperature", {**ok, "temperature": -1}, 400, "'temperature' must be a number in [0, 2]"),
        ("prompt too long", _body(_data_url(img), "why " * 200), 400, "the context allows 64"),
        ("empty prompt", _body(_data_url(img), "   "), 400, "empty prompt"),
        ("too much text", _body(_data_url(img), "x" * 70_000), 400, "70,000 characters of text, more than the limit of 65,536"),
        ("last message not the user's", {"model": "tiny", "messages": [*ok["messages"], {"role": "assistant", "content": "x"}]},
         400, "the last message must be from the user"),
        # issue 33: what once answered 500 (and failed the other requests of its wave)
        ("unpaired surrogate", json.dumps(_body(_data_url(img), "what \ud800 is it?")).encode(), 400,
         "messages[0].content[1].text is not valid UTF-8 text (an unpaired surrogate U+D800"),
        ("200 KB nested body", b"[" * 100_000 + b"]" * 100_000, 400, "nests lists/objects more than 16 levels deep"),
        ("seed 2**64", {**ok, "seed": 2**64}, 400, "'seed' must be a 64-bit integer"),
    ]


def test_bad_requests_get_a_named_4xx_and_the_server_keeps_serving(server, world, items):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, body, status, fragment in _bad_cases(world):
            r = http.post("/v1/chat/completions", content=body) if isinstance(body, bytes) else http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert fragment in error["message"], (name, error)
            assert error["type"] and "param" in error
        path, question, expected = items[0]
        r = http.post("/v1/chat/completions", json=_body(path.name, question))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.slow
def test_wave_disconnect_full_queue_503_then_sigterm_answers_the_requests_in_flight_and_exits_0(world):
    """One short-lived server with the wave scheduler, --max-queue 2 and a 3 s batch window. A client that disconnects while waiting is left
    out of the batch; the other request is answered. Of 10 requests sent at once, two wait in the window and eight
    get 503 with Retry-After. Then SIGTERM with two requests waiting: both are
    answered, the process exits with status 0 and no longer listens."""
    args = ["--checkpoint", str(world["ckpt"]), "--model-name", "tiny", *SERVE, "--max-queue", "2", "--batch-window-ms", "3000",
            "--scheduler", "wave"]
    body = _body(_data_url((world["root"] / "img0.png").read_bytes()))
    post = lambda _=None: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)  # noqa: E731
    with ServerProcess(args, env=_env(world["cache"]), ready_timeout=300) as s:
        with ThreadPoolExecutor(2) as pool:  # a client that leaves while its request waits cancels only its own
            other = pool.submit(post)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/chat/completions", json=body, timeout=0.5)
            assert other.result().status_code == 200
        deadline = time.monotonic() + 30  # the stderr reader thread may lag the answer on a loaded machine
        while not any("serve: batch:" in line for line in s.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [line.split("batch: ")[1].split(",")[0] for line in s.lines if "serve: batch:" in line] == ["1/8 rows"]

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(post, range(10)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == 2 and codes.count(503) == 8, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1 and "--max-queue 2" in busy.json()["error"]["message"]
        assert busy.json()["error"]["code"] == "queue_full"

        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(post().status_code)) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health", timeout=10).json()["pending"] < 2:  # both wait in the batch window
            assert time.monotonic() < deadline, "the requests never arrived"
            time.sleep(0.02)
        assert s.terminate(timeout=120) == 0
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        assert any("SIGTERM" in line for line in s.lines)
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=5)


LONG = 64


@pytest.fixture(scope="module")
def long_server(world):
    """The engine with 4 slots and answers of up to 64 tokens, one token per step call (a long answer is 64 calls: a request
    sent during it has room to be answered first even on loaded cores)."""
    args = ["--checkpoint", str(world["ckpt"]), "--model-name", "tiny", "--max-new-tokens", str(LONG), "--max-prompt-tokens", "64",
            "--slots", "4", "--decode-steps", "1", "--warmup", "--image-root", str(world["root"])]
    with ServerProcess(args, env=_env(world["cache"]), ready_timeout=300) as s:
        yield s


def _ask(client, image: str, question: str, history: list | None = None, **kw):
    first = {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]}
    return client.chat.completions.create(model="tiny", messages=[first, *(history or [])], **kw)


@pytest.fixture(scope="module")
def long_item(long_server):
    """An (image, question) whose greedy answer runs all 64 tokens (the model does not stop early), and that answer."""
    client = _client(long_server)
    for i in range(4):
        for q in QUESTIONS:
            r = _ask(client, f"img{i}.png", q)
            if r.usage.completion_tokens == LONG:
                return f"img{i}.png", q, r.choices[0].message.content
    pytest.fail("every question stopped before 64 tokens")


def test_streaming_sends_the_tokens_as_they_are_decoded(long_server, long_item):
    """The first chunk comes right after the prefill, the text chunks spread over the decoding; together they are the
    non-streamed answer, and the usage comes last."""
    image, question, expected = long_item
    t0 = time.perf_counter()
    arrivals, texts, chunks = [], [], []
    for chunk in _ask(_client(long_server), image, question, stream=True, stream_options={"include_usage": True}):
        arrivals.append(time.perf_counter() - t0)
        texts.append(chunk.choices[0].delta.content if chunk.choices else None)
        chunks.append(chunk)
    assert "".join(t or "" for t in texts) == expected
    assert chunks[-1].usage.completion_tokens == LONG and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    content = [a for a, t in zip(arrivals, texts, strict=True) if t]
    assert len(content) >= 8, texts  # token by token, not one block
    assert arrivals[0] < arrivals[-1] and content[-1] - content[0] > 0.25 * arrivals[-1], (arrivals[0], content[0], arrivals[-1])


def test_a_short_request_sent_while_a_long_one_decodes_finishes_first(long_server, long_item):
    """Continuous batching: a 1-token request sent after the 64-token one's first chunk takes a free slot at once."""
    image, question, expected = long_item
    _ask(_client(long_server), "img1.png", "which colour?", max_tokens=1)  # its prefill compiled: the race is slots, not XLA
    chunks = iter(_ask(_client(long_server), image, question, stream=True))
    text = next(chunks).choices[0].delta.content or ""  # the long request is in its slot, decoding
    finished: dict[str, float] = {}

    def short():
        r = _ask(_client(long_server), "img1.png", "which colour?", max_tokens=1)
        finished["short"] = time.perf_counter()
        return r

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(short)
        text += "".join(c.choices[0].delta.content or "" for c in chunks)
        finished["long"] = time.perf_counter()
        assert fut.result().usage.completion_tokens == 1
    assert text == expected
    assert finished["short"] < finished["long"], finished


def test_a_repeated_image_is_encoded_once(long_server):
    """The second question about an image (and a follow-up turn) take its features from the cache: same answer, a hit."""
    client = _client(long_server)
    url = _data_url(_png(np.random.default_rng(7).integers(0, 256, (36, 28, 3), dtype=np.uint8)))
    m0 = _metrics(long_server)
    a = _ask(client, url, "what is it?", max_tokens=8)
    m1 = _metrics(long_server)
    b = _ask(client, url, "what is it?", max_tokens=8)
    follow = _ask(client, url, "what is it?", [{"role": "assistant", "content": "a square"}, {"role": "user", "content": "why?"}],
                  max_tokens=8)
    m2 = _metrics(long_server)
    hits, misses = "flexattn_image_cache_hits_total", "flexattn_image_cache_misses_total"
    assert (m1[misses] - m0[misses], m1[hits] - m0[hits]) == (1, 0)
    assert (m2[misses] - m1[misses], m2[hits] - m1[hits]) == (0, 2)
    assert b.choices[0].message.content == a.choices[0].message.content and follow.usage.prompt_tokens > a.usage.prompt_tokens


def test_engine_full_queue_503_then_sigterm_finishes_the_streams_in_flight(world):
    """One slot, --max-queue 2: of 12 requests sent at once at most two are accepted while the first compiles and
    decodes, the others get 503 with Retry-After. Then two streamed 64-token answers, SIGTERM once the first has
    begun: both stream to the end ([DONE]) and the process exits with status 0."""
    args = ["--checkpoint", str(world["ckpt"]), "--model-name", "tiny", "--max-new-tokens", str(LONG), "--max-prompt-tokens", "64",
            "--slots", "1", "--max-queue", "2"]
    body = _body(_data_url((world["root"] / "img0.png").read_bytes()))
    with ServerProcess(args, env=_env(world["cache"]), ready_timeout=300) as s:
        post = lambda _=None: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=300)  # noqa: E731
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(post, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["Retry-After"]) >= 1 and "--max-queue 2" in busy.json()["error"]["message"]

        started = threading.Event()
        streams: list[list[str]] = [[], []]

        def stream(i: int) -> None:
            with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
                for line in r.iter_lines():
                    if line:
                        streams[i].append(line)
                        started.set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert started.wait(120)
        deadline = time.monotonic() + 120  # the signal only once both are accepted: one decoding and one queued, or streaming
        while not (all(streams) or "flexattn_queue_depth 2.0" in httpx.get(s.url + "/metrics", timeout=30).text):
            assert time.monotonic() < deadline, "the second streamed request was never accepted"
            time.sleep(0.05)
        assert s.terminate(timeout=120) == 0
        for t in threads:
            t.join(60)
        for lines in streams:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")
        assert any("SIGTERM" in line for line in s.lines)


def test_parse_chat_renders_like_generate_and_names_each_problem(tmp_path):
    """No server: the one-turn prompt is generate's question; a conversation goes through the template."""
    limits = Limits(model="m", max_new_tokens=8, image_root=tmp_path)
    (tmp_path / "a.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    one = parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "a.png"}}]}]}).encode(), limits)
    assert (one.request.prompt, one.request.formatted, one.max_tokens, one.sampling) == ("what?", False, 8, (0.0, 1.0, None))
    assert one.request.image == str((tmp_path / "a.png").resolve())
    conv = parse_chat(json.dumps({"model": "m", "temperature": 0.5, "seed": 3, "stop": "x", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "a cat"}, {"role": "user", "content": "sure?"}]}).encode(), limits)
    assert conv.request.formatted and conv.sampling == (0.5, 1.0, 3) and conv.stop == ["x"]
    assert conv.request.prompt == "Be brief. USER: <image>\nwhat? ASSISTANT: a cat</s>USER: sure? ASSISTANT:"
    with pytest.raises(ChatError, match="'n' must be 1"):
        parse_chat(json.dumps({"model": "m", "n": 2, "messages": []}).encode(), limits)


@pytest.mark.parametrize("argv, fragment", [
    (["--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["--image-root", "/nonexistent/dir"], "--image-root /nonexistent/dir is not a directory"),
    (["--max-prompt-tokens", "5000"], "--max-prompt-tokens 5000 must be in [1, 2048]"),
    (["--mesh", "data=2,tensor=4", "--slots", "3"], "--slots 3 is not a multiple of --mesh data=2,tensor=4's data axis (2)"),
    (["--mesh", "data=4", "--scheduler", "wave", "--max-batch", "6"], "--max-batch 6 is not a multiple of --mesh data=4's data axis (4)"),
    (["--mesh", "data=3"], "--mesh 'data=3': mesh {'data': 3"),
])
def test_bad_flags_exit_2_before_loading(world, argv, fragment, capsys):
    from flexattn_jax.app.serve import main

    assert main(["--checkpoint", str(world["ckpt"]), "--port", "0", *argv]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.slow
def test_bench_smoke(world, tmp_path):
    """The benchmark end to end at --smoke counts, on the tiny checkpoint: both schedulers answer every request."""
    out = tmp_path / "serve.json"
    subprocess.run([sys.executable, "-m", "bench.serve", "--smoke", "--checkpoint", str(world["ckpt"]), "--short", "2", "--long", "8",
                    "--out", str(out)], env=_env(world["cache"]), check=True, capture_output=True, timeout=900)
    r = json.loads(out.read_text())
    phases = (r["wave"]["mixed"], r["slots"]["mixed"], r["soak"])
    assert [p["requests"] for p in phases] == [16, 16, 32] and all(p["ok"] == p["requests"] for p in phases)
    assert all(0 < p["ttft_p50_s"] <= p["latency_p50_s"] for p in phases)
    assert 0 < r["slots"]["mixed"]["occupancy"] <= 1 and 0 < r["wave"]["mixed"]["occupancy"] <= 1
    assert r["repeat"]["cache_hits"] >= 2 and r["wave"]["exit_status"] == r["slots"]["exit_status"] == 0
    assert {g["goal"] for g in r["goals"]} >= {"lost requests (no HTTP answer) == 0", "5xx other than 503 == 0"}
