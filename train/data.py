"""LLaVA-format training data: records -> tokens, labels, pixels -> static-shape, process-sharded batches.

Pipeline (grain)::

    scan (every record checked once without decoding pixels; the hosts split the records and
          all-gather the verdicts, so every process knows the same usable samples)
      -> plan (epoch-seeded order of the usable samples, length-grouped, this process's slice of every
               global batch)
      -> load (read + preprocess the image, v1 template, tokens, labels)   [grain workers]
      -> mask late failures (an image whose pixels fail to decode)         [main process]
      -> batch + collate (pad to max_len or a bucket, learnable rows)      [main process]

The order is a pure function of ``(seed, epoch)`` and of the usable set, so the run is deterministic,
each global batch is the one a single process would build, and step s reads plan positions
``[s, s+1) x local batch`` on every process: the step alone is the data position (a resume on another
process count continues the same order). Each process reads only its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, lru_cache, partial
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
    check_image_size,
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
    epoch: int = 0


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

    def __call__(self, item: tuple[int, int], decode: bool = True) -> dict[str, Any] | BadSample:
        index, epoch = item
        record = self.records[index]
        sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        try:
            out = self.load(record, decode)
        except (DataError, PreprocessError) as e:
            reason = getattr(e, "reason", None) or _reason_of(e)
            return BadSample(index, sample_id, reason, f"sample {sample_id!r} (#{index}): {e}", epoch)
        except Exception as e:  # noqa: BLE001 - never crash mid-epoch on one sample
            return BadSample(index, sample_id, "error", f"sample {sample_id!r} (#{index}): {type(e).__name__}: {e}", epoch)
        out["epoch"] = epoch
        out["index"] = index
        return out

    def check(self, index: int) -> BadSample | None:
        """Whether record ``index`` is usable, without decoding pixels (the image's header gives its size):
        the scan that every process agrees on. ``None`` when usable."""
        out = self((index, 0), decode=False)
        return out if isinstance(out, BadSample) else None

    def load(self, record: Any, decode: bool = True) -> dict[str, Any]:
        """Prepare one record (raises :class:`DataError` / ``PreprocessError``); ``decode=False`` checks it
        (structure, tags, image file and header, tokens, box) without reading pixels."""
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
        pixels: np.ndarray | None = None
        if isinstance(image, Image.Image):  # in-memory samples (demo, tests)
            if decode:
                pixels, ori = preprocess_image(image, s, *image_normalization(cfg.vision))
            else:
                ori = (int(image.size[0]), int(image.size[1]))
                check_image_size(*ori)
        elif has_image:
            if self.image_root is None and not Path(str(image)).is_absolute():
                raise _err("missing_image", f"image {image!r} is relative but no image folder was given")
            path = (self.image_root / str(image)) if self.image_root is not None else Path(str(image))
            try:
                if decode:
                    pixels, ori = preprocess_image(load_image(path), s, *image_normalization(cfg.vision))
                else:
                    ori = _header_size(path)
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


def _header_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`~flexattn_jax.preprocess.load_image` orients it, read from
    its header only (no pixel decode); raises ``PreprocessError`` as ``load_image`` would for a missing or
    unidentifiable file or one beyond the size limits."""
    if not path.is_file():
        raise PreprocessError(f"image file not found: {path}" if not path.exists() else f"image path is not a file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                try:
                    turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
                except Exception:  # noqa: BLE001 - a broken EXIF block: load_image keeps the image as stored
                    turned = False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PreprocessError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
    size = (int(height), int(width)) if turned else (int(width), int(height))
    check_image_size(*size, where=f"image file {path}")
    return size


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


REASONS: tuple[str, ...] = ("malformed", "image_tag", "missing_image", "bad_image", "too_long", "bad_box", "error")
"""Why a sample is unusable; the scan's verdict code of a record is 0 (usable) or 1 + the index of its reason here."""


def verdict_code(reason: str) -> int:
    """A bad sample's reason as its scan verdict code (unknown reasons: ``error``)."""
    return 1 + (REASONS.index(reason) if reason in REASONS else REASONS.index("error"))


class SkipCounter:
    """Counts bad samples by reason: the scan's (each record once, the same on every process) and the late ones
    (pixels that failed to decode in this process, masked out of their batch); warns about the first
    ``max_logged_errors`` that this process met and raises under ``on_error='raise'``."""

    def __init__(self, dcfg: DataConfig):
        self.dcfg = dcfg
        self.counts: Counter[str] = Counter()  # the scan's, all records
        self.late: Counter[str] = Counter()  # this process's loads
        self.seen = 0
        self.logged = 0
        self.first: str | None = None  # the first bad sample's message, for "every sample was bad"

    def note(self, element: BadSample) -> None:
        """Remember and (up to the limit) warn about a bad sample this process found."""
        self.first = self.first or f"{element.message} [{element.reason}]"
        if self.logged < self.dcfg.max_logged_errors:
            self.logged += 1
            warnings.warn(f"skipping {element.message} [{element.reason}]", stacklevel=3)

    def __call__(self, element: dict[str, Any] | BadSample) -> dict[str, Any] | BadSample:
        self.seen += 1
        if isinstance(element, BadSample):
            if self.dcfg.on_error == "raise":
                raise DataError(f"{element.message} [{element.reason}] (on_error='raise'; use 'skip' to count and skip)")
            self.late[element.reason] += 1
            self.note(element)
        return element

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.counts + self.late), "late": dict(self.late)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue a saved run's counts of what this process loaded (the scan's counts are the scan's)."""
        self.seen = int(state.get("seen", 0))
        self.late = Counter({k: int(v) for k, v in state.get("late", {}).items()})


def scan_records(loader: SampleLoader, process_index: int, process_count: int, threads: int = 1) -> tuple[np.ndarray, list[BadSample]]:
    """``(verdict code per record, the bad samples this process checked)``: the same codes on every process.

    Under ``jax.distributed`` with ``process_count`` processes, process p checks records p, p + P, ... and the
    verdicts are all-gathered (one small collective); otherwise (one process, or a simulated slice) this
    process checks every record. A check reads tokens and the image header, never pixels.
    """
    import jax

    n = len(loader.records)
    split = process_count > 1 and jax.process_count() == process_count
    mine = range(process_index, n, process_count) if split else range(n)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        verdicts = list(pool.map(loader.check, mine))
    bad = [v for v in verdicts if v is not None]
    if not split:
        codes = np.zeros(n, np.int8)
        for v in bad:
            codes[v.index] = verdict_code(v.reason)
        return codes, bad
    from jax.experimental import multihost_utils

    local = np.zeros(-(-n // process_count), np.int8)
    for k, v in enumerate(verdicts):
        local[k] = 0 if v is None else verdict_code(v.reason)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # (P, ceil(n / P)): row p holds records p, p + P, ...
    return gathered.T.reshape(-1)[:n].astype(np.int8), bad


def _masked(element: dict[str, Any] | BadSample, cfg: ModelConfig) -> dict[str, Any]:
    """A late bad sample as an all-padding example that adds nothing to the loss: the batch keeps its shape and
    its place in the global order, so every process still agrees on the step."""
    if not isinstance(element, BadSample):
        return element
    s, g = cfg.image_size, cfg.lr_grid
    return {
        "input_ids": np.asarray([cfg.pad_token_id], np.int32), "labels": np.asarray([IGNORE_INDEX], np.int32),
        "pixel_values": np.zeros((s, s, cfg.vision.num_channels), np.float32), "ori_size": np.ones(2, np.int32),
        "has_image": False, "grounding": np.zeros(g * g, np.float32), "epoch": element.epoch, "index": element.index,
    }


class BatchPlan(Sequence):
    """This process's stream of ``(record index, epoch)``: the epoch's order, sliced per global batch.

    The global order of epoch e is grain's index shuffle of the ``usable`` records (default all) seeded
    from ``(seed, e)``, length-grouped in mega-batches of ``group_size`` global batches (sorted by
    estimated length, batch order shuffled). Process p takes, from each microbatch of each global batch,
    its contiguous ``micro_local`` slice; the processes' slices together are the one-process order.
    """

    def __init__(
        self, lengths: np.ndarray, global_batch: int, grad_accum: int, process_index: int, process_count: int,
        num_epochs: int, seed: int, shuffle: bool = True, group_by_length: bool = True, group_size: int = 16,
        usable: np.ndarray | None = None,
    ):
        if global_batch % (grad_accum * process_count):
            n = grad_accum * process_count
            raise DataError(f"batch_size={global_batch} is not a multiple of grad_accum x processes = {n}")
        self.records = np.arange(len(lengths)) if usable is None else np.asarray(usable, np.int64)
        self.lengths = np.asarray(lengths, np.int64)[self.records]
        self.n = len(self.lengths)
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.micro_global = global_batch // grad_accum
        self.micro_local = self.micro_global // process_count
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.batches_per_epoch = self.n // global_batch
        if self.batches_per_epoch < 1:
            raise DataError(f"{self.n} usable samples make no global batch of {global_batch}")
        self.num_epochs = num_epochs
        self.seed, self.shuffle, self.group_by_length, self.group_size = seed, shuffle, group_by_length, group_size

    def __len__(self) -> int:
        return self.num_epochs * self.batches_per_epoch * self.local_batch

    @lru_cache(maxsize=2)  # noqa: B019 - one plan object per run
    def order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch`` (record indices, length ``batches_per_epoch * global_batch``)."""
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
        return self.records[perm]

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
        self.num_steps, self.epochs = num_steps, epochs
        self.loader = SampleLoader(self.records, cfg, dcfg, tokenizer)
        self.counter = SkipCounter(dcfg)
        self.collator = Collator(cfg, dcfg)

    @cached_property
    def verdicts(self) -> np.ndarray:
        """Each record's scan verdict (0 usable, else :func:`verdict_code`), the same on every process
        (:func:`scan_records`; a collective on several processes: all of them reach it together, at the plan).
        Raises :class:`DataError` for the first bad record under ``on_error='raise'``."""
        codes, bad = scan_records(self.loader, self.process_index, self.process_count, self.dcfg.threads)
        if self.dcfg.on_error == "raise" and codes.any():
            i = int(np.flatnonzero(codes)[0])
            mine = next((v for v in bad if v.index == i), None)
            found = f"sample #{i} [{REASONS[codes[i] - 1]}] (found by process {i % self.process_count})"
            what = f"{mine.message} [{mine.reason}]" if mine else found
            raise DataError(f"{what} (on_error='raise'; use 'skip' to count and skip)")
        for v in sorted(bad, key=lambda v: v.index):
            self.counter.note(v)
        reasons, counts = np.unique(codes[codes > 0], return_counts=True)
        self.counter.counts = Counter({REASONS[c - 1]: int(k) for c, k in zip(reasons, counts, strict=True)})
        return codes

    @cached_property
    def plan(self) -> BatchPlan:
        """This process's slice of the global order of the usable records, sized to the run (``num_steps`` or
        ``epochs``); raises :class:`DataError` when the usable records make no global batch."""
        usable = np.flatnonzero(self.verdicts == 0)
        per_epoch = len(usable) // self.batch_size
        if per_epoch < 1:
            why = ", ".join(f"{k} {v}" for k, v in self.counter.counts.items()) or "none bad"
            first = f"; first: {self.counter.first}" if self.counter.first else ""
            raise DataError(f"{self.dcfg.data or 'the data'} gave no batch of {self.batch_size} good samples "
                            f"({len(self.records)} read, {len(usable)} usable; bad: {why}){first}")
        epochs = math.ceil(self.num_steps / per_epoch) if self.num_steps else math.ceil(self.epochs)
        return BatchPlan(
            self.lengths, self.batch_size, self.grad_accum, self.process_index, self.process_count, epochs, self.dcfg.seed,
            self.dcfg.shuffle, self.dcfg.group_by_length, self.dcfg.group_size, usable=usable,
        )

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def num_usable(self) -> int:
        """Records that passed the scan (the epoch's size before dropping the last partial batch)."""
        return int((self.verdicts == 0).sum())

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.process_count

    def dataset(self, start_step: int = 0) -> grain.IterDataset:
        """The grain pipeline (see the module docstring), from optimizer step ``start_step`` on."""
        plan = self.plan
        ds = grain.MapDataset.source(plan)[start_step * self.local_batch:].map(self.loader)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.dcfg.threads, prefetch_buffer_size=max(1, self.dcfg.prefetch)))
        if self.dcfg.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; defaults are fine
                flags.FLAGS.mark_as_parsed()
            opts = grain.MultiprocessingOptions(num_workers=self.dcfg.workers, per_worker_buffer_size=max(1, self.dcfg.prefetch))
            it = it.mp_prefetch(opts)
        it = it.map(self.counter).map(partial(_masked, cfg=self.cfg))
        return it.batch(self.local_batch, drop_remainder=True, batch_fn=self.collator)

    def iterator(self, start_step: int = 0) -> grain.DatasetIterator:
        """A fresh iterator over host batches from optimizer step ``start_step`` on (the position is the step)."""
        return iter(self.dataset(start_step))

    def stats(self) -> dict[str, Any]:
        """Samples loaded by this process, and skipped by reason (the scan's, all records, plus late failures here)."""
        return self.counter.state()
