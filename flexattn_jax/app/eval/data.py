"""Readers for the evaluation sets, each as its authors ship it.

- V* Bench (``craigwu/vstar_bench``): ``{root}/direct_attributes/`` and ``{root}/relative_position/``,
  each ``{id}.json`` with ``question`` and ``options`` (the correct option first) next to the image
  ``{id}.jpg`` (or ``.JPG .webp .png .jpeg``, the release's search order).
- MagnifierBench (Otter's release): ``{root}/data_instructions.json`` with
  ``{"data": {id: {"instruction", "answer", "image_ids", ...}}}`` and ``{root}/images.json``, a map
  of image id to base64 image; the first image of ``image_ids`` is used.
- TextVQA val: the official ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "question",
  "image_id", "answers" (10)}, ...]}``; images ``{images}/{image_id}.jpg``, by default the
  ``train_images/`` folder next to it), or LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (``question_id``,
  ``image``, ``text`` = question, the "Reference OCR token:" line and the answer instruction), whose
  answers come from the official JSON (``annotations``), matched like LLaVA's scorer by image id and
  lower-cased question.
- Generic ``vqa``: JSONL of ``{"image", "question", "answers"}`` (a list or one string), optional
  ``question_id``/``id`` and ``category``; relative image paths are taken from ``images`` (default:
  the JSONL's folder).

A layout that differs (a missing file or top-level field) raises :class:`EvalDataError` naming the
file and field. A single bad sample (malformed JSON, a missing field or image) becomes a
:class:`BadSample` with its id and the reason; it is counted and named in the metrics and the
others are scored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from flexattn_jax.preprocess import PreprocessError, load_image, to_rgb

VSTAR_CATEGORIES: tuple[str, ...] = ("direct_attributes", "relative_position")
VSTAR_IMAGE_SUFFIXES: tuple[str, ...] = ("jpg", "JPG", "webp", "png", "jpeg")
OCR_PREFIX = "Reference OCR token:"


class EvalDataError(ValueError):
    """The data set's layout is not the expected one; the message names the file and the field."""


