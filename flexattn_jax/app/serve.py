"""``flexattn-jax serve``: an OpenAI-compatible HTTP server on the jitted generation.

Two schedulers. The default, ``--scheduler slots``, is the engine of
:mod:`flexattn_jax.app.engine`: continuous batching over ``--slots`` decode slots, each request
prefilled as soon as a slot is free and its tokens streamed as they are decoded. The other,
``--scheduler wave`` (the baseline of ``bench.serve``), is the dynamic batching described below.

The wave scheduler's thread takes requests from a bounded queue: the first one opens a window of
``--batch-window-ms`` in which up to ``--max-batch`` requests gather (requests already waiting
are taken along, up to :func:`~flexattn_jax.app.inference.default_window`, so the length bucketing has
something to group). That wave goes through :func:`~flexattn_jax.app.inference.stream_answers`, the
pipeline of ``generate``: images decoded and resized in its bounded worker pool, prompts grouped
into the length buckets, one jitted generation per batch padded to ``--max-batch`` rows (so one
compile per bucket), early stop when every row is done. Each request is answered as its batch
finishes. This is *dynamic* batching: a request never joins a decode loop already running; it
waits for the next wave.

Because batches have a fixed shape and a prompt's bucket depends only on its own length, a greedy
request gets exactly the tokens ``flexattn-jax generate`` gives for the same image and prompt,
whatever else shares its batch. Sampling requests are batched with those of the same
``temperature``, ``top_p`` and ``seed`` (static arguments of the jitted program).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import queue
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from flexattn_jax.app.chat import ChatError, ChatRequest, Limits, StreamWriter, completion_body, completion_of, error_body, parse_chat
from flexattn_jax.app.engine import Engine, QueueLimit
from flexattn_jax.app.inference import Answer, GenerationOptions, Request, default_window, generation_args, stream_answers
from flexattn_jax.preprocess import BUCKETS, bucket_length, format_prompt, tokenize_with_image

log = logging.getLogger("flexattn_jax.serve")


def _log_to_stderr() -> None:
    """This module's INFO lines (one per batch) on stderr, whatever logging an imported library set up."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s serve: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


SERVE_OPTIONS = generation_args(("max_new_tokens", "batch_size", "hr_budget", "hr_strategy", "workers"),
                                flags={"batch_size": "--max-batch"})
"""serve's flags of the generation options (a request's temperature, top_p and seed come with the request)."""


def serve_parser(prog: str = "flexattn-jax serve") -> argparse.ArgumentParser:
    from flexattn_jax.app.generate_cli import add_compile_cache_args, add_model_args

    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve a converted checkpoint over HTTP with OpenAI's chat-completions API: POST /v1/chat/completions "
        "(messages with text and one image_url part as a data: URL or a path under --image-root; max_tokens, temperature, "
        "top_p, seed, stop, stream), GET /v1/models, GET /health, GET /metrics (Prometheus). Concurrent requests are "
        "batched dynamically into the length buckets of `generate` (a greedy request gets exactly generate's tokens). "
        "A full queue answers 503 with Retry-After; a bad request a 4xx naming the problem. SIGTERM (or Ctrl-C) stops "
        "accepting, answers the requests in flight, then exits with status 0.",
        epilog="exit status: 0 after a graceful stop; 2 on bad arguments, an unreadable checkpoint or a port that cannot be bound.",
    )
    p.add_argument("--checkpoint", required=True, help="a directory written by `flexattn-jax convert` (params + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one, printed at start (default: 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint directory's name)")
    add_model_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. flex.threshold=48")
    SERVE_OPTIONS.add(p.add_argument_group("generation (GenerationOptions)", "a request's max_tokens may only lower "
                                           "--max-new-tokens; --max-batch is the rows of a --scheduler wave batch"))
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, image tokens included, rounded up to a length bucket; fewer buckets to "
                   "compile (default: the model's context less --max-new-tokens)")
    p.add_argument("--scheduler", choices=["slots", "wave"], default="slots",
                   help="'slots': continuous batching over --slots decode slots, tokens streamed as decoded; 'wave': dynamic "
                   "batching of whole requests through generate's batches of --max-batch rows (the baseline) (default: slots)")
    p.add_argument("--slots", type=int, default=8,
                   help="decode slots (--scheduler slots): requests decoded together, one step program compiled (default: 8)")
    p.add_argument("--prefill-batch", type=int, default=4,
                   help="requests of one length bucket prefilled together when several wait (--scheduler slots; default: 4)")
    p.add_argument("--decode-steps", type=int, default=4,
                   help="tokens each slot decodes per call of the step program (--scheduler slots): one host round trip for "
                   "several tokens; a request waits at most this many steps for a free slot's turn (default: 4)")
    p.add_argument("--image-cache-mb", type=float, default=256.0,
                   help="image features (vision encodings) kept by image content, least recently used dropped first "
                   "(--scheduler slots; 0: no cache; default: 256)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others to join (default: 10)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests accepted and not yet answered; beyond it: HTTP 503 with Retry-After (default: 256)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may wait for its answer before an HTTP 504 (default: 300)")
    p.add_argument("--image-root", metavar="DIR", default=None,
                   help="image_url parts may name files under DIR (plain or file:// paths; '..' and symbolic links out of DIR "
                   "are refused); without it only data: URLs are accepted")
    p.add_argument("--max-image-bytes", type=int, default=20 << 20, help="largest image accepted, encoded (default: 20 MiB)")
    p.add_argument("--warmup", action="store_true",
                   help="compile (or load from the compile cache) the greedy program of every length bucket before "
                   "listening, so the first requests do not wait for a compile")
    p.add_argument("--ui", action="store_true",
                   help="also serve a page for people at /ui (Gradio, same process and engine as the API): upload or paste an image, "
                   "ask, read the answer as it streams, see per layer and per answer token the attention heat map with the "
                   "selected HR regions outlined, the share of HR tokens selected and the answer's FLOPs against reading every "
                   "HR token; hr_budget, max tokens and temperature set on the page (needs gradio: pip install -e '.[ui]')")
    add_compile_cache_args(p)
    return p


