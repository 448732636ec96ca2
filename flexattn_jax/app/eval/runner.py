"""Run one task at one HR budget: predictions streamed to JSONL as items finish, resumable, then metrics.

``{out}/predictions.jsonl`` gets one line per finished item (its id, a content key, the prompt, the
prediction or option losses, its score, its share of the TFLOPs). Re-running with the same ``out``
skips the items whose key (sample id, image, prompt, options and the run's settings) already has an
answer, so a killed run finishes where it stopped and ends with the same metrics. A line cut by a
kill is dropped. ``{out}/metrics.json`` holds the metrics of every current item; ``{out}/results.json`` and
``{out}/samples_<task>.jsonl`` the same run in lmms-eval's layout (:mod:`flexattn_jax.app.eval.lmms`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jax.sharding import Mesh
from PIL import Image, UnidentifiedImageError

from flexattn_jax.app.eval import tasks as K
from flexattn_jax.app.eval.data import BadSample, Item, Sample
from flexattn_jax.app.eval.likelihood import OptionQuestion, OptionScorer, losses_flops, option_tokens
from flexattn_jax.app.eval.lmms import write_lmms
from flexattn_jax.app.inference import GenerationOptions, Request, item_error, stream_answers
from flexattn_jax.config import ModelConfig
from flexattn_jax.flops import generation_flops
from flexattn_jax.logs import progress
from flexattn_jax.preprocess import (
    PreprocessError,
    bucket_length,
    format_prompt,
    image_normalization,
    preprocess_image,
    text_problem,
    tokenize_with_image,
)

_log = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


@dataclass
class EvalSettings:
    """How a task is run (everything that changes a prediction is part of each item's key)."""

    task: str
    protocol: str = "likelihood"  # vstar: 'likelihood' or 'letter'; the other tasks generate
    mode: str = "release"  # likelihood select rows: the option's learnable rows, as the release (the only mode)
    ocr_tokens: bool = False
    generation: GenerationOptions = field(default_factory=GenerationOptions)  # batch_size: also the likelihood's option rows
    checkpoint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. hr_budget, dtype

    @property
    def generates(self) -> bool:
        return not (self.task == "vstar" and self.protocol == "likelihood")

    def key_fields(self) -> dict[str, Any]:
        out = {"task": self.task, "checkpoint": self.checkpoint, **self.extra}
        if self.generates:
            out.update(max_new_tokens=self.generation.max_new_tokens, ocr_tokens=self.ocr_tokens, protocol=self.protocol)
        else:
            out.update(mode=self.mode)
        return out


# ---- predictions file --------------------------------------------------------------------------

def predictions_header(settings: EvalSettings) -> dict[str, Any]:
    """The header record of ``predictions.jsonl`` (:mod:`flexattn_jax.app.resume`): the task and every setting
    that changes a prediction, the checkpoint's fingerprint among them."""
    from flexattn_jax.app.resume import make_header

    return make_header("eval predictions", **settings.key_fields())


def read_predictions(path: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished records by key, after checking the file is this run's (:func:`flexattn_jax.app.resume.read_records`:
    a file without this header, with another run's header or with a complete line that is not a record is refused
    with a :class:`~flexattn_jax.app.resume.ResumeError` and left as it is; a last line cut short by a kill is removed).
    """
    from flexattn_jax.app.resume import read_records

    done: dict[str, dict[str, Any]] = {}
    for _, _, rec in read_records(path, header, "--out", lambda r: isinstance(r.get("key"), str)):
        if rec.get("error") is None:
            done[rec["key"]] = rec
    return done


def _bounded(fn: Callable, items: Iterable, workers: int, depth: int) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """``(item, fn(item), None)`` or ``(item, None, error)`` in order, at most ``depth`` items ahead (threads)."""
    queue: deque[tuple[Any, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) >= depth:
                it, fut = queue.popleft()
                yield (it, fut.result(), None) if fut.exception() is None else (it, None, fut.exception())
        while queue:
            it, fut = queue.popleft()
            yield (it, fut.result(), None) if fut.exception() is None else (it, None, fut.exception())


# ---- the run --------------------------------------------------------------------------------------

class OutputWriteError(Exception):
    """``predictions.jsonl`` cannot be written (a full disk); the message says what was kept and how to resume."""


def _write_failed(path: Path, e: OSError) -> OutputWriteError:
    return OutputWriteError(f"cannot write {path} ({e.strerror or e}); the finished items written before are kept: free "
                            "space, then re-run the same command to resume")


class Interrupted(Exception):  # noqa: N818 - a stop request, not an error
    """The run stopped at a stop request (Ctrl-C, SIGTERM) after the batch in flight; the message says where the
    finished items are."""


@dataclass
class Pending:
    sample: Sample
    user: str  # the user turn (without <image>)
    key: str


@dataclass
class _Work:
    """One run's items: the usable ones, those that failed, the finished records, what is left to answer."""

    pending: list[Pending] = field(default_factory=list)  # every usable item, in input order
    failures: list[dict[str, Any]] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)  # sample id -> its first input position
    answered: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> finished record (this run's or a resumed one)
    todo: list[Pending] = field(default_factory=list)  # the usable items without a finished record

    def in_input_order(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(finished records, failures)`` in input order, however the run was split."""
        order = {p.key: n for n, p in enumerate(self.pending)}
        records = sorted(self.answered.values(), key=lambda r: order[r["key"]])
        return records, sorted(self.failures, key=lambda f: self.position.get(f["id"], 0))


def _open_predictions(path: Path, header: dict[str, Any]) -> TextIO:
    """``path`` opened to append records (its directory made; the header written first when it is new or empty)."""
    from flexattn_jax.app.resume import write_header

    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = not path.exists() or path.stat().st_size == 0
    sink = None
    try:
        sink = open(path, "a")  # noqa: SIM115 - the run closes it
        if fresh:
            write_header(sink, header)
    except OSError as e:
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.close()
        raise _write_failed(path, e) from e
    return sink


class Runner:
    """Evaluates items with ``(params, cfg, tokenizer)`` under ``settings``.

    Generation goes through the streaming inference pipeline
    (:func:`flexattn_jax.app.inference.stream_answers`, formatted prompts), the V* likelihood protocol
    through :class:`flexattn_jax.app.eval.likelihood.OptionScorer`.
    """

    def __init__(self, params: dict, cfg: ModelConfig, tokenizer: Any, settings: EvalSettings, *, mesh: Mesh | None = None,
                 progress: bool = True, log: Callable[[str], None] = _log.info):
        self.params, self.cfg, self.tokenizer, self.s = params, cfg, tokenizer, settings
        self.mesh, self.progress, self.log = mesh, progress, log
        self.stats: dict[str, Any] = {}

    def run(self, items: Iterable[Item], out: str | Path | None = None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Score every item (skipping finished ones in ``out``), write ``out``'s files, return the metrics.

        ``stop()`` True (a Ctrl-C / SIGTERM flag) ends the run after the batch in flight: the finished items
        are in ``predictions.jsonl`` and :class:`Interrupted` is raised (no metrics are written).
        """
        stopping = stop if stop is not None else (lambda: False)
        t0 = time.perf_counter()
        work = self._read_items(items)
        path = None if out is None else Path(out) / PREDICTIONS
        header = predictions_header(self.s)
        if path is not None:
            self._resume(work, path, header)
        self._answer(work, path, header, stopping)
        if stopping():
            raise Interrupted(f"finished items are in {path}" if path is not None else "stopped")
        records, failures = work.in_input_order()
        metrics = self._metrics(records, failures, answered_now=len(work.todo), wall_s=time.perf_counter() - t0)
        if out is not None:
            self._write_results(Path(out), metrics, records, work)
        return metrics

    def _read_items(self, items: Iterable[Item]) -> _Work:
        """Each usable item with its user turn and key; a bad sample, or one whose question cannot be made, fails alone."""
        work = _Work()
        for n, item in enumerate(items):
            work.position.setdefault(item.id, n)
            if isinstance(item, BadSample):
                work.failures.append({"id": item.id, "error": item.error, "category": item.category})
                continue
            try:  # any failure of one sample is its own (a question that is not UTF-8 text among them)
                user = K.user_text(self.s.task, item, self.s.protocol, self.s.ocr_tokens)
                if (bad := text_problem(user)) is not None:
                    raise PreprocessError(f"sample {item.id!r}: its question is {bad}")
                work.pending.append(Pending(item, user, K.item_key(item, user, self.s.key_fields())))
            except Exception as e:  # noqa: BLE001
                work.failures.append({"id": item.id, "error": item_error(e), "category": item.category})
        work.todo = list(work.pending)
        return work

    def _resume(self, work: _Work, path: Path, header: dict[str, Any]) -> None:
        """Take the finished records of ``path`` (a stopped run's, checked to be this run's); the rest stays to do."""
        done = read_predictions(path, header)
        work.answered = {p.key: done[p.key] for p in work.pending if p.key in done}
        work.todo = [p for p in work.pending if p.key not in done]
        if work.answered:
            self.log(f"resuming: {len(work.answered)} of {len(work.pending)} items already answered in {path}")

    def _answer(self, work: _Work, path: Path | None, header: dict[str, Any], stopping: Callable[[], bool]) -> None:
        """Answer ``work.todo`` (option likelihood or generation), appending each record to ``path`` as it finishes;
        a stop request ends it after the record in hand."""
        sink = _open_predictions(path, header) if path is not None else None
        records = (self._likelihood if not self.s.generates else self._generate)(work.todo, stopping)
        try:
            bar = progress(total=len(work.todo), desc=self.s.task, unit="item", disable=not self.progress)
            for rec in records:
                if rec.get("error") is not None:
                    work.failures.append({"id": rec["id"], "error": rec["error"], "category": rec.get("category", "")})
                else:
                    work.answered[rec["key"]] = rec
                if sink is not None:
                    try:
                        sink.write(json.dumps(rec) + "\n")
                        sink.flush()
                    except OSError as e:  # a full disk: what was flushed stays, the run stops
                        raise _write_failed(path, e) from e  # type: ignore[arg-type]
                bar.update(1)
                if stopping():
                    break
            bar.close()
        finally:
            records.close()  # the pipeline's threads stop before anything else happens
            if sink is not None:
                with contextlib.suppress(OSError):  # a full disk: reported above
                    sink.close()

    def _metrics(self, records: list[dict[str, Any]], failures: list[dict[str, Any]], answered_now: int,
                 wall_s: float) -> dict[str, Any]:
        """The task's metrics over every finished record, with the settings that produced them and the pipeline's timing."""
        metrics = K.task_metrics(self.s.task, records, failures)
        metrics.update(
            protocol=self.s.protocol if self.s.task == "vstar" else "generate",
            mode=self.s.mode if not self.s.generates else None,
            ocr_tokens=self.s.ocr_tokens if self.s.task == "textvqa" else None,
            hr_budget=self.s.extra.get("hr_budget", "checkpoint"), hr_budget_tokens=self.cfg.hr_budget_tokens
            if self.cfg.flex.enabled else None,
            wall_s=round(wall_s, 2), answered_now=answered_now,
        )
        if self.stats:
            metrics["pipeline"] = {k: self.stats[k] for k in ("compile_s", "steady_items_per_s", "decode_steps") if k in self.stats}
        return metrics

    def _write_results(self, out: Path, metrics: dict[str, Any], records: list[dict[str, Any]], work: _Work) -> None:
        """``metrics.json``, and the run in lmms-eval's layout (:func:`flexattn_jax.app.eval.lmms.write_lmms`)."""
        (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        by_key = {p.key: p.sample for p in work.pending}
        write_lmms(out, self.s.task, metrics["protocol"], self.cfg,
                   {**self.s.extra, "checkpoint": self.s.checkpoint, "batch_size": self.s.generation.batch_size,
                    "max_new_tokens": self.s.generation.max_new_tokens, "ocr_tokens": self.s.ocr_tokens},
                   records, [by_key[r["key"]] for r in records], [work.position[by_key[r["key"]].id] for r in records], metrics)

    # ---- likelihood (V* release protocol) ----

    def _prepare_options(self, p: Pending) -> OptionQuestion:
        prompt = format_prompt(p.user, has_image=True)
        tok = [option_tokens(prompt, o, self.tokenizer, self.cfg) for o in p.sample.options]
        pixels, ori = preprocess_image(p.sample.load_image(), self.cfg.image_size, *image_normalization(self.cfg.vision))
        return OptionQuestion([i for i, _ in tok], [lab for _, lab in tok], pixels, ori)

    def _likelihood(self, todo: list[Pending], stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        self.log("V* by option likelihood: select rows = each option's learnable rows (training mode, alpha 1; the release)")
        scorer = OptionScorer(self.params, self.cfg, rows=self.s.generation.batch_size, mesh=self.mesh)
        errors: list[dict[str, Any]] = []

        def good() -> Iterator[tuple[int, OptionQuestion]]:
            for pos, (p, item, err) in enumerate(_bounded(self._prepare_options, todo, 4, 2 * self.s.generation.batch_size)):
                if err is None:
                    yield pos, item
                else:
                    errors.append(self._record(p, error=item_error(err)))

        for pos, losses, shapes, real_rows in scorer.score(good()):
            yield from _drain(errors)
            share = len(losses) / real_rows  # padding rows' cost is shared by the real ones
            flops = losses_flops(self.params, self.cfg, shapes)
            yield self._record(todo[pos], **K.score_likelihood(losses), tflops=flops * share / 1e12)
        yield from _drain(errors)

    # ---- generation ----

    def _request(self, p: Pending, prompt: str) -> Request:
        """A formatted-prompt request; an image that cannot even be opened becomes the request's error."""
        image: Any = p.sample.image
        if isinstance(image, bytes):
            try:
                image = Image.open(io.BytesIO(image))  # decoded lazily, in the pipeline's threads
            except (UnidentifiedImageError, OSError) as e:
                return Request(None, None, error=f"cannot decode the image of sample {p.sample.id!r}: {e}")
        return Request(image, prompt, formatted=True)

    def _generate(self, todo: list[Pending], stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        prompts = [format_prompt(p.user, has_image=True) for p in todo]
        self.log(f"{self.s.task}: greedy generation, up to {self.s.generation.max_new_tokens} new tokens per item"
                 + (f" ({self.s.protocol} protocol)" if self.s.task == "vstar" else ""))
        requests = (self._request(p, prompt) for p, prompt in zip(todo, prompts, strict=True))
        answers = stream_answers(self.params, self.cfg, self.tokenizer, requests, self.s.generation, mesh=self.mesh, progress=False,
                                 stats=self.stats, stop=stop)
        for index, answer in answers:
            p = todo[index]
            if answer.error is not None:
                yield self._record(p, error=answer.error)
                continue
            scored = K.score_generation(self.s.task, p.sample, p.user, answer.text or "", self.s.protocol)
            yield self._record(p, prediction=answer.text, **scored, tflops=self._generation_tflops(prompts[index], answer))

    def _generation_tflops(self, prompt: str, answer) -> float:
        """This item's share of its batch's prefill plus one decode step per generated token after the first."""
        n = len(tokenize_with_image(prompt, self.tokenizer, self.cfg.image_token_id, self.cfg.num_image_tokens))
        g = self.s.generation
        length = bucket_length(n, g.buckets)
        b = g.batch_size
        pre, step = generation_flops(self.params, self.cfg, b, length, length + g.max_new_tokens, g.hr_strategy)
        return (pre + max(len(answer.tokens) - 1, 0) * step) / b / 1e12

    def _record(self, p: Pending, **fields: Any) -> dict[str, Any]:
        rec = {"id": p.sample.id, "key": p.key, "category": p.sample.category, "prompt": p.user}
        rec.update(fields)
        rec.setdefault("error", None)
        return rec


def _drain(errors: list) -> Iterator:
    while errors:
        yield errors.pop(0)
