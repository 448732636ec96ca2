"""LLaVA-format training data: records -> tokens, labels, pixels -> static-shape, process-sharded batches.

Pipeline (grain)::

    plan (epoch-seeded order, length-grouped, this process's slice of every global batch)
      -> load (read + preprocess the image, v1 template, tokens, labels)   [grain workers]
      -> count/skip bad samples                                           [main process]
      -> batch + collate (pad to max_len or a bucket, learnable rows)      [main process]

The order is a pure function of ``(seed, epoch)``, so the run is deterministic and the grain iterator
state (a position) makes it resumable. Each process reads only its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from flexattn_jax.config import IGNORE_INDEX, ModelConfig
from flexattn_jax.preprocess import (
    IMAGE_PLACEHOLDER,
    PreprocessError,
    bucket_length,
    image_normalization,
    load_image,
    pad_batch,
    preprocess_image,
)
from flexattn_jax.selection import grounding_target, learnable_rows, margin_patches
from flexattn_jax.tokenizer import check_tokenizer_vocab
from train.config import DataConfig

BOX_FORMATS: tuple[Any, ...] = (None, "pixels", "normalized")  # a record's 'box_format' (None: pixels)
NORMALIZED_GUESS_PX = 4  # a pixel box with every coordinate in [0, 1] on a larger image is refused as normalised


def grounding_note(weight: float, records: Sequence[Any]) -> str | None:
    """The warning for a grounding weight given to records none of which has a ``box`` (naming the count); else None."""
    if not weight > 0 or any(isinstance(r, dict) and r.get("box") is not None for r in records):
        return None
    return f"grounding weight {weight:g}, but none of the {len(records):,} records has a 'box': the grounding term does nothing"


class DataError(ValueError):
    """The data file or a sample is unusable; the message names the file, sample and reason."""


@dataclasses.dataclass(frozen=True)
class BadSample:
    """A sample that could not be prepared (flows through the pipeline to be counted, then dropped)."""

    index: int
    sample_id: str
    reason: str
    message: str


# ---- records ---------------------------------------------------------------------------------------

def read_records(path: str | Path) -> list[Any]:
    """The samples of a LLaVA JSON list (``.json``) or of a JSON-lines file (``.jsonl``).

    Malformed JSON raises :class:`DataError` with the line and column. A malformed JSONL line becomes
    a ``{"__malformed__": message}`` entry (a bad sample, counted or raised later by policy).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out: list[Any] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                out.append({"__malformed__": f"{path}:{n}: malformed JSON line: {e.msg} (column {e.colno})"})
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples, got a {type(data).__name__}")
    return data


def approx_length(record: Any, num_image_tokens: int) -> int:
    """Cheap length estimate for length grouping: words of all turns plus the image tokens."""
    if not isinstance(record, dict):
        return 0
    words = 0
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict):
            words += len(str(turn.get("value", "")).split())
    return words + (num_image_tokens if record.get("image") is not None else 0)


# ---- one sample ---------------------------------------------------------------------------------------