def check_serve_args(args: argparse.Namespace) -> GenerationOptions:
    """The flags that need no checkpoint, checked before any work; ValueError names the flag and value. The generation
    options, their buckets those of ``--max-prompt-tokens``."""
    for flag, value, least in (("--slots", args.slots, 1), ("--prefill-batch", args.prefill_batch, 1),
                               ("--decode-steps", args.decode_steps, 1), ("--max-queue", args.max_queue, 1),
                               ("--max-image-bytes", args.max_image_bytes, 1), ("--port", args.port, 0)):
        if value < least:
            raise ValueError(f"{flag} {value} must be at least {least}")
    if args.port > 65535:
        raise ValueError(f"--port {args.port} must be at most 65535")
    if args.max_prompt_tokens is not None and not 1 <= args.max_prompt_tokens <= max(BUCKETS):
        raise ValueError(f"--max-prompt-tokens {args.max_prompt_tokens} must be in [1, {max(BUCKETS)}]")
    if not (math.isfinite(args.image_cache_mb) and args.image_cache_mb >= 0):
        raise ValueError(f"--image-cache-mb {args.image_cache_mb} must be a finite number >= 0")
    if args.mesh is not None:  # the slots (or a wave's rows) are split over the mesh's data axis
        import jax

        from flexattn_jax.sharding import ShardingError, parse_mesh_spec

        try:
            data = parse_mesh_spec(args.mesh, jax.device_count())["data"]
        except ShardingError as e:
            raise ValueError(f"--mesh {args.mesh!r}: {e}") from e
        flag, rows = ("--slots", args.slots) if args.scheduler == "slots" else ("--max-batch", args.max_batch)
        if rows % data:
            raise ValueError(f"{flag} {rows} is not a multiple of --mesh {args.mesh}'s data axis ({data})")
    if not (math.isfinite(args.batch_window_ms) and args.batch_window_ms >= 0):
        raise ValueError(f"--batch-window-ms {args.batch_window_ms} must be a finite number >= 0")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise ValueError(f"--request-timeout {args.request_timeout} must be a positive number of seconds")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise ValueError(f"--image-root {args.image_root} is not a directory")
    if args.ui:
        import importlib.util

        if importlib.util.find_spec("gradio") is None:
            raise ValueError("--ui needs gradio: pip install -e '.[ui]'")
    return SERVE_OPTIONS.build(args, buckets=serve_buckets(args.max_prompt_tokens))


def serve_buckets(max_prompt_tokens: int | None) -> tuple[int, ...]:
    """The length buckets a prompt of at most ``max_prompt_tokens`` can land in (all of them for None)."""
    if max_prompt_tokens is None:
        return BUCKETS
    top = bucket_length(max_prompt_tokens)
    return tuple(b for b in BUCKETS if b <= top)


