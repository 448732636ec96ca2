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
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from flexattn_jax.app.compile_cache import traces_in_this_thread
from flexattn_jax.config import ModelConfig
from flexattn_jax.generate import GenerateOutput, HRStrategy, generate
from flexattn_jax.logs import progress as progress_bar
from flexattn_jax.overrides import apply_overrides, parse_hr_budget
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
from flexattn_jax.settings import SettingError, SettingsArgs
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


@dataclass(frozen=True)
class GenerationOptions:
    """How requests are answered: the generation and batching settings of :func:`stream_answers` / :func:`answer`,
    declared once; ``generate``, ``serve`` and ``eval`` derive their flags from these fields (:func:`generation_args`).

    Each field is checked when the options are made: a bad value raises a :class:`~flexattn_jax.settings.SettingError`
    naming the field (on the command line, its flag).
    """

    max_new_tokens: int = 64
    """Tokens generated per item, EOS included; one compile per length bucket and value."""
    batch_size: int = 8
    """Items per jitted batch (a shorter batch is padded); a multiple of the mesh's data axis with --mesh."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass with temperature > 0."""
    seed: int = 0
    """Sampling seed (the random keys follow the batches)."""
    hr_strategy: HRStrategy = "project"
    """Where HR keys/values are projected (all give the same tokens): 'project' the K selected tokens at every step (the
    release; cheapest prefill), 'cache' all M once at prefill (fewer FLOPs once the answer is longer than about M/K - 1
    tokens; Lh x M x Hkv x d x 2 values per sample), 'incremental' each token once, when first selected
    (flexattn_jax.generate)."""
    hr_budget: str | None = None
    """HR tokens per select row: 'all' (K = M, the release), 'adaptive' (exact as 'all', at the cost of the smallest rung
    of flex.hr_ladder holding the selection, chosen per layer at run time), or a fixed count or fraction of M (truncates
    larger selections); none keeps the checkpoint's."""
    workers: int = 4
    """Threads decoding and resizing images ahead of the device."""
    window: int | None = None
    """Items read ahead and grouped into length buckets; bounds host memory (none: max(4 x batch size, 32))."""
    buckets: tuple[int, ...] = BUCKETS
    """The prompt lengths a batch is padded to (one compile each)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "buckets", tuple(self.buckets))
        for name in ("max_new_tokens", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise SettingError(f"{{{name}}} {getattr(self, name)} must be at least 1")
        if not -(2**63) <= self.seed < 2**63:
            raise SettingError(f"{{seed}} {self.seed} must be a 64-bit integer (from -2**63 to 2**63 - 1)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingError(f"{{temperature}} {self.temperature}: use a finite value >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise SettingError(f"{{top_p}} {self.top_p}: use a nucleus mass in (0, 1]")
        if self.hr_strategy not in get_args(HRStrategy):
            raise SettingError(f"{{hr_strategy}} {self.hr_strategy!r}: use one of {', '.join(map(repr, get_args(HRStrategy)))}")
        if self.hr_budget is not None:
            try:
                parse_hr_budget(self.hr_budget, name="{hr_budget}")
            except ValueError as e:
                raise SettingError(str(e)) from None
        if self.window is not None and self.window < self.batch_size:
            raise SettingError(f"{{window}} {self.window} must be at least {{batch_size}} ({self.batch_size})")
        if not self.buckets or any(not isinstance(b, int) or b < 1 for b in self.buckets):
            raise SettingError(f"{{buckets}} {self.buckets}: use one or more positive prompt lengths")

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **changes: Any) -> GenerationOptions:
        """``options`` (default: the defaults) with some fields given by keyword (``max_new_tokens=8``)."""
        unknown = sorted(set(changes) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option {unknown[0]!r}; the options are the fields of GenerationOptions")
        return replace(options or cls(), **changes)

    def model_config(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with ``hr_budget`` applied (as it is when None)."""
        if self.hr_budget is None:
            return cfg
        return apply_overrides(cfg, {"flex.hr_budget": parse_hr_budget(self.hr_budget, name="hr_budget")})

    def max_context(self, cfg: ModelConfig) -> int:
        """The longest prompt, in tokens, these options leave room for in ``cfg``'s context."""
        return longest_prompt(cfg.text.max_position_embeddings, self.max_new_tokens, self.buckets)

    def answer_settings(self) -> dict[str, Any]:
        """The options that change an answer (an answers file's header): with sampling also the seed and the batching."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                               "hr_budget": self.hr_budget, "hr_strategy": self.hr_strategy}
        if self.temperature > 0:  # the random keys follow the batches
            out.update(top_p=self.top_p, seed=self.seed, batch_size=self.batch_size, window=self.window)
        return out


def generation_args(only: Sequence[str], flags: dict[str, str] | None = None,
                    defaults: dict[str, tuple[Any, str]] | None = None) -> SettingsArgs:
    """The command-line flags of the :class:`GenerationOptions` fields ``only`` (``--max-new-tokens``, ...; help: the
    fields' docstrings), ``flags`` renaming some (serve's ``{"batch_size": "--max-batch"}``)."""
    shown = {"hr_budget": (None, "the checkpoint's, 'all'"), "window": (None, "max(4 x batch size, 32)")}
    return SettingsArgs(GenerationOptions, flags=flags or {}, defaults={**shown, **(defaults or {})}, only=tuple(only))


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
    options: GenerationOptions | None = None,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
    stats: dict[str, Any] | None = None,
    skip: Callable[[int, Request], bool] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    step_maps: bool = False,
    **changes: Any,
) -> Iterator[tuple[int, Answer]]:
    """Yield ``(input index, Answer)`` as batches finish; host memory bounded by ``window``, not by ``len(requests)``.

    ``options`` (:class:`GenerationOptions`, its fields also given one by one as keywords: ``max_new_tokens=8``) says
    how to generate and batch. ``requests`` is consumed lazily. At most ``window`` items (default
    :func:`default_window`) are being preprocessed (``workers`` threads) or waiting for a batch. Items are collected
    in input order and grouped by length bucket: a bucket that reaches ``batch_size`` runs; when the window is
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
    opts = GenerationOptions.of(options, **changes)
    run = _Pipeline(params, opts.model_config(cfg), tokenizer, opts, mesh=mesh, progress=progress, skip=skip,
                    on_batch=on_batch, stop=stop, step_maps=step_maps)
    try:
        yield from run.answers(requests)
    finally:
        run.close()
        if stats is not None:
            stats.update(run.st.as_dict())


