"""From image files and questions to answers: a streaming pipeline with bounded host memory.

:func:`stream_answers` reads the requests lazily, preprocesses them (image decode, pad to square,
resize, tokenize) in a bounded thread pool ahead of the device, groups them into length buckets
within a bounded window, runs one jitted :func:`~flexattn_jax.generate.generate` per batch (the
next batch is dispatched before the previous one's tokens are read back, so host and device work
overlap) and yields each answer as its batch finishes. Host memory depends on ``window`` and
``batch_size``, not on the number of requests. :func:`answer` is the list-returning wrapper.

Per-item failures (a missing or corrupt image, an empty or too long prompt, more than one
``<image>`` placeholder, an unreadable input line) are reported for that item; the other items are
still answered. With a mesh, the parameters are sharded by the project's rules table
(:mod:`flexattn_jax.sharding`: heads, MLP and vocabulary over ``tensor``, the embedding over
``fsdp``) and each batch is split over the mesh's ``data`` (and, where it divides, ``fsdp``) axis;
the tokens are the same as on one device.
"""

from __future__ import annotations

import heapq
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from flexattn_jax.app.compile_cache import traces_in_this_thread
from flexattn_jax.config import ModelConfig
from flexattn_jax.generate import GenerateOutput, generate
from flexattn_jax.logs import progress as progress_bar
from flexattn_jax.preprocess import (
    BUCKETS,
    IMAGE_PLACEHOLDER,
    PreprocessError,
    bucket_length,
    format_prompt,
    image_normalization,
    load_image,
    longest_prompt,
    pad_batch,
    preprocess_image,
    text_problem,
    tokenize_with_image,
)
from flexattn_jax.selection import margin_patches
from flexattn_jax.sharding import batch_sharding, param_shardings, target_mesh


@dataclass
class Request:
    """One question about one image (a path, an encoded image in memory as ``bytes``, or a PIL image).

    ``formatted``: ``prompt`` is the full text to tokenize (conversation template applied, exactly
    one ``<image>`` tag placed by the caller) instead of a question to wrap with
    :func:`~flexattn_jax.preprocess.format_prompt`. ``error``: the request could not be read (e.g. a
    bad JSONL line); it is answered with this error and never preprocessed.
    """

    image: str | Path | bytes | Image.Image | None
    prompt: str | None
    formatted: bool = False
    error: str | None = None


@dataclass
class Answer:
    text: str | None
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    hr_masks: np.ndarray | None = None  # (L, M) the prefill's per-layer selected HR tokens
    image_attention: np.ndarray | None = None  # (L, G) the last prompt token's map over the LR image
    prompt_tokens: int | None = None  # the prompt's length in tokens, image tokens included
    # with stream_answers(step_maps=True), per generated token i (predicted by the prefill for i = 0, by decode step i - 1
    # after): (N, L, M) the selected HR tokens and (N, L, G) the map over the LR image, cut to the answer's tokens
    token_hr_masks: np.ndarray | None = None
    token_image_attention: np.ndarray | None = None


@dataclass
class Prepared:
    ids: np.ndarray
    pixels: np.ndarray
    ori_size: tuple[int, int]


def request_image(req: Request) -> Image.Image:
    """The request's image as RGB (a path or bytes are loaded with :func:`flexattn_jax.preprocess.load_image`)."""
    return req.image if isinstance(req.image, Image.Image) else load_image(req.image)


def prepare(req: Request, cfg: ModelConfig, tokenizer, max_context: int) -> Prepared:
    """Load, pad-to-square, resize and normalise the image; format and tokenize the prompt."""
    if req.error is not None:
        raise PreprocessError(req.error)
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise PreprocessError(f"empty prompt (got {req.prompt!r})")
    if (bad := text_problem(req.prompt)) is not None:
        raise PreprocessError(f"the prompt is {bad}")
    n_tags = req.prompt.count(IMAGE_PLACEHOLDER)
    if n_tags > 1 or (req.formatted and n_tags != 1):
        raise PreprocessError(f"the prompt has {n_tags} {IMAGE_PLACEHOLDER} tags; one image per prompt is supported"
                              + (" (a formatted prompt places exactly one)" if req.formatted else ""))
    if req.image is None:
        raise PreprocessError("no image given")
    pixels, ori = preprocess_image(request_image(req), cfg.image_size, *image_normalization(cfg.vision))
    text = req.prompt if req.formatted else format_prompt(req.prompt.replace(IMAGE_PLACEHOLDER, "").strip(), has_image=True)
    ids = tokenize_with_image(text, tokenizer, cfg.image_token_id, cfg.num_image_tokens, num_images=1)
    if len(ids) > max_context:
        raise PreprocessError(f"prompt is {len(ids)} tokens with the image; the context allows {max_context}")
    return Prepared(ids, pixels.astype(jnp.dtype(cfg.dtype)), ori)