@dataclass(frozen=True)
class Sample:
    """One evaluation item: its image (a file path, or encoded bytes), the question and the truth."""

    id: str
    image: str | bytes
    question: str
    category: str = ""
    options: tuple[str, ...] = ()  # V*: the correct one first
    answer: str | None = None  # MagnifierBench: the correct letter
    answers: tuple[str, ...] = ()  # TextVQA: the 10 annotator answers; vqa: the accepted answers
    ocr: str | None = None  # TextVQA (LLaVA's file): the "Reference OCR token: ..." line

    def load_image(self) -> Image.Image:
        """The image as RGB (:class:`PreprocessError` naming the sample when it cannot be read)."""
        if isinstance(self.image, bytes):
            try:
                with Image.open(io.BytesIO(self.image)) as im:
                    im.load()
                    return to_rgb(im.copy())
            except (OSError, ValueError, SyntaxError) as e:
                raise PreprocessError(f"cannot decode the image of sample {self.id!r}: {type(e).__name__}: {e}") from e
        return load_image(self.image)


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be evaluated; ``error`` says which file and field and why."""

    id: str
    error: str
    category: str = ""


Item = Sample | BadSample


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise EvalDataError(f"{what}: file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def _str_field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise KeyError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise KeyError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


# ---- V* Bench --------------------------------------------------------------------------------------

def read_vstar(root: str | Path) -> Iterator[Item]:
    """V* Bench samples, category by category (``direct_attributes`` then ``relative_position``), ids sorted.

    An annotation that cannot be read (malformed, a directory, no permission) or an image without its
    annotation is a :class:`BadSample` naming the file: counted as failed, never skipped silently.
    """
    root = Path(root)
    present = [c for c in VSTAR_CATEGORIES if (root / c).is_dir()]
    if not present:
        raise EvalDataError(f"{root}: not a V* Bench folder (expected the subfolders {' and '.join(VSTAR_CATEGORIES)})")
    for category in present:
        folder = root / category
        annotated = {p.stem for p in folder.glob("*.json")}
        images = {p.stem: p for s in VSTAR_IMAGE_SUFFIXES for p in folder.glob("*." + s) if p.is_file()}
        for stem in sorted(annotated | set(images)):
            anno, sid = folder / f"{stem}.json", f"{category}/{stem}"
            if stem not in annotated:  # an image of the benchmark without its question: reported, not skipped
                yield BadSample(sid, f"image {images[stem]} has no annotation {anno.name} next to it", category)
                continue
            try:
                data = json.loads(anno.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield BadSample(sid, f"{anno}: malformed JSON: {e}", category)
                continue
            except OSError as e:  # a directory, an unreadable file: this sample's failure
                yield BadSample(sid, f"{anno}: cannot read the annotation ({e.strerror or e})", category)
                continue
            try:
                if not isinstance(data, dict):
                    raise KeyError(f"{anno}: expected an object with 'question' and 'options', got {type(data).__name__}")
                question = _str_field(data, "question", str(anno))
                options = data.get("options")
                if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                    raise KeyError(f"{anno}: field 'options' must be a list of at least 2 strings, got {options!r}")
            except KeyError as e:
                yield BadSample(sid, str(e.args[0]), category)
                continue
            image = next((anno.with_suffix("." + s) for s in VSTAR_IMAGE_SUFFIXES if anno.with_suffix("." + s).is_file()), None)
            if image is None:
                yield BadSample(sid, f"no image next to {anno} (tried .{', .'.join(VSTAR_IMAGE_SUFFIXES)})", category)
                continue
            yield Sample(sid, str(image), question, category, options=tuple(options), answer=options[0])


# ---- MagnifierBench --------------------------------------------------------------------------------

def read_magnifier(root: str | Path) -> Iterator[Item]:
    """MagnifierBench samples in the file's order (the images are decoded from base64 here, once)."""
    root = Path(root)
    instructions_path, images_path = root / "data_instructions.json", root / "images.json"
    data = _read_json(instructions_path, "MagnifierBench instructions")
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise EvalDataError(f"{instructions_path}: expected a top-level field 'data' mapping ids to samples")
    images = _read_json(images_path, "MagnifierBench images")
    if not isinstance(images, dict):
        raise EvalDataError(f"{images_path}: expected an object mapping image ids to base64 images, got {type(images).__name__}")
    for sid, row in data["data"].items():
        where = f"{instructions_path} data[{sid!r}]"
        try:
            if not isinstance(row, dict):
                raise KeyError(f"{where}: expected an object, got {type(row).__name__}")
            instruction = _str_field(row, "instruction", where)
            answer = _str_field(row, "answer", where)
            ids = row.get("image_ids")
            if not isinstance(ids, list) or not ids:
                raise KeyError(f"{where}: field 'image_ids' must be a non-empty list")
            found = [i for i in ids if i in images]
            if not found:
                raise KeyError(f"{where}: none of its image_ids {ids} is in {images_path}")
            try:
                raw = base64.b64decode(images[found[0]], validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise KeyError(f"{images_path}[{found[0]!r}]: not base64 ({e})") from e
        except KeyError as e:
            yield BadSample(str(sid), str(e.args[0]))
            continue
        yield Sample(str(sid), raw, instruction, answer=answer.strip())


# ---- TextVQA ------------------------------------------------------------------------------------

def _textvqa_annotations(path: Path) -> list:
    data = _read_json(path, "TextVQA annotations")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise EvalDataError(f"{path}: expected the official TextVQA layout, a top-level field 'data' with a list of questions")
    return data["data"]


def _textvqa_answers(record: dict, where: str) -> tuple[str, ...]:
    answers = record.get("answers")
    if not isinstance(answers, list) or len(answers) != 10 or not all(isinstance(a, str) for a in answers):
        raise KeyError(f"{where}: field 'answers' must be the 10 annotator answers, got {answers!r}")
    return tuple(answers)


def _jsonl_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "FILE line N", record)`` of each non-blank line, read lazily; a line that is not UTF-8
    JSON comes as a :class:`BadSample` naming the file and the line (the other lines are still read)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.strip():
                    continue
                yield n, where, json.loads(line)
            except UnicodeDecodeError as e:
                yield n, where, BadSample(f"line{n}", f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield n, where, BadSample(f"line{n}", f"{where}: malformed JSON: {e.msg} (column {e.colno})")


def read_textvqa(path: str | Path, images: str | Path | None = None, annotations: str | Path | None = None) -> Iterator[Item]:
    """TextVQA val from the official JSON, or from LLaVA's OCR JSONL plus the official JSON (``annotations``)."""
    path = Path(path)
    images_dir = Path(images) if images is not None else path.parent / "train_images"
    if path.suffix == ".jsonl":
        if annotations is None:
            raise EvalDataError(f"{path}: LLaVA's TextVQA file has no answers; pass the official TextVQA_0.5.1_val.json "
                                "as --annotations")
        table = {}
        for rec in _textvqa_annotations(Path(annotations)):
            if isinstance(rec, dict) and isinstance(rec.get("question"), str):
                table[(str(rec.get("image_id")), rec["question"].lower())] = rec
        if not path.is_file():
            raise EvalDataError(f"TextVQA questions: file not found: {path}")
        for n, where, rec in _jsonl_records(path):
            if isinstance(rec, BadSample):
                yield rec
                continue
            sid = str(rec.get("question_id", f"line{n}")) if isinstance(rec, dict) else f"line{n}"
            try:
                if not isinstance(rec, dict):
                    raise KeyError(f"{where}: expected an object, got {type(rec).__name__}")
                image, text = _str_field(rec, "image", where), _str_field(rec, "text", where)
                lines = text.split("\n")
                question = lines[0]
                ocr = next((ln for ln in lines[1:] if ln.startswith(OCR_PREFIX)), None)
                anno = table.get((Path(image).stem, question.lower()))
                if anno is None:
                    raise KeyError(f"{where}: no question {question!r} for image {Path(image).stem!r} in {annotations}")
                answers = _textvqa_answers(anno, f"{annotations} question {anno.get('question_id')}")
            except KeyError as e:
                yield BadSample(sid, str(e.args[0]))
                continue
            yield Sample(sid, str(images_dir / image), question, answers=answers, ocr=ocr)
        return
    for n, rec in enumerate(_textvqa_annotations(path)):
        where = f"{path} data[{n}]"
        sid = str(rec.get("question_id", n)) if isinstance(rec, dict) else str(n)
        try:
            if not isinstance(rec, dict):
                raise KeyError(f"{where}: expected an object, got {type(rec).__name__}")
            question = _str_field(rec, "question", where)
            image_id = _str_field(rec, "image_id", where)
            answers = _textvqa_answers(rec, where)
        except KeyError as e:
            yield BadSample(sid, str(e.args[0]))
            continue
        tokens = rec.get("ocr_tokens")
        ocr = f"{OCR_PREFIX} {', '.join(tokens)}" if isinstance(tokens, list) and tokens else None
        yield Sample(sid, str(images_dir / f"{image_id}.jpg"), question, answers=answers, ocr=ocr)


# ---- generic VQA ----------------------------------------------------------------------------------

def read_vqa(path: str | Path, images: str | Path | None = None) -> Iterator[Item]:
    """Generic JSONL ``{"image", "question", "answers"}`` (POPE, GQA and the like)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"vqa questions: file not found: {path}")
    root = Path(images) if images is not None else path.parent
    for n, where, rec in _jsonl_records(path):
        if isinstance(rec, BadSample):
            yield rec
            continue
        sid = str(rec.get("question_id", rec.get("id", f"line{n}"))) if isinstance(rec, dict) else f"line{n}"
        try:
            if not isinstance(rec, dict):
                raise KeyError(f"{where}: expected an object, got {type(rec).__name__}")
            image, question = _str_field(rec, "image", where), _str_field(rec, "question", where)
            answers = rec.get("answers", rec.get("answer"))
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise KeyError(f"{where}: field 'answers' must be a string or a non-empty list of strings, got {answers!r}")
        except KeyError as e:
            yield BadSample(sid, str(e.args[0]), str(rec.get("category", "")) if isinstance(rec, dict) else "")
            continue
        yield Sample(sid, str(root / image), question, str(rec.get("category", "")), answers=tuple(answers))


TASKS: tuple[str, ...] = ("vstar", "magnifier", "textvqa", "vqa")


def read_task(
    task: str, path: str | Path, images: str | Path | None = None, annotations: str | Path | None = None, limit: int | None = None
) -> Iterator[Item]:
    """The items of ``task`` (one of :data:`TASKS`), read lazily; ``limit`` keeps the first N."""
    if task == "vstar":
        items = read_vstar(path)
    elif task == "magnifier":
        items = read_magnifier(path)
    elif task == "textvqa":
        items = read_textvqa(path, images, annotations)
    elif task == "vqa":
        items = read_vqa(path, images)
    else:
        raise EvalDataError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item