class _Pipeline:
    """One :func:`stream_answers` run, in named steps: reading items into the preparing pool (:meth:`_fill`),
    grouping the prepared ones into batches (:meth:`_next_batch`), running a batch (:meth:`_dispatch`), reading its
    tokens back (:meth:`_finish`) and handing each answer out (:meth:`_emit`)."""

    def __init__(self, params: dict, cfg: ModelConfig, tokenizer, opts: GenerationOptions, *, mesh: Mesh | None, progress: bool,
                 skip: Callable[[int, Request], bool] | None, on_batch: Callable[[dict[str, Any]], None] | None,
                 stop: Callable[[], bool] | None, step_maps: bool = False):
        self.put = _placer(mesh, opts.batch_size)
        self.step_maps = step_maps
        self.window = default_window(opts.batch_size) if opts.window is None else opts.window
        self.params = params if mesh is None else jax.device_put(params, param_shardings(params, mesh))
        self.cfg, self.tokenizer, self.opts, self.mesh = cfg, tokenizer, opts, mesh
        self.skip, self.on_batch = skip, on_batch
        self.stopping = stop if stop is not None else (lambda: False)
        self.progress = progress
        self.max_context = opts.max_context(cfg)
        self.st = _Stats()
        self.rng = jax.random.key(opts.seed)
        self.inflight: deque[tuple[int, Future]] = deque()  # submitted to the pool, in input order
        self.waiting: dict[int, list[tuple[int, Prepared]]] = {}  # bucket -> prepared items, in input order
        self.n_waiting = 0
        self.exhausted = False
        self.reader: _Reader | None = None
        self.bar = None
        self.executor: ThreadPoolExecutor | None = None

    def answers(self, requests: Iterable[Request]) -> Iterator[tuple[int, Answer]]:
        """The run: each batch is dispatched before the previous one is read back, so host and device work overlap."""
        total = len(requests) if isinstance(requests, Sized) else None
        self.bar = progress_bar(total=total, desc="answering", unit="item", disable=not self.progress)
        self.reader = _Reader(requests, self.opts.batch_size)
        self.executor = ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="flexattn-prepare")
        pending: _Batch | None = None
        while True:
            items: list[tuple[int, Prepared]] | None = None
            while items is None and not self.stopping():
                step = self._next_batch()
                if isinstance(step, list):
                    items = step
                elif isinstance(step, tuple):  # a failed item, handed out at once
                    yield from self._emit(*step)
                elif step is _IDLE:  # the input is slow (a pipe): hand out what is done, then wait for it
                    if pending is not None:
                        yield from self._finish(pending)
                        pending = None
                    self._fill(block=True)
                elif step is _DONE:
                    break
            if items is None or self.stopping():  # a stop abandons the batch not yet dispatched
                break
            batch = self._dispatch(items)  # runs on the device while the previous batch is read back and the pool works
            if pending is not None:
                yield from self._finish(pending)
            pending = batch
        if pending is not None:
            yield from self._finish(pending)

    def close(self) -> None:
        """Stop the reader, cancel the pending preprocessing (no thread left decoding images while the process exits)."""
        if self.reader is not None:
            self.reader.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.bar is not None:
            self.bar.close()

    # ---- reading ----

    def _fill(self, block: bool = False) -> None:
        """Submit items from the reader until the window is full; ``block``: wait for at least one (or the end)."""
        while not self.exhausted and len(self.inflight) + self.n_waiting < self.window:
            try:
                got = self.reader.get(block, self.stopping)
            except queue.Empty:
                return
            block = False
            if got is _END:
                self.exhausted = True
                return
            if isinstance(got, _Failure):
                raise got.error
            i, req = got
            self.st.items += 1
            if self.skip is not None and self.skip(i, req):
                self.st.skipped += 1
                self.bar.update(1)
                continue
            self.inflight.append((i, self.executor.submit(prepare, req, self.cfg, self.tokenizer, self.max_context)))

    # ---- batching ----

    def _next_batch(self) -> list[tuple[int, Prepared]] | tuple[int, Answer] | object:
        """One step of collecting: a batch to run, a failed item's ``(index, Answer)`` to hand out, ``_AGAIN`` (an item
        now waits in its bucket), ``_IDLE`` (nothing prepared yet, the input not at its end) or ``_DONE`` (nothing left)."""
        self._fill()
        if self.inflight:
            i, fut = self.inflight.popleft()
            try:
                prep = fut.result()
            except Exception as e:  # noqa: BLE001 - one bad item never sinks the others
                return i, Answer(None, error=item_error(e))
            bucket = bucket_length(len(prep.ids), self.opts.buckets)
            self.waiting.setdefault(bucket, []).append((i, prep))
            self.n_waiting += 1
            if len(self.waiting[bucket]) == self.opts.batch_size:
                return self._take(bucket)
            if self.n_waiting >= self.window:
                return self._take(self._oldest_bucket())
            return _AGAIN
        if not self.exhausted:
            return _IDLE
        if self.n_waiting:  # the input is exhausted: run what waits, oldest first
            return self._take(self._oldest_bucket())
        return _DONE

    def _take(self, bucket: int) -> list[tuple[int, Prepared]]:
        """Up to ``batch_size`` of the items waiting in ``bucket``, oldest first."""
        waiting = self.waiting
        items, waiting[bucket] = waiting[bucket][: self.opts.batch_size], waiting[bucket][self.opts.batch_size :]
        if not waiting[bucket]:
            del waiting[bucket]
        self.n_waiting -= len(items)
        return items

    def _oldest_bucket(self) -> int:
        return min(self.waiting, key=lambda b: self.waiting[b][0][0])

    # ---- running ----

    def _dispatch(self, items: list[tuple[int, Prepared]]) -> _Batch:
        """Pad the items to the batch's fixed shape and start the jitted generation (not waiting for its tokens)."""
        cfg, opts, put = self.cfg, self.opts, self.put
        length = bucket_length(max(len(p.ids) for _, p in items), opts.buckets)
        ids, mask = pad_batch([p.ids for _, p in items], length, pad_id=cfg.pad_token_id, side="left")
        pixels = np.stack([p.pixels for _, p in items])
        margin = margin_patches(np.array([p.ori_size for _, p in items]), cfg.lr_grid)
        pad = opts.batch_size - len(items)  # fixed batch shape: pad with copies of the first row (they stop with it)
        if pad:
            ids, mask, pixels, margin = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (ids, mask, pixels, margin))
        self.rng, key = jax.random.split(self.rng)
        before, t0 = traces_in_this_thread(), time.perf_counter()
        with target_mesh(self.mesh):  # kernels follow the mesh's devices (Mosaic kernels under shard_map)
            out = generate(
                self.params, cfg, put(ids), put(pixels), put(mask), put(margin),
                key if opts.temperature > 0 else None, max_new_tokens=opts.max_new_tokens, max_len=length + opts.max_new_tokens,
                temperature=opts.temperature, top_p=opts.top_p, hr_strategy=opts.hr_strategy, return_step_maps=self.step_maps,
            )
        compiled = traces_in_this_thread() > before
        if compiled:
            self.st.compiles += 1
            self.st.compile_s += time.perf_counter() - t0
        self.st.batches += 1
        return _Batch(items, out, time.perf_counter(), compiled, t0, length)

    def _finish(self, batch: _Batch) -> Iterator[tuple[int, Answer]]:
        """Read a batch's tokens (and prefill maps) back, report it to ``on_batch``, hand out its answers."""
        st = self.st
        tokens, lengths = np.asarray(batch.out.tokens), np.asarray(batch.out.lengths)
        if not batch.compiled:
            st.latencies.append(time.perf_counter() - batch.t0)
        st.decode_steps += int(batch.out.steps)
        if self.on_batch is not None:
            self.on_batch(dict(size=len(batch.items), batch_size=self.opts.batch_size, bucket=batch.length, compiled=batch.compiled,
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
                answer_text(self.tokenizer, self.cfg, toks), toks, None,
                None if hr_masks is None else hr_masks[:, row].copy(),
                None if image_attention is None else image_attention[:, row].copy(),
                prompt_tokens=len(prep.ids),
            )
            if maps is not None and steps is not None:
                ans.token_hr_masks = token_masks[: len(toks), :, row].copy()
                ans.token_image_attention = token_att[: len(toks), :, row].copy()
            yield from self._emit(i, ans)

    # ---- writing ----

    def _emit(self, i: int, ans: Answer) -> Iterator[tuple[int, Answer]]:
        """Count one answer (or failure), advance the progress bar and yield it."""
        if ans.error is None:
            self.st.answered += 1
        else:
            self.st.failed += 1
        if self.st.first_answer_s is None:
            self.st.first_answer_s = time.perf_counter() - self.st.t0
        self.bar.update(1)
        yield i, ans


_END = object()
_AGAIN, _IDLE, _DONE = object(), object(), object()  # what :meth:`_Pipeline._next_batch` says besides a batch or a failure


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


def answer(params: dict, cfg: ModelConfig, tokenizer, requests: Sequence[Request], options: GenerationOptions | None = None,
           **kw: Any) -> list[Answer]:
    """Every request's answer, in order: :func:`stream_answers` collected into a list.

    ``kw``: :func:`stream_answers`'s keywords (``mesh``, ``progress``, ``stats``, ...) and option fields
    (``max_new_tokens=8``). The window defaults to all the requests (they are in memory already), so batches
    group the whole list by length bucket.
    """
    names = {f.name for f in fields(GenerationOptions)}
    opts = GenerationOptions.of(options, **{k: v for k, v in kw.items() if k in names})
    if opts.window is None:
        opts = replace(opts, window=max(len(requests), opts.batch_size))
    out: list[Answer | None] = [None] * len(requests)
    for i, a in stream_answers(params, cfg, tokenizer, requests, opts, **{k: v for k, v in kw.items() if k not in names}):
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