def item_error(e: BaseException) -> str:
    """One item's error message: the message of an input error, else the exception's type and message.

    Any exception while preparing one item (a tokenizer's ``TypeError`` on odd text included) is that
    item's error; its neighbours are still answered.
    """
    return str(e) if isinstance(e, PreprocessError | ValueError | OSError) else f"{type(e).__name__}: {e}"


def check_batch_size(mesh: Mesh | None, batch_size: int) -> None:
    """Raise ValueError unless ``batch_size`` is positive and a multiple of the mesh's ``data`` axis."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    data = 1 if mesh is None else mesh.shape["data"]
    if batch_size % data:
        raise ValueError(
            f"batch_size={batch_size} is not a multiple of the mesh's data axis ({data}); "
            f"use a batch size divisible by {data}, e.g. {data * max(1, batch_size // data)}"
        )


def _placer(mesh: Mesh | None, batch_size: int):
    """``jnp.asarray``, or with a mesh a ``device_put`` splitting the batch axis over it."""
    check_batch_size(mesh, batch_size)
    if mesh is None:
        return jnp.asarray
    return lambda a: jax.device_put(a, batch_sharding(mesh, a.shape))




def answer_text(tokenizer, cfg: ModelConfig, tokens: Sequence[int]) -> str:
    """The text of generated ``tokens``: EOS and special tokens dropped, whitespace stripped."""
    return tokenizer.decode([t for t in tokens if t != cfg.eos_token_id], skip_special_tokens=True).strip()


def default_window(batch_size: int) -> int:
    """Items preprocessed ahead of the device and held for length bucketing: ``max(4 * batch_size, 32)``."""
    return max(4 * batch_size, 32)


class _Batch:
    """A dispatched batch: its items, the (not yet read back) output, when it was dispatched (``t0``: after the call
    returned, ``t_start``: before it, compile included), its padded length."""

    def __init__(self, items: list[tuple[int, Prepared]], out: GenerateOutput, t0: float, compiled: bool, t_start: float, length: int):
        self.items, self.out, self.t0, self.compiled = items, out, t0, compiled
        self.t_start, self.length = t_start, length


class _Stats:
    """Counters of one run; ``compile_s`` is the time spent in calls that compiled (or loaded a cached executable)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.items = self.skipped = self.answered = self.failed = self.tokens = 0
        self.batches = self.compiles = self.decode_steps = 0
        self.compile_s = 0.0
        self.first_answer_s: float | None = None
        self.latencies: list[float] = []  # per steady-state batch: dispatch -> tokens on the host

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        steady = max(elapsed - self.compile_s, 1e-9)
        lat = self.latencies
        return dict(
            items=self.items, skipped=self.skipped, answered=self.answered, failed=self.failed, tokens=self.tokens,
            seconds=elapsed, tokens_per_s=self.tokens / max(elapsed, 1e-9), batches=self.batches, compiles=self.compiles,
            compile_s=self.compile_s, steady_s=steady, steady_items_per_s=(self.answered + self.failed) / steady,
            steady_tokens_per_s=self.tokens / steady, decode_steps=self.decode_steps,
            first_answer_s=self.first_answer_s,
            batch_latency_p50_s=statistics.median(lat) if lat else None, batch_latency_max_s=max(lat) if lat else None,
        )