class SampleLoader:
    """Record index -> ``{input_ids, labels, pixel_values, ori_size, has_image, grounding}`` or a :class:`BadSample`.

    ``image`` is a path (relative to the image folder) or an in-memory ``PIL.Image``. Picklable (it
    runs in grain worker processes).
    """

    def __init__(self, records: Sequence[Any], cfg: ModelConfig, dcfg: DataConfig, tokenizer: Any):
        self.records = records
        self.cfg = cfg
        self.dcfg = dcfg
        self.tokenizer = tokenizer
        self.image_root = Path(dcfg.images) if dcfg.images else None

    def __call__(self, item: tuple[int, int]) -> dict[str, Any] | BadSample:
        index, epoch = item
        record = self.records[index]
        sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        try:
            out = self.load(record)
        except (DataError, PreprocessError) as e:
            reason = getattr(e, "reason", None) or _reason_of(e)
            return BadSample(index, sample_id, reason, f"sample {sample_id!r} (#{index}): {e}")
        except Exception as e:  # noqa: BLE001 - never crash mid-epoch on one sample
            return BadSample(index, sample_id, "error", f"sample {sample_id!r} (#{index}): {type(e).__name__}: {e}")
        out["epoch"] = epoch
        out["index"] = index
        return out

    def load(self, record: Any) -> dict[str, Any]:
        """Prepare one record (raises :class:`DataError` / ``PreprocessError``)."""
        cfg, dcfg = self.cfg, self.dcfg
        if not isinstance(record, dict):
            raise _err("malformed", f"a sample must be a JSON object, got {type(record).__name__}")
        if "__malformed__" in record:
            raise _err("malformed", record["__malformed__"])
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise _err("malformed", "'conversations' must be a non-empty list of {from, value} objects")
        image = record.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise _err("malformed", f"{len(image)} images; FlexAttention training takes one image per sample")
            image = image[0]
        has_image = image is not None and not (isinstance(image, str) and not image)
        n_tags = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns)
        if has_image and n_tags == 0:
            if not dcfg.add_image_tag:
                raise _err("image_tag", f"the sample has an image but no {IMAGE_PLACEHOLDER} tag (add_image_tag inserts one)")
            turns = [dict(t) for t in turns]
            first = next((t for t in turns if str(t.get("from", "")).lower() in ("human", "user")), None)
            if first is None:
                raise _err("malformed", "no human turn to put the image tag in")
            first["value"] = IMAGE_PLACEHOLDER + "\n" + str(first.get("value", ""))
            n_tags = 1
        if not has_image and n_tags:
            raise _err("image_tag", f"{n_tags} {IMAGE_PLACEHOLDER} tag(s) but no 'image' field")
        if n_tags > 1:
            raise _err("image_tag", f"{n_tags} {IMAGE_PLACEHOLDER} tags; one image per sample is supported")
        s = cfg.image_size
        if isinstance(image, Image.Image):  # in-memory samples (demo, tests)
            pixels, ori = preprocess_image(image, s, *image_normalization(cfg.vision))
        elif has_image:
            if self.image_root is None and not Path(str(image)).is_absolute():
                raise _err("missing_image", f"image {image!r} is relative but no image folder was given")
            path = (self.image_root / str(image)) if self.image_root is not None else Path(str(image))
            try:
                pixels, ori = preprocess_image(load_image(path), s, *image_normalization(cfg.vision))
            except PreprocessError as e:
                raise _err("missing_image" if "not found" in str(e) else "bad_image", str(e)) from e
        else:
            pixels, ori = np.zeros((s, s, cfg.vision.num_channels), np.float32), (1, 1)
        truncate = "truncate" if dcfg.truncation == "truncate" else "raise"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ids, labels = self._tokenize(turns, truncate)
        except PreprocessError as e:
            reason = "too_long" if "max_len" in str(e) else "malformed"
            raise _err(reason, str(e)) from e
        return {
            "input_ids": ids.astype(np.int32),
            "labels": labels.astype(np.int32),
            "pixel_values": pixels,
            "ori_size": np.asarray(ori, np.int32),
            "has_image": has_image,
            "grounding": self._grounding(record.get("box"), ori, has_image, record.get("box_format")),
        }

    def _grounding(self, box: Any, ori: tuple[int, int], has_image: bool, box_format: Any = None) -> np.ndarray:
        """The record's optional ``box`` [x0, y0, x1, y1] (pixels of the original image, half-open) as the share of
        its pixels per LR cell (:func:`flexattn_jax.selection.grounding_target`); zeros without one.

        ``box_format`` ``"normalized"`` reads the box as fractions of the image's width and height (LLaVA-style
        [0, 1] data), widened to whole pixels. Without it a box whose coordinates all lie in [0, 1] on an image
        larger than :data:`NORMALIZED_GUESS_PX` pixels a side is refused: pixels are expected.
        """
        g = self.cfg.lr_grid
        if box is None:
            return np.zeros(g * g, np.float32)
        if not has_image:
            raise _err("bad_box", f"'box' {box!r} given for a sample without an image")
        if box_format not in BOX_FORMATS:
            raise _err("bad_box", f"'box_format' {box_format!r}: use one of {', '.join(map(repr, BOX_FORMATS[1:]))} (default 'pixels')")
        if not (isinstance(box, list | tuple) and len(box) == 4
                and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise _err("bad_box", f"'box' must be [x0, y0, x1, y1], four finite numbers (pixels), got {box!r}")
        w, h = ori
        if box_format == "normalized":
            if not all(0 <= v <= 1 for v in box):
                raise _err("bad_box", f"'box' {box!r} with 'box_format' 'normalized' must lie in [0, 1]")
            box = [math.floor(box[0] * w), math.floor(box[1] * h), math.ceil(box[2] * w), math.ceil(box[3] * h)]
        elif all(0 <= v <= 1 for v in box) and min(w, h) > NORMALIZED_GUESS_PX:
            raise _err("bad_box", f"'box' {box!r} lies in [0, 1] on a {w}x{h} image: boxes are in pixels; for [0, 1] "
                       "coordinates set \"box_format\": \"normalized\" in the record")
        try:
            return grounding_target(np.asarray(box), ori, g)
        except ValueError as e:
            raise _err("bad_box", f"'box': {e}") from e

    def _tokenize(self, turns: list[dict], truncation: str) -> tuple[np.ndarray, np.ndarray]:
        from flexattn_jax.preprocess import tokenize_conversation

        return tokenize_conversation(
            turns, self.tokenizer, self.cfg.image_token_id, self.cfg.num_image_tokens, self.dcfg.max_len,
            system=self.dcfg.system_prompt, truncation=truncation,
        )


def _err(reason: str, message: str) -> DataError:
    e = DataError(message)
    e.reason = reason  # type: ignore[attr-defined]
    return e


def _reason_of(e: Exception) -> str:
    return "too_long" if "max_len" in str(e) else "malformed"


# ---- batches -------------------------------------------------------------------------------------------

class Collator:
    """Examples -> one static-shape host batch (right padding; labels padded with IGNORE_INDEX)."""

    def __init__(self, cfg: ModelConfig, dcfg: DataConfig):
        self.cfg, self.dcfg = cfg, dcfg

    def length_for(self, longest: int) -> int:
        """Padded length: ``max_len``, or the smallest bucket holding ``longest``."""
        if self.dcfg.buckets is None:
            return self.dcfg.max_len
        return bucket_length(longest, self.dcfg.buckets)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        length = self.length_for(max(len(e["input_ids"]) for e in examples))
        ids, mask = pad_batch([e["input_ids"] for e in examples], length, cfg.pad_token_id, side="right")
        labels, _ = pad_batch([e["labels"] for e in examples], length, IGNORE_INDEX, side="right")
        r = min(self.dcfg.max_select_rows or self.dcfg.max_len, length)
        packed = [learnable_rows(lab, e["has_image"], r) for lab, e in zip(labels, examples, strict=True)]
        ori = np.stack([e["ori_size"] for e in examples])
        margin = margin_patches(ori, cfg.lr_grid).astype(np.int32) if cfg.flex.enabled else np.zeros((len(ori), 2), np.int32)
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": np.stack([e["pixel_values"] for e in examples]).astype(np.float32),
            "margin": margin,
            "select_rows": np.stack([p[0] for p in packed]),
            "select_valid": np.stack([p[1] for p in packed]),
            "grounding": np.stack([e["grounding"] for e in examples]),
            "_rows_dropped": np.asarray(sum(max(0, p[2] - r) for p in packed), np.int64),
            "_epoch": np.asarray(max(e["epoch"] for e in examples), np.int64),
            "_index": np.asarray([e["index"] for e in examples], np.int64),
        }