# ---- the scheduler ---------------------------------------------------------------------------------


@dataclass
class Job:
    """One accepted request: what to run, how to hand back the result (an Answer, or the exception of a failed batch)."""

    chat: ChatRequest
    deliver: Callable[[Answer | BaseException], None]
    cancelled: bool = False  # the client left or timed out: skipped if its wave has not started, its slot freed
    settled: bool = field(default=False, repr=False)
    on_text: Callable[[str], None] | None = None  # the engine's streamed text, as decoded (first: right after prefill)
    submitted: float = 0.0  # perf_counter() when accepted


class Scheduler(QueueLimit):
    """Dynamic batching on a thread: waves of queued jobs through :func:`stream_answers`, at most ``max_queue`` pending.

    ``on_batch`` receives each batch's summary (see ``stream_answers``) and ``queue`` (jobs pending).
    """

    def __init__(self, params, cfg, tokenizer, options: GenerationOptions | None = None, *, mesh=None, batch_window_s: float = 0.01,
                 max_queue: int = 256, on_batch: Callable[[dict[str, Any]], None] | None = None):
        super().__init__(max_queue)
        self.params, self.cfg, self.tokenizer, self.mesh = params, cfg, tokenizer, mesh
        self.options = options or GenerationOptions()  # batch_size: the rows of every batch (--max-batch)
        self.max_batch, self.batch_window_s = self.options.batch_size, batch_window_s
        self.max_new_tokens, self.buckets = self.options.max_new_tokens, self.options.buckets
        self.on_batch = on_batch
        self.last_batch_s = 1.0
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexattn-scheduler", daemon=True)

    def _enqueue(self, job: Job) -> None:
        self._queue.put(job)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time to work through the queue, 1 to 60."""
        waves = math.ceil(self.pending / max(1, default_window(self.max_batch)))
        return int(min(60, max(1, math.ceil(waves * self.last_batch_s))))

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, answer what is queued, stop the thread."""
        self.accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _collect(self) -> list[Job]:
        try:
            jobs = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_window_s
        while len(jobs) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                jobs.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        while len(jobs) < default_window(self.max_batch):  # already waiting: bucketed together
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs:
                self._run_wave(jobs)
            elif self._stop.is_set():
                return

    def run_requests(self, requests: list[Request], *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     skip: Callable[[int, Request], bool] | None = None):
        """``stream_answers`` with this server's batch shape, buckets and options: ``(index, Answer)`` as batches finish."""
        return stream_answers(
            self.params, self.cfg, self.tokenizer, requests, self.options, temperature=temperature, top_p=top_p, seed=seed,
            window=max(len(requests), self.max_batch), mesh=self.mesh, progress=False, skip=skip, on_batch=self._batch_done,
        )

    def _batch_done(self, info: dict[str, Any]) -> None:
        if not info["compiled"]:
            self.last_batch_s = info["seconds"]
        if self.on_batch is not None:
            self.on_batch({**info, "queue": self.pending})

    def _run_wave(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.chat.sampling, []).append(job)
        for (temperature, top_p, seed), group in groups.items():
            if seed is None:
                seed = random.getrandbits(31) if temperature > 0 else 0
            try:
                stream = self.run_requests([j.chat.request for j in group], temperature=temperature, top_p=top_p, seed=seed,
                                           skip=lambda i, _req, group=group: group[i].cancelled)
                for i, ans in stream:
                    self._settle(group[i], ans)
            except Exception as e:  # noqa: BLE001 - the batch failed (e.g. device memory): its requests get a 500
                log.exception("batch failed")
                for job in group:
                    self._settle(job, e)
            finally:
                for job in group:  # skipped (cancelled) jobs
                    self._settle(job, None)

    def warmup(self) -> int:
        """Run one greedy request in every bucket a prompt can land in (compiles, or loads from the cache); the count."""
        from PIL import Image

        image = Image.new("RGB", (self.cfg.image_size, self.cfg.image_size))
        requests = warmup_prompts(self.cfg, self.tokenizer, self.buckets, self.max_context)
        for _, ans in self.run_requests([Request(image, p) for p in requests]):
            if ans.error is not None:
                raise RuntimeError(f"warm-up request failed: {ans.error}")
        return len(requests)