def stream_answers(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    requests: Iterable[Request],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    hr_strategy: str = "project",
    buckets: Sequence[int] = BUCKETS,
    mesh: Mesh | None = None,
    progress: bool = True,
    workers: int = 4,
    window: int | None = None,
    stats: dict[str, Any] | None = None,
    skip: Callable[[int, Request], bool] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    step_maps: bool = False,
) -> Iterator[tuple[int, Answer]]:
    """Yield ``(input index, Answer)`` as batches finish; host memory bounded by ``window``, not by ``len(requests)``.

    ``requests`` is consumed lazily. At most ``window`` items (default :func:`default_window`) are
    being preprocessed (``workers`` threads) or waiting for a batch. Items are collected in input
    order and grouped by length bucket: a bucket that reaches ``batch_size`` runs; when the window is
    full the bucket of the oldest waiting item runs (padded to ``batch_size``), so every item is
    answered within about ``window`` items of its arrival and the batches depend only on the input
    (not on thread timing). A failed item is yielded at once with its ``error``. ``skip(i, request)``
    True leaves an item out (not preprocessed, not yielded: ``--resume``). ``stats`` (a dict) receives
    counts and timings, also when the consumer stops early: compile time apart from the steady state
    (``steady_items_per_s``, ``steady_tokens_per_s``), batch latency (dispatch to tokens on the host:
    a batch's tokens arrive together), ``first_answer_s``. ``on_batch`` is called as each batch's tokens
    reach the host with ``size`` (items), ``batch_size``, ``bucket`` (padded prompt length), ``compiled``,
    ``seconds`` (dispatch to tokens, compile included) and ``steps`` (decode steps). Closing the generator cancels the pending
    preprocessing. ``mesh`` makes the batches data parallel; ``batch_size`` must then be a multiple
    of its ``data`` axis. ``stop()`` True (polled between batches and while waiting for input, e.g. a
    Ctrl-C flag set by :class:`~flexattn_jax.interrupt.StopRequests`) dispatches no further batch: the batches
    in flight are finished and yielded, then the generator returns. ``step_maps`` also returns every generated token's maps
    (``Answer.token_hr_masks`` / ``token_image_attention``: the selection changes per token); it runs all
    ``max_new_tokens`` steps (no early stop).
    """
    put = _placer(mesh, batch_size)
    window = default_window(batch_size) if window is None else window
    if window < batch_size:
        raise ValueError(f"window={window} must be at least batch_size={batch_size}")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if mesh is not None:
        params = jax.device_put(params, param_shardings(params, mesh))
    max_context = longest_prompt(cfg.text.max_position_embeddings, max_new_tokens, buckets)
    st = _Stats()
    total = len(requests) if isinstance(requests, Sized) else None
    bar = progress_bar(total=total, desc="answering", unit="item", disable=not progress)
    reader = _Reader(requests, batch_size)
    inflight: deque[tuple[int, Future]] = deque()  # submitted to the pool, in input order
    waiting: dict[int, list[tuple[int, Prepared]]] = {}  # bucket -> prepared items, in input order
    n_waiting = 0
    exhausted = False
    rng = jax.random.key(seed)
    stopping = stop if stop is not None else (lambda: False)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexattn-prepare")

    def fill(block: bool = False) -> None:
        """Submit items from the reader until the window is full; ``block``: wait for at least one (or the end)."""
        nonlocal exhausted
        while not exhausted and len(inflight) + n_waiting < window:
            try:
                got = reader.get(block, stopping)
            except queue.Empty:
                return
            block = False
            if got is _END:
                exhausted = True
                return
            if isinstance(got, _Failure):
                raise got.error
            i, req = got
            st.items += 1
            if skip is not None and skip(i, req):
                st.skipped += 1
                bar.update(1)
                continue
            inflight.append((i, executor.submit(prepare, req, cfg, tokenizer, max_context)))

    def take(bucket: int) -> list[tuple[int, Prepared]]:
        nonlocal n_waiting
        items, waiting[bucket] = waiting[bucket][:batch_size], waiting[bucket][batch_size:]
        if not waiting[bucket]:
            del waiting[bucket]
        n_waiting -= len(items)
        return items

    def oldest_bucket() -> int:
        return min(waiting, key=lambda b: waiting[b][0][0])

    def dispatch(items: list[tuple[int, Prepared]]) -> _Batch:
        nonlocal rng
        length = bucket_length(max(len(p.ids) for _, p in items), buckets)
        ids, mask = pad_batch([p.ids for _, p in items], length, pad_id=cfg.pad_token_id, side="left")
        pixels = np.stack([p.pixels for _, p in items])
        margin = margin_patches(np.array([p.ori_size for _, p in items]), cfg.lr_grid)
        pad = batch_size - len(items)  # fixed batch shape: pad with copies of the first row (they stop with it)
        if pad:
            ids, mask, pixels, margin = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (ids, mask, pixels, margin))
        rng, key = jax.random.split(rng)
        before, t0 = traces_in_this_thread(), time.perf_counter()
        with target_mesh(mesh):  # kernels follow the mesh's devices (Mosaic kernels under shard_map)
            out = generate(
                params, cfg, put(ids), put(pixels), put(mask), put(margin),
                key if temperature > 0 else None, max_new_tokens=max_new_tokens, max_len=length + max_new_tokens,
                temperature=temperature, top_p=top_p, hr_strategy=hr_strategy, return_step_maps=step_maps,
            )
        compiled = traces_in_this_thread() > before
        if compiled:
            st.compiles += 1
            st.compile_s += time.perf_counter() - t0
        st.batches += 1
        return _Batch(items, out, time.perf_counter(), compiled, t0, length)

    def finish(batch: _Batch) -> Iterator[tuple[int, Answer]]:
        tokens, lengths = np.asarray(batch.out.tokens), np.asarray(batch.out.lengths)
        if not batch.compiled:
            st.latencies.append(time.perf_counter() - batch.t0)
        st.decode_steps += int(batch.out.steps)
        if on_batch is not None:
            on_batch(dict(size=len(batch.items), batch_size=batch_size, bucket=batch.length, compiled=batch.compiled,
                          seconds=time.perf_counter() - batch.t_start, steps=int(batch.out.steps)))
        maps = batch.out.prefill_maps
        hr_masks = None if maps is None else np.asarray(maps.hr_masks)
        image_attention = None if maps is None else np.asarray(maps.image_attention)
        steps = batch.out.step_maps
        if maps is not None and steps is not None:  # token 0's maps are the prefill's, token i's decode step i - 1's
            token_masks = np.concatenate([hr_masks[None], np.asarray(steps.hr_masks)[:-1]])
            token_att = np.concatenate([image_attention[None], np.asarray(steps.image_attention)[:-1]])
        for row, (i, prep) in enumerate(batch.items):
            toks = tokens[row, : lengths[row]].tolist()
            st.tokens += len(toks)
            ans = Answer(
                answer_text(tokenizer, cfg, toks), toks, None,
                None if hr_masks is None else hr_masks[:, row].copy(),
                None if image_attention is None else image_attention[:, row].copy(),
                prompt_tokens=len(prep.ids),
            )
            if maps is not None and steps is not None:
                ans.token_hr_masks = token_masks[: len(toks), :, row].copy()
                ans.token_image_attention = token_att[: len(toks), :, row].copy()
            yield from emit(i, ans)

    def emit(i: int, ans: Answer) -> Iterator[tuple[int, Answer]]:
        if ans.error is None:
            st.answered += 1
        else:
            st.failed += 1
        if st.first_answer_s is None:
            st.first_answer_s = time.perf_counter() - st.t0
        bar.update(1)
        yield i, ans

    pending: _Batch | None = None
    try:
        while True:
            items = None
            while items is None and not stopping():
                fill()
                if inflight:
                    i, fut = inflight.popleft()
                    try:
                        prep = fut.result()
                    except Exception as e:  # noqa: BLE001 - one bad item never sinks the others
                        yield from emit(i, Answer(None, error=item_error(e)))
                        continue
                    bucket = bucket_length(len(prep.ids), buckets)
                    waiting.setdefault(bucket, []).append((i, prep))
                    n_waiting += 1
                    if len(waiting[bucket]) == batch_size:
                        items = take(bucket)
                    elif n_waiting >= window:
                        items = take(oldest_bucket())
                elif not exhausted:  # the input is slow (a pipe): hand out what is done, then wait for it
                    if pending is not None:
                        yield from finish(pending)
                        pending = None
                    fill(block=True)
                elif n_waiting:  # the input is exhausted: run what waits, oldest first
                    items = take(oldest_bucket())
                else:
                    break
            if items is None or stopping():  # a stop abandons the batch not yet dispatched
                break
            batch = dispatch(items)  # runs on the device while the previous batch is read back and the pool works
            if pending is not None:
                yield from finish(pending)
            pending = batch
        if pending is not None:
            yield from finish(pending)
    finally:
        reader.stop()
        executor.shutdown(wait=True, cancel_futures=True)  # no thread left decoding images while the process exits
        bar.close()
        if stats is not None:
            stats.update(st.as_dict())