class SkipCounter:
    """Counts bad samples by reason in the main process; raises under ``on_error='raise'``."""

    def __init__(self, dcfg: DataConfig):
        self.dcfg = dcfg
        self.counts: Counter[str] = Counter()
        self.seen = 0
        self.logged = 0
        self.first: str | None = None  # the first bad sample's message, for "every sample was bad"

    def __call__(self, element: dict[str, Any] | BadSample) -> dict[str, Any] | BadSample:
        self.seen += 1
        if isinstance(element, BadSample):
            if self.dcfg.on_error == "raise":
                raise DataError(f"{element.message} [{element.reason}] (on_error='raise'; use 'skip' to count and skip)")
            self.counts[element.reason] += 1
            self.first = self.first or f"{element.message} [{element.reason}]"
            if self.logged < self.dcfg.max_logged_errors:
                self.logged += 1
                warnings.warn(f"skipping {element.message} [{element.reason}]", stacklevel=2)
        return element

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.counts)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.seen = int(state.get("seen", 0))
        self.counts = Counter({k: int(v) for k, v in state.get("skipped", {}).items()})


def _is_good(element: Any) -> bool:
    return not isinstance(element, BadSample)


class BatchPlan(Sequence):
    """This process's stream of ``(record index, epoch)``: the epoch's order, sliced per global batch.

    The global order of epoch e is grain's index shuffle seeded from ``(seed, e)``, length-grouped in
    mega-batches of ``group_size`` global batches (sorted by estimated length, batch order shuffled).
    Process p takes, from each microbatch of each global batch, its contiguous ``micro_local`` slice.
    """

    def __init__(
        self, lengths: np.ndarray, global_batch: int, grad_accum: int, process_index: int, process_count: int,
        num_epochs: int, seed: int, shuffle: bool = True, group_by_length: bool = True, group_size: int = 16,
    ):
        if global_batch % (grad_accum * process_count):
            n = grad_accum * process_count
            raise DataError(f"batch_size={global_batch} is not a multiple of grad_accum x processes = {n}")
        self.lengths = np.asarray(lengths, np.int64)
        self.n = len(self.lengths)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.micro_global = global_batch // grad_accum
        self.micro_local = self.micro_global // process_count
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.batches_per_epoch = self.n // global_batch
        if self.batches_per_epoch < 1:
            raise DataError(f"{self.n} samples make no global batch of {global_batch}")
        self.num_epochs = num_epochs
        self.seed, self.shuffle, self.group_by_length, self.group_size = seed, shuffle, group_by_length, group_size

    def __len__(self) -> int:
        return self.num_epochs * self.batches_per_epoch * self.local_batch

    @lru_cache(maxsize=2)  # noqa: B019 - one plan object per run
    def order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch`` (length ``batches_per_epoch * global_batch``)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:  # grain's index shuffle (the permutation MapDataset.shuffle uses), reseeded per epoch
            seed = int(rng.integers(0, 2**31 - 1))
            shuffle = grain.experimental.index_shuffle
            perm = np.fromiter((shuffle(i, self.n - 1, seed, 4) for i in range(self.n)), np.int64, self.n)
        else:
            perm = np.arange(self.n)
        perm = perm[: self.batches_per_epoch * self.global_batch]
        if self.group_by_length and self.shuffle:
            mega = self.global_batch * max(1, self.group_size)
            chunks = []
            for start in range(0, len(perm), mega):
                chunk = perm[start : start + mega]
                chunks.append(chunk[np.argsort(-self.lengths[chunk], kind="stable")])
            perm = np.concatenate(chunks)
            batches = perm.reshape(self.batches_per_epoch, self.global_batch)
            perm = batches[rng.permutation(self.batches_per_epoch)].reshape(-1)
        return perm

    def __getitem__(self, j: int) -> tuple[int, int]:  # type: ignore[override]
        if not 0 <= j < len(self):
            raise IndexError(j)
        per_epoch = self.batches_per_epoch * self.local_batch
        epoch, r = divmod(int(j), per_epoch)
        b, k = divmod(r, self.local_batch)
        a, i = divmod(k, self.micro_local)
        pos = b * self.global_batch + a * self.micro_global + self.process_index * self.micro_local + i
        return int(self.order(epoch)[pos]), epoch


