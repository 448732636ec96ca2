"""The serving engine: continuous batching over decode slots, token streaming, an image feature cache.

``flexattn-jax serve``'s default scheduler. ``--slots S`` decode rows are compiled once
(:mod:`flexattn_jax.slots`). A thread runs the loop of JetStream's orchestrator:

1. while a slot is free and a request is ready (its image decoded and prompt tokenized in a
   worker pool as soon as it arrived), prefill it: requests of the same length bucket are prefilled
   together (up to ``--prefill-batch``; a lone one alone), from image features taken from the
   cache (keyed by the preprocessed image's hash, bounded in bytes, LRU) or encoded once; their
   states are inserted into free slots and their first tokens streamed;
2. one jitted program advances every slot by ``--decode-steps`` tokens (one host sync per call);
   each active slot's tokens are detokenised (UTF-8 safe, stop sequences held back) and streamed;
3. a slot whose request ends (EOS, a stop sequence, ``max_tokens``, the client gone) is freed and
   the next request takes it at the next step, without waiting for the others.

Each slot's computation is its own (vmapped single-request programs), so a greedy request gets
exactly ``flexattn-jax generate``'s tokens whatever shares the slots with it; temperature, top_p
and seed are per-slot data of the one step program.

With a ``mesh`` the parameters are sharded by the rules table, the slot state by
:func:`~flexattn_jax.slots.slot_specs` (slots over ``data``, K/V heads over ``tensor``) and every
program is traced under :func:`~flexattn_jax.sharding.target_mesh`; the tokens are those of one device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flexattn_jax.app.inference import Answer, Prepared, _placer, answer_text, item_error, prepare
from flexattn_jax.preprocess import BUCKETS, bucket_length, longest_prompt, pad_batch
from flexattn_jax.selection import margin_patches
from flexattn_jax.sharding import param_shardings, target_mesh
from flexattn_jax.slots import decode_slots, empty_slots, encode_images, insert_rows, prefill_rows, slot_bytes

if TYPE_CHECKING:
    from flexattn_jax.app.serve import Job

log = logging.getLogger("flexattn_jax.serve")


class TextStream:
    """Incremental detokenisation of one answer: ``push`` a token, get the text now safe to send.

    The text sent is always a prefix of the final answer (:func:`~flexattn_jax.app.inference.answer_text` of
    all the tokens, cut at the first stop sequence): a trailing U+FFFD (a multi-byte character whose
    bytes have not all arrived), trailing whitespace (stripped from a final answer) and an ending
    that could begin a stop sequence are held back until the next tokens settle them.
    """

    def __init__(self, tokenizer, cfg, stop: list[str]):
        self.tokenizer, self.cfg, self.stop = tokenizer, cfg, stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop sequence appeared: the answer ends here

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        full = answer_text(self.tokenizer, self.cfg, self.tokens)
        cuts = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        text = full[: min(cuts)] if cuts else full
        self.stopped = bool(cuts)
        safe = text if self.stopped else text.rstrip("\ufffd")
        if not self.stopped:
            hold = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
            safe = safe[: len(safe) - hold]
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta


class FeatureCache:
    """Vision encodings by image content hash: an LRU bounded in bytes (0 disables it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = self.hits = self.misses = 0
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()

    @staticmethod
    def key(pixels: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(pixels).view(np.uint8)).digest() + str(pixels.shape).encode()

    def get(self, key: bytes):
        hit = self._items.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return hit[0]

    def put(self, key: bytes, value) -> None:
        size = sum(a.nbytes for a in jax.tree.leaves(value))
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Live:
    """A request in a slot."""

    job: Job
    prep: Prepared
    stream: TextStream
    t_last: float = 0.0
    tokens: list[int] = field(default_factory=list)


class QueueLimit:
    """What both schedulers share: a thread (``_thread``), at most ``max_queue`` requests accepted and not yet answered
    (``_enqueue`` hands one to the scheduler), each settled once; ``cfg``, ``buckets`` and ``max_new_tokens`` set by the
    subclass."""

    cfg: Any
    buckets: tuple[int, ...]
    max_new_tokens: int
    _thread: threading.Thread

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0
        self.accepting = True
        self._lock = threading.Lock()

    @property
    def max_context(self) -> int:
        """The longest prompt, in tokens, that the buckets and the model's context leave room for."""
        return longest_prompt(self.cfg.text.max_position_embeddings, self.max_new_tokens, self.buckets)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False (nothing queued) when the queue is full or the server is stopping."""
        with self._lock:
            if not self.accepting or self.pending >= self.max_queue:
                return False
            self.pending += 1
        job.submitted = time.perf_counter()
        self._enqueue(job)
        return True

    def _enqueue(self, job: Job) -> None:
        raise NotImplementedError

    def _settle(self, job: Job, result: Answer | BaseException | None) -> None:
        if job.settled:
            return
        job.settled = True
        with self._lock:
            self.pending -= 1
        if result is not None:
            job.deliver(result)


class Engine(QueueLimit):
    """Continuous batching over ``slots`` decode slots on a thread; the server's default scheduler.

    ``observe(name, seconds)`` receives ``queue_wait`` (accepted to prefill), ``ttft`` (accepted to first
    token) and ``inter_token`` (between two tokens of one request) as they happen. ``mesh``: the slots and the
    parameters sharded over it (``slots`` a multiple of its ``data`` axis).
    """

    def __init__(self, params, cfg, tokenizer, *, mesh=None, slots: int = 8, prefill_batch: int = 4, max_queue: int = 256,
                 max_new_tokens: int = 64, hr_strategy: str = "project", buckets=BUCKETS, workers: int = 4,
                 image_cache_bytes: int = 256 << 20, decode_steps: int = 4, observe: Callable[[str, float], None] | None = None):
        super().__init__(max_queue)
        if min(slots, prefill_batch, decode_steps) < 1:
            raise ValueError(f"slots={slots}, prefill_batch={prefill_batch} and decode_steps={decode_steps} must be at least 1")
        self.decode_steps = decode_steps
        self.mesh, self._put = mesh, _placer(mesh, slots)
        self.params = params if mesh is None else jax.device_put(params, param_shardings(params, mesh))
        self.cfg, self.tokenizer = cfg, tokenizer
        self.slots, self.prefill_batch = slots, min(prefill_batch, slots)
        self.max_new_tokens, self.hr_strategy, self.buckets = max_new_tokens, hr_strategy, tuple(buckets)
        self.max_len = bucket_length(self.max_context, self.buckets) + max_new_tokens
        self.observe = observe
        self.cache = FeatureCache(image_cache_bytes)
        self.state = empty_slots(self.params, cfg, slots, self.max_len, hr_strategy, mesh)
        self.slot_bytes = slot_bytes(self.state)
        self.free: list[int] = list(range(slots))
        self.active: dict[int, _Live] = {}
        self.steps = 0
        self.request_s = 1.0  # running mean of a request's time in a slot (Retry-After)
        self._incoming: queue.Queue[tuple[Job, Future]] = queue.Queue()
        self._waiting: deque[tuple[Job, Future]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexattn-prepare")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexattn-engine", daemon=True)

    @property
    def slots_in_use(self) -> int:
        return len(self.active)

    def _enqueue(self, job: Job) -> None:  # its preprocessing starts now
        self._incoming.put((job, self._executor.submit(prepare, job.chat.request, self.cfg, self.tokenizer, self.max_context)))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time for the slots to work through the queue, 1 to 60."""
        return int(min(60, max(1, math.ceil(self.pending / self.slots * self.request_s))))

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, answer what is queued and in the slots, stop the thread."""
        self.accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the loop ----

    def _run(self) -> None:
        with target_mesh(self.mesh):  # the programs traced for the mesh's devices (a thread's own context)
            self._loop()

    def _loop(self) -> None:
        while True:
            idle = not self.active and not self._waiting
            try:
                item = self._incoming.get(timeout=0.1) if idle else self._incoming.get_nowait()
                self._waiting.append(item)
                while True:
                    self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                pass
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed program (e.g. device memory): its requests get a 500
                log.exception("engine step failed")
                for slot in list(self.active):
                    self._settle(self.active.pop(slot).job, e)
                self.free = list(range(self.slots))
                self.state = empty_slots(self.params, self.cfg, self.slots, self.max_len, self.hr_strategy, self.mesh)
            if self._stop.is_set() and not self.active and not self._waiting and self._incoming.empty():
                return

    def _ready(self) -> list[tuple[Job, Prepared]]:
        """Waiting requests whose preprocessing is done, in arrival order; cancelled and failed ones settled and dropped."""
        if self._waiting and not self.active:  # nothing to step meanwhile: wait a little for the oldest one
            wait_futures([self._waiting[0][1]], timeout=0.05)
        ready, keep = [], deque()
        for job, fut in self._waiting:
            if job.cancelled:
                self._settle(job, None)
            elif not fut.done():
                keep.append((job, fut))
            elif (e := fut.exception()) is not None:  # one bad request never fails the others (nor gets a 500)
                self._settle(job, Answer(None, error=item_error(e)))
            else:
                ready.append((job, fut.result()))
        self._waiting = keep
        return ready

    def _admit(self) -> None:
        if not self.free or not self._waiting:
            return
        ready = self._ready()
        while ready and self.free:
            bucket = bucket_length(len(ready[0][1].ids), self.buckets)
            group = [r for r in ready if bucket_length(len(r[1].ids), self.buckets) == bucket][: min(len(self.free), self.prefill_batch)]
            ready = [r for r in ready if all(r is not g for g in group)]
            try:
                self._prefill(group, bucket)
            except Exception as e:  # their own failure (the loop resets the slots): answered with it, not left waiting
                for job, _ in group:
                    self._settle(job, e)
                raise
        for job, prep in reversed(ready):  # no slot for them yet: back to the front, in order
            done: Future = Future()
            done.set_result(prep)
            self._waiting.appendleft((job, done))

    def features(self, prep: Prepared):
        """The image's vision encoding (LR features, HR features or None), from the cache or encoded now."""
        key = FeatureCache.key(prep.pixels)
        hit = self.cache.get(key) if self.cache.max_bytes else None
        if hit is None:
            hit = encode_images(self.params, self.cfg, self._put(prep.pixels[None]))
            if self.cache.max_bytes:
                self.cache.put(key, hit)
        return hit

    def _prefill(self, group: list[tuple[Job, Prepared]], bucket: int) -> None:
        n = len(group)
        rows = 1 if n == 1 else self.prefill_batch
        preps = [p for _, p in group]
        feats = [self.features(p) for p in preps]
        feats += [feats[0]] * (rows - n)
        lr = jnp.concatenate([f[0] for f in feats])
        hr = None if feats[0][1] is None else jnp.concatenate([f[1] for f in feats])
        ids, mask = pad_batch([p.ids for p in preps] + [preps[0].ids] * (rows - n), bucket, pad_id=self.cfg.pad_token_id, side="left")
        margin = margin_patches(np.array([p.ori_size for p in preps] + [preps[0].ori_size] * (rows - n)), self.cfg.lr_grid)
        sampling = [self._sampling(job) for job, _ in group]
        sampling += [sampling[0]] * (rows - n)
        temperature, top_p, seed = (np.array(col, dt) for col, dt in zip(zip(*sampling, strict=True),
                                                                          (np.float32, np.float32, np.int32), strict=True))
        ids, mask, margin, temperature, top_p, seed = map(self._put, (ids, mask, margin, temperature, top_p, seed))
        state, first, _ = prefill_rows(self.params, self.cfg, ids, mask, lr, hr, margin, temperature, top_p, seed,
                                       max_len=self.max_len, hr_strategy=self.hr_strategy)
        slots = [self.free.pop(0) for _ in range(n)]
        self.state = insert_rows(self.state, state, np.array(slots + [self.slots] * (rows - n), np.int32))
        first = np.asarray(first)
        now = time.perf_counter()
        for r, (slot, (job, prep)) in enumerate(zip(slots, group, strict=True)):
            self._observe("queue_wait", now - job.submitted)
            self.active[slot] = _Live(job, prep, TextStream(self.tokenizer, self.cfg, job.chat.stop))
            self._tokens(slot, [int(first[r])], now)

    @staticmethod
    def _sampling(job: Job) -> tuple[float, float, int]:
        temperature, top_p, seed = job.chat.sampling
        if seed is None:
            seed = random.getrandbits(31) if temperature > 0 else 0
        seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF  # a 64-bit seed folded into the slot's int32
        return temperature, top_p, seed - (1 << 32) if seed >= 1 << 31 else seed

    def _step(self) -> None:
        for slot in [s for s, live in self.active.items() if live.job.cancelled]:  # the client left: free its slot
            live = self.active.pop(slot)
            self.free.append(slot)
            self._settle(live.job, None)
        if not self.active:
            return
        self.state, tokens = decode_slots(self.params, self.cfg, self.state, self.decode_steps)
        tokens = np.asarray(tokens)
        self.steps += self.decode_steps
        now = time.perf_counter()
        for slot in list(self.active):
            self._tokens(slot, tokens[:, slot].tolist(), now)

    def _tokens(self, slot: int, tokens: list[int], now: float) -> None:
        """The slot's new tokens, arrived at ``now``: streamed as one piece of text; the slot freed at the request's end
        (the tokens after it are dropped)."""
        live = self.active[slot]
        first = not live.tokens
        if first:
            self._observe("ttft", now - live.job.submitted)
        else:  # the tokens of one call arrive together: each counts the mean gap since the slot's previous tokens
            for _ in tokens:
                self._observe("inter_token", (now - live.t_last) / len(tokens))
        live.t_last = now
        delta, end = "", False
        for token in tokens:
            live.tokens.append(token)
            delta += live.stream.push(token)
            end = token == self.cfg.eos_token_id or len(live.tokens) >= live.job.chat.max_tokens or live.stream.stopped
            if end:
                break
        if (delta or first) and live.job.on_text is not None:
            live.job.on_text(delta)
        if end:
            del self.active[slot]
            self.free.append(slot)
            self.request_s = 0.9 * self.request_s + 0.1 * (now - live.job.submitted)
            self._settle(live.job, Answer(answer_text(self.tokenizer, self.cfg, live.tokens), live.tokens,
                                          prompt_tokens=len(live.prep.ids)))

    def _observe(self, name: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(name, seconds)

    # ---- warm-up ----

    def warmup(self) -> int:
        """Compile (or load from the compile cache) every program a request can meet: the encoder, the prefill and
        insert of each bucket at 1 and ``prefill_batch`` rows, the step. The number of buckets."""
        with target_mesh(self.mesh):
            return self._warmup()

    def _warmup(self) -> int:
        from flexattn_jax.app.serve import warmup_prompts
        from flexattn_jax.preprocess import format_prompt, tokenize_with_image

        cfg = self.cfg
        pixels = np.zeros((cfg.image_size, cfg.image_size, 3), jnp.dtype(cfg.dtype))
        prompts = warmup_prompts(cfg, self.tokenizer, self.buckets, self.max_context)
        for text in prompts:
            ids = tokenize_with_image(format_prompt(text), self.tokenizer, cfg.image_token_id, cfg.num_image_tokens, num_images=1)
            bucket = bucket_length(len(ids), self.buckets)
            for rows in sorted({1, self.prefill_batch}):
                lr, hr = encode_images(self.params, cfg, self._put(pixels[None]))
                lr, hr = (None if a is None else jnp.repeat(a, rows, axis=0) for a in (lr, hr))
                ids_b, mask = map(self._put, pad_batch([ids] * rows, bucket, pad_id=cfg.pad_token_id, side="left"))
                vec = lambda v, dt, rows=rows: self._put(np.full(rows, v, dt))  # noqa: E731
                state, first, _ = prefill_rows(self.params, cfg, ids_b, mask, lr, hr, self._put(np.zeros((rows, 2), np.int32)),
                                               vec(0, np.float32), vec(1, np.float32), vec(0, np.int32),
                                               max_len=self.max_len, hr_strategy=self.hr_strategy)
                self.state = insert_rows(self.state, state, np.full(rows, self.slots, np.int32))  # dropped: slots stay free
        self.state, tokens = decode_slots(self.params, cfg, self.state, self.decode_steps)
        tokens.block_until_ready()
        return len(prompts)

    def stats(self) -> dict[str, Any]:
        """Slots, cache and step counters (``/metrics`` reads them)."""
        return {"slots": self.slots, "slots_in_use": len(self.active), "steps": self.steps, "image_cache_hits": self.cache.hits,
                "image_cache_misses": self.cache.misses, "image_cache_bytes": self.cache.bytes, "image_cache_items": len(self.cache),
                "slot_bytes": self.slot_bytes}