def warmup_prompts(cfg, tokenizer, buckets, max_context: int) -> list[str]:
    """One question per reachable bucket, as long as the bucket (and ``max_context``) allows: repeated words."""
    length = lambda k: len(tokenize_with_image(format_prompt(" ".join(["a"] * k)), tokenizer, cfg.image_token_id,  # noqa: E731
                                               cfg.num_image_tokens, num_images=1))
    out, below = [], 0
    for b in sorted(buckets):
        limit = min(b, max_context)
        if length(1) <= limit:
            lo, hi = 1, limit
            while lo < hi:  # the most words that fit
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if length(mid) <= limit else (lo, mid - 1)
            if length(lo) > below:
                out.append(" ".join(["a"] * lo))
        below = b
    return out


# ---- metrics ------------------------------------------------------------------------------------------


class Metrics:
    """The Prometheus series of one server (its own registry)."""

    def __init__(self, max_batch: int, pending: Callable[[], int], engine: Engine | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("flexattn_requests", "HTTP requests to /v1/chat/completions by status code", ["code"], registry=r)
        queue_depth = Gauge("flexattn_queue_depth", "requests accepted and not yet answered", registry=r)
        queue_depth.set_function(pending)
        self.batch_size = Histogram("flexattn_batch_size", "requests per batch (rows; the rest is padding)",
                                    buckets=list(range(1, max_batch + 1)), registry=r)
        self.batches = Counter("flexattn_batches", "batches run, by whether the call compiled (or loaded) a program",
                               ["compiled"], registry=r)
        self.batch_latency = Histogram("flexattn_batch_latency_seconds", "dispatch to tokens on the host, compile included",
                                       registry=r)
        self.request_latency = Histogram("flexattn_request_latency_seconds", "request received to answer ready (answered "
                                         "requests)", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.prompt_tokens = Counter("flexattn_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("flexattn_completion_tokens", "tokens returned to answered requests", registry=r)
        fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = {
            "ttft": Histogram("flexattn_time_to_first_token_seconds", "request accepted to its first token decoded", buckets=fast,
                              registry=r),
            "inter_token": Histogram("flexattn_inter_token_latency_seconds", "between two tokens of one request", buckets=fast,
                                     registry=r),
            "queue_wait": Histogram("flexattn_queue_wait_seconds", "request accepted to its prefill (a slot taken)", buckets=fast,
                                    registry=r),
        }
        if engine is not None:
            Gauge("flexattn_slots", "decode slots", registry=r).set(engine.slots)
            Gauge("flexattn_slots_in_use", "decode slots holding a request", registry=r).set_function(lambda: engine.slots_in_use)
            Gauge("flexattn_image_cache_bytes", "image features held by the cache", registry=r).set_function(lambda: engine.cache.bytes)
            r.register(_EngineCounters(engine))
        else:
            self.decode_steps = Counter("flexattn_decode_steps", "decode steps run (each advances every row by one token)",
                                        registry=r)

    def observe(self, name: str, seconds: float) -> None:
        """One of the engine's latencies: ``ttft``, ``inter_token`` or ``queue_wait``."""
        self.latency[name].observe(seconds)

    def batch(self, info: dict[str, Any]) -> None:
        self.batch_size.observe(info["size"])
        self.batches.labels(compiled=str(bool(info["compiled"])).lower()).inc()
        self.batch_latency.observe(info["seconds"])
        self.decode_steps.inc(info["steps"])

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCounters:
    """The engine's decode steps and image cache hits and misses as Prometheus counters (read at each scrape)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("flexattn_image_cache_hits", "images whose features came from the cache", value=self.engine.cache.hits)
        yield CounterMetricFamily("flexattn_image_cache_misses", "images encoded (not in the cache)", value=self.engine.cache.misses)
        yield CounterMetricFamily("flexattn_decode_steps", "decode steps run (each advances every slot by one token)",
                                  value=self.engine.steps)


def log_batch(info: dict[str, Any]) -> None:
    """The one log line of a batch."""
    log.info("batch: %d/%d rows, bucket %d, %s, %.3f s, %d decode steps, %d pending", info["size"], info["batch_size"],
             info["bucket"], "compiled" if info["compiled"] else "cached program", info["seconds"], info["steps"], info["queue"])


# ---- the HTTP app ----------------------------------------------------------------------------------------


class _Gone(Exception):
    """The client disconnected while its request waited."""


def make_app(scheduler: Engine | Scheduler, limits: Limits, metrics: Metrics, *, request_timeout: float = 300.0):
    """The ASGI app: /v1/chat/completions, /v1/models, /health, /metrics; errors as OpenAI error bodies."""
    app = FastAPI(title="flexattn-jax", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = (limits.max_image_bytes + 2) // 3 * 4 + (1 << 20)  # one base64 image and 1 MiB of the rest
    created = int(time.time())

    def error(status: int, message: str, **kw) -> JSONResponse:
        return JSONResponse(error_body(message, **kw), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health():
        ok = scheduler.accepting
        return JSONResponse({"status": "ok" if ok else "stopping", "pending": scheduler.pending, "max_queue": scheduler.max_queue},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model, "object": "model", "created": created, "owned_by": "flexattn-jax"}]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: HTTPRequest) -> bytes:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body:
            raise ChatError(f"the request body is {int(size):,} bytes, more than the limit of {max_body:,}", status=413)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_body:
                raise ChatError(f"the request body is more than the limit of {max_body:,} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def wait(fut: asyncio.Future, request: HTTPRequest, job: Job):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout
        while True:
            done, _ = await asyncio.wait({fut}, timeout=min(0.5, max(0.0, deadline - loop.time())))
            if done:
                return fut.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise _Gone
            if loop.time() >= deadline:
                job.cancelled = True
                raise TimeoutError

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        t0 = time.perf_counter()
        response = await _answer(request)
        metrics.requests.labels(code=str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.request_latency.observe(time.perf_counter() - t0)
        return response

    def failure(result: Answer | BaseException) -> JSONResponse | None:
        """The error response of a request that got no answer (None: it did)."""
        if isinstance(result, BaseException):
            return error(500, f"the batch of this request failed: {type(result).__name__}: {result}", type="server_error")
        if result.error is not None:
            return error(400, result.error, param="messages", code="invalid_input")
        return None

    def completed(result: Answer, chat: ChatRequest):
        c = completion_of(result, chat, scheduler.tokenizer, scheduler.cfg)
        metrics.prompt_tokens.inc(c.prompt_tokens)
        metrics.completion_tokens.inc(c.completion_tokens)
        return c

    async def _answer(request: HTTPRequest):
        try:
            chat = parse_chat(await read_body(request), limits)
        except ChatError as e:
            return JSONResponse(e.body(), status_code=e.status)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        first = loop.create_future()

        def put(event: tuple[str, Any]) -> None:
            def push() -> None:
                events.put_nowait(event)
                if not first.done():
                    first.set_result(None)

            with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped, nobody waits
                loop.call_soon_threadsafe(push)

        job = Job(chat, lambda result: put(("done", result)), on_text=(lambda text: put(("text", text))) if chat.stream else None)
        if not scheduler.submit(job):
            stopping = not scheduler.accepting
            resp = error(503, "the server is stopping" if stopping else
                         f"the server is busy: {scheduler.pending} requests pending (--max-queue {scheduler.max_queue}); retry later",
                         type="server_error", code="server_stopping" if stopping else "queue_full")
            resp.headers["Retry-After"] = str(scheduler.retry_after())
            return resp
        try:
            await wait(first, request, job)
        except TimeoutError:
            return error(504, f"no answer within --request-timeout {request_timeout:g} s", type="timeout_error", code="timeout")
        except _Gone:
            return Response(status_code=499)
        kind, result = events.get_nowait()
        if kind == "done" and (resp := failure(result)) is not None:
            return resp
        if not chat.stream:
            return JSONResponse(completion_body(completed(result, chat), limits.model))
        return StreamingResponse(_stream(chat, job, events, kind, result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _stream(chat: ChatRequest, job: Job, events: asyncio.Queue, kind: str, value: Any):
        """Server-sent events: the role and first text right away, each text as the engine decodes it, then the rest of the
        final answer (cut at max_tokens and stop), the finish reason and, with include_usage, the usage."""
        writer = StreamWriter(limits.model)
        sse = lambda chunk: f"data: {json.dumps(chunk)}\n\n"  # noqa: E731
        sent = ""
        try:
            yield sse(writer.role())
            while kind == "text":
                text = value
                while kind == "text" and not events.empty():  # what arrived meanwhile goes out as one chunk
                    kind, value = events.get_nowait()
                    text += value if kind == "text" else ""
                if text:
                    sent += text
                    yield sse(writer.text(text))
                if kind == "text":
                    kind, value = await events.get()
            if isinstance(value, BaseException) or value.error is not None:  # failed after the first token: the status is sent
                yield sse(error_body(value.error if isinstance(value, Answer) else f"{type(value).__name__}: {value}",
                                     type="server_error"))
            else:
                c = completed(value, chat)
                if c.text.startswith(sent) and len(c.text) > len(sent):
                    yield sse(writer.text(c.text[len(sent):]))
                yield sse(writer.finish(c))
                if chat.include_usage:
                    yield sse(writer.usage(c))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client left mid-stream: its slot is freed at the next step (no-op once answered)

    return app


# ---- the command ------------------------------------------------------------------------------------------


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server; SIGTERM / SIGINT drain (no new connections, requests in flight answered) and ``run``
        returns, so the process exits with status 0 instead of re-raising the signal as uvicorn does."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                log.info("%s: no new connections; answering the requests in flight", signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    return Server


def main(argv: list[str] | None = None) -> int:
    from flexattn_jax.app.generate_cli import check_context, inference_config
    from flexattn_jax.app.inference import load_for_inference
    from flexattn_jax.checkpoint import read_config
    from flexattn_jax.tokenizer import check_tokenizer_vocab, load_tokenizer

    args = serve_parser().parse_args(argv)
    _log_to_stderr()
    sock = None
    try:  # every check that can fail runs before the parameters are restored
        options = check_serve_args(args)
        cfg = inference_config(args, read_config(args.checkpoint), options)
        check_context(cfg, options.max_new_tokens)
        tokenizer = load_tokenizer(args.checkpoint)
        check_tokenizer_vocab(tokenizer, cfg.text.vocab_size)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from e
        rows = args.slots if args.scheduler == "slots" else options.batch_size
        params, cfg, mesh = load_for_inference(args.checkpoint, args.dtype, args.mesh, rows, args.quantize)
        cfg = inference_config(args, cfg, options)
    except (ValueError, OSError) as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flexattn_jax.app.compile_cache import setup_compile_cache

    setup_compile_cache(args.compile_cache, disabled=args.no_compile_cache)
    model = args.model_name or Path(args.checkpoint).resolve().name
    image_root = None if args.image_root is None else Path(args.image_root).resolve()
    if args.scheduler == "slots":
        scheduler = Engine(params, cfg, tokenizer, mesh=mesh, slots=args.slots, prefill_batch=args.prefill_batch, max_queue=args.max_queue,
                           max_new_tokens=options.max_new_tokens, hr_strategy=options.hr_strategy, buckets=options.buckets,
                           workers=options.workers,
                           image_cache_bytes=int(args.image_cache_mb * 2**20), decode_steps=args.decode_steps)
        metrics = Metrics(options.batch_size, lambda: scheduler.pending, scheduler)
        scheduler.observe = metrics.observe
        shape = (f"{args.slots} slots of {scheduler.max_len} tokens ({scheduler.slot_bytes / 2**20:.1f} MiB each), "
                 f"prefill batch {scheduler.prefill_batch}, {args.decode_steps} tokens per step call, image cache "
                 f"{args.image_cache_mb:g} MiB")
    else:
        scheduler = Scheduler(params, cfg, tokenizer, options, mesh=mesh, batch_window_s=args.batch_window_ms / 1000,
                              max_queue=args.max_queue)
        metrics = Metrics(options.batch_size, lambda: scheduler.pending)
        scheduler.on_batch = lambda info: (log_batch(info), metrics.batch(info))
        shape = f"max batch {options.batch_size}, window {args.batch_window_ms:g} ms"
    if args.warmup:
        t0 = time.perf_counter()
        try:
            n = scheduler.warmup()
        except KeyboardInterrupt:
            sock.close()
            print("\ninterrupted during the warm-up", file=sys.stderr)
            return 130
        log.info("warm-up: %d buckets ready in %.1f s", n, time.perf_counter() - t0)
    scheduler.start()
    limits = Limits(model=model, max_new_tokens=options.max_new_tokens, image_root=image_root, max_image_bytes=args.max_image_bytes)
    app = make_app(scheduler, limits, metrics, request_timeout=args.request_timeout)
    if args.ui:
        from flexattn_jax.app.web import UI_PATH, mount_ui

        app = mount_ui(app, scheduler, limits, options)

    import uvicorn

    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=args.request_timeout + 5,
                            lifespan="on" if args.ui else "off")  # the page's queue starts in the app's lifespan
    server = _server_class()(config)
    host, port = sock.getsockname()[:2]
    print(f"serving {model!r} on http://{host}:{port}/v1 ({shape}, queue {args.max_queue}, buckets {scheduler.buckets})",
          file=sys.stderr, flush=True)
    if args.ui:
        print(f"the page for people: http://{host}:{port}{UI_PATH}/", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close(timeout=args.request_timeout)
        sock.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