_END = object()


class _Failure:
    """An exception raised while iterating the requests, handed to the consuming thread."""

    def __init__(self, error: BaseException):
        self.error = error


class _Reader:
    """Iterates the requests on a daemon thread into a small bounded queue, so a slow source (a pipe)
    never keeps finished answers from being handed out."""

    def __init__(self, requests: Iterable[Request], ahead: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(requests,), name="flexattn-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, requests: Iterable[Request]) -> None:
        try:
            for item in enumerate(requests):
                if not self._put(item):
                    return
        except Exception as e:  # noqa: BLE001 - re-raised in the consuming thread
            self._put(_Failure(e))
            return
        self._put(_END)

    def get(self, block: bool, stop: Callable[[], bool] = lambda: False):
        """The next item; ``block``: wait for it, polling ``stop`` (True: raise queue.Empty), so a signal is seen."""
        if not block:
            return self._queue.get(False)
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if stop():
                    raise

    def stop(self) -> None:
        self._stop.set()


class InputOrder:
    """Answers back in input order with bounded memory: ``push`` each ``(index, answer)`` as it comes.

    ``skip(i)`` marks an index that will never come (``--resume``); ``push`` returns the answers now
    in order; ``drain`` returns the rest, sorted (an interrupted run). With :func:`stream_answers`
    at most about ``window + 2 * batch_size`` answers wait here.
    """

    def __init__(self, start: int = 0):
        self.next = start
        self._heap: list[tuple[int, Answer]] = []
        self._skipped: set[int] = set()

    def skip(self, i: int) -> None:
        self._skipped.add(i)
        self._release_into([])

    def push(self, i: int, ans: Answer) -> list[tuple[int, Answer]]:
        heapq.heappush(self._heap, (i, ans))
        out: list[tuple[int, Answer]] = []
        self._release_into(out)
        return out

    def _release_into(self, out: list) -> None:
        while True:
            if self.next in self._skipped:
                self._skipped.discard(self.next)
            elif self._heap and self._heap[0][0] == self.next:
                out.append(heapq.heappop(self._heap))
            else:
                return
            self.next += 1

    def drain(self) -> list[tuple[int, Answer]]:
        out = [heapq.heappop(self._heap) for _ in range(len(self._heap))]
        self._skipped.clear()
        return out

    def __len__(self) -> int:
        return len(self._heap)


def answer(
    params: dict,
    cfg: ModelConfig,
    tokenizer,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    hr_strategy: str = "project",
    buckets: Sequence[int] = BUCKETS,
    progress: bool = True,
    stats: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    workers: int = 4,
    window: int | None = None,
) -> list[Answer]:
    """Every request's answer, in order: :func:`stream_answers` collected into a list.

    The window defaults to all the requests (they are in memory already), so batches group the
    whole list by length bucket.
    """
    out: list[Answer | None] = [None] * len(requests)
    for i, a in stream_answers(
        params, cfg, tokenizer, requests, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, hr_strategy=hr_strategy, buckets=buckets, mesh=mesh, progress=progress, workers=workers,
        window=max(len(requests), batch_size) if window is None else window, stats=stats,
    ):
        out[i] = a
    return [a for a in out if a is not None]


def load_for_inference(checkpoint: str, dtype: str | None, mesh_spec: str | None, batch_size: int, quantize: str | None = None):
    """``(params, cfg, mesh)`` of a converted checkpoint for ``generate`` / ``eval``: the ``--mesh`` (errors name the
    flag), the batch size checked against its data axis, the parameters sharded over it by the rules table; ``--quantize``
    int8 / int4 quantises the decoder linears as they load (:mod:`flexattn_jax.quant`; a quantised model directory loads as
    is)."""
    from flexattn_jax.checkpoint import load_converted
    from flexattn_jax.sharding import make_mesh

    try:
        mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    except ValueError as e:
        raise ValueError(f"--mesh {mesh_spec!r}: {e}") from e
    check_batch_size(mesh, batch_size)
    params, cfg = load_converted(checkpoint, dtype=dtype, sharding=mesh)
    if quantize:
        from flexattn_jax.quant import check_mode, quant_mode, quantize_params

        have = quant_mode(params)
        if have is None:
            params = jax.jit(quantize_params, static_argnums=1)(params, check_mode(quantize))
        elif have != quantize:
            raise ValueError(f"--quantize {quantize}: {checkpoint} is stored quantised as {have}")
    return params, cfg, mesh