class TrainData:
    """Deterministic, resumable, process-sharded batches of a LLaVA dataset (grain underneath).

    Iterating :meth:`iterator` yields host batches of ``batch_size / process_count`` samples padded to
    a static length; the iterator's ``get_state()/set_state()`` (grain checkpointing) resume it.
    ``num_steps`` / ``epochs`` size the (lazy) plan: the run's length plus a spare epoch.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        dcfg: DataConfig,
        tokenizer: Any,
        batch_size: int,
        grad_accum: int = 1,
        *,
        records: Sequence[Any] | None = None,
        num_steps: int | None = None,
        epochs: float = 1.0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        import jax

        self.cfg, self.dcfg, self.tokenizer = cfg, dcfg, tokenizer
        self.records = list(read_records(dcfg.data) if records is None else records)
        if not self.records:
            raise DataError(f"{dcfg.data or 'records'}: no samples")
        try:
            check_tokenizer_vocab(tokenizer, cfg.text.vocab_size)
        except ValueError as e:
            raise DataError(str(e)) from e
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.lengths = np.asarray([approx_length(r, cfg.num_image_tokens) for r in self.records], np.int64)
        per_epoch = len(self.records) // batch_size
        # the plan is lazy: cover the run (steps or epochs) plus one spare epoch for skipped samples
        epochs = (math.ceil(num_steps / per_epoch) if num_steps and per_epoch else math.ceil(epochs)) + 1
        self.plan = BatchPlan(
            self.lengths, batch_size, grad_accum, self.process_index, self.process_count, epochs, dcfg.seed,
            dcfg.shuffle, dcfg.group_by_length, dcfg.group_size,
        )
        self.counter = SkipCounter(dcfg)
        self.collator = Collator(cfg, dcfg)

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.process_count

    def dataset(self) -> grain.IterDataset:
        """The grain pipeline (see the module docstring)."""
        loader = SampleLoader(self.records, self.cfg, self.dcfg, self.tokenizer)
        ds = grain.MapDataset.source(self.plan).map(loader)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.dcfg.threads, prefetch_buffer_size=max(1, self.dcfg.prefetch)))
        if self.dcfg.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; defaults are fine
                flags.FLAGS.mark_as_parsed()
            opts = grain.MultiprocessingOptions(num_workers=self.dcfg.workers, per_worker_buffer_size=max(1, self.dcfg.prefetch))
            it = it.mp_prefetch(opts)
        self.counter = SkipCounter(self.dcfg)  # counts belong to the newest iterator
        it = it.map(self.counter).filter(_is_good)
        return it.batch(self.local_batch, drop_remainder=True, batch_fn=self.collator)

    def iterator(self) -> grain.DatasetIterator:
        """A fresh checkpointable iterator over host batches."""
        return iter(self.dataset())

    def stats(self) -> dict[str, Any]:
        """Samples seen and skipped (by reason) so far by the newest iterator, in this process."""
        return self.counter.state()
