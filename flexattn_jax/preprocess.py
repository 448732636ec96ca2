"""Host-side preprocessing (numpy / PIL, no jax): images, the LLaVA v1 prompt, tokens, batches.

Images follow LLaVA-1.5 with ``image_aspect_ratio='pad'``: RGB, pad to a square with the CLIP mean
colour (:func:`expand_to_square`, LLaVA's ``expand2square``), then what ``CLIPImageProcessor`` does
(bicubic resize, centre crop, rescale by 1/255, normalise). Pixels come out HWC float32.

Text follows LLaVA's ``conv_llava_v1`` / ``conv_vicuna_v1`` templates (separator style TWO, sep
``" "``, sep2 ``"</s>"``)::

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:

``<image>`` is expanded on the host into ``num_image_tokens`` copies of the image token id
(:func:`tokenize_with_image`); the training labels (:func:`tokenize_conversation`) keep only the
assistant answers plus their ``</s>``, as LLaVA's ``preprocess_v1`` does.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flexattn_jax.config import IGNORE_INDEX, VisionConfig

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB: tuple[int, int, int] = tuple(int(x * 255) for x in CLIP_MEAN)  # (122, 116, 104), LLaVA's pad colour
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SiglipImageProcessor's image_mean and image_std
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def image_normalization(vision: VisionConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the tower's image processor: CLIP's or SigLIP's (0.5, the pad colour (127, 127, 127))."""
    return (CLIP_MEAN, CLIP_STD) if vision.class_token else (SIGLIP_MEAN, SIGLIP_STD)

IMAGE_PLACEHOLDER = "<image>"
# conv_llava_v1: LLaVA's inference / evaluation template (and the FlexAttention eval scripts).
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# conv_vicuna_v1: what LLaVA's trainer uses with ``--version v1`` (same format, other wording).
SYSTEM_PROMPT_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"

BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)


class PreprocessError(ValueError):
    """An input (image file, prompt, conversation, batch) cannot be preprocessed; the message says why."""


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (an unpaired surrogate, e.g. the JSON escape ``\\ud800``), or None.

    Such text makes the tokenizer raise (a ``TypeError``); readers call this where requests and lines are
    read, so the item is refused with the field named instead of failing a batch.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid UTF-8 text (an unpaired surrogate U+{ord(text[e.start]):04X} at character {e.start})"
    return None


# Images beyond these are refused per item, before their pixels are decoded (None: no limit). The pixel
# limit is PIL's own decompression-bomb threshold; PIL still refuses above twice ``Image.MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS: int | None = 89_478_485
MAX_ASPECT_RATIO: float | None = 100.0


def check_image_size(
    width: int, height: int, where: str = "image", max_pixels: int | None = None, max_aspect: float | None = None
) -> None:
    """Refuse an empty image, more than ``max_pixels`` pixels or a long/short side ratio above ``max_aspect``.

    The limits default to the module's :data:`MAX_IMAGE_PIXELS` and :data:`MAX_ASPECT_RATIO` (read at call
    time, so a program may change them); the message names ``where`` and the limit.
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_aspect = MAX_ASPECT_RATIO if max_aspect is None else max_aspect
    if width <= 0 or height <= 0:
        raise PreprocessError(f"{where}: empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise PreprocessError(f"{where}: {width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,}")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise PreprocessError(
            f"{where}: {width}x{height} has an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
            f"more than the limit of {max_aspect:g}:1"
        )


# ---- images ------------------------------------------------------------------------------------

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(img: Image.Image, alpha: Literal["drop", "white"] = "drop") -> Image.Image:
    """Convert any PIL mode to RGB.

    ``alpha='drop'`` discards transparency (what LLaVA's ``Image.open(...).convert('RGB')`` does);
    ``'white'`` composites onto white. 16-bit modes (``I;16*``, and ``I`` with values > 255) are
    scaled by 1/257 to 8 bits; ``F`` images in [0, 1] are scaled by 255 (PIL would clip instead).
    """
    if alpha not in ("drop", "white"):
        raise PreprocessError(f"alpha={alpha!r}: use 'drop' or 'white'")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode == "La":  # premultiplied: PIL converts it to LA only
        img, mode = img.convert("LA"), "LA"
    has_alpha = mode in ("RGBA", "RGBa", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    try:
        if has_alpha and alpha == "white":
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise PreprocessError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from e


def load_image(
    path: str | Path | bytes,
    alpha: Literal["drop", "white"] = "drop",
    max_pixels: int | None = None,
    max_aspect: float | None = None,
) -> Image.Image:
    """Open an image file (or an encoded image in memory: ``bytes``) as RGB, EXIF orientation applied
    (see :func:`to_rgb` for modes and alpha).

    A missing, unreadable or corrupt file raises :class:`PreprocessError` naming the path ("image
    data" for bytes); so does one beyond the size limits of :func:`check_image_size`, checked from
    the header before decoding.
    """
    if isinstance(path, bytes):
        source, name = io.BytesIO(path), "image data"
    else:
        path = Path(path)
        if not path.exists():
            raise PreprocessError(f"image file not found: {path}")
        if not path.is_file():
            raise PreprocessError(f"image path is not a file: {path}")
        source, name = path, f"image file {path}"
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():  # our own limit below replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_ctx = Image.open(source)
        with im_ctx as im:
            check_image_size(*im.size, where=name, max_pixels=max_pixels, max_aspect=max_aspect)
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
            except (SyntaxError, ValueError, TypeError, KeyError, OSError):  # a broken EXIF block: keep as stored
                oriented = im.copy()
            if oriented is None:  # older Pillow with in_place semantics
                oriented = im.copy()
            if oriented is im:
                oriented = im.copy()
    except UnidentifiedImageError as e:
        reason = "not an image format this build can read" if isinstance(path, bytes) else _decoder_reason(path)
        raise PreprocessError(f"cannot read {name}: {reason or f'{type(e).__name__}: {e}'}") from e
    except Image.DecompressionBombError as e:
        raise PreprocessError(f"{name}: {e}") from e
    except PreprocessError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise PreprocessError(f"cannot read {name}: {type(e).__name__}: {e}") from e
    try:
        return to_rgb(oriented, alpha=alpha)
    except PreprocessError as e:
        raise PreprocessError(f"{name if isinstance(path, bytes) else path}: {e}") from e


_WARNINGS_LOCK = threading.Lock()  # warnings' filters are process-wide and image readers run in threads


def _decoder_reason(path: Path) -> str | None:
    """Why PIL's plugin for the file's extension could not open it (e.g. TIFF: unknown pixel mode).

    PIL only reports "cannot identify image file"; run that one plugin on the file to get its own
    message. No process-wide state is touched, so reader threads may call this concurrently.
    """
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.OPEN:
        return None
    factory, accept = Image.OPEN[fmt]
    try:
        with open(path, "rb") as fp:
            accepted = accept is None or accept(fp.read(16))
            if not accepted or isinstance(accepted, str):  # a str is PIL's "looks like it, but ..." hint
                return None  # not this format's signature: the generic message is the right one
            fp.seek(0)
            factory(fp, str(path)).close()
    except (SyntaxError, IndexError, TypeError, struct.error) as e:  # what PIL's open swallows per plugin
        return f"unsupported {fmt} image ({e})"
    except (OSError, ValueError):
        return None
    return None


def expand_to_square(img: Image.Image, background: Sequence[int] | int = CLIP_MEAN_RGB) -> Image.Image:
    """Pad to a square, centred, exactly like LLaVA's ``expand2square`` (offset ``(long - short) // 2``).

    Allocates ``long x long`` pixels: to pad and resize use :func:`pad_and_resize`, which is bounded.
    """
    width, height = img.size
    if width == height:
        return img
    fill = tuple(background) if not isinstance(background, int) else background
    side = max(width, height)
    result = Image.new(img.mode, (side, side), fill)
    result.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


_CHUNK_PIXELS = 1 << 20  # padded pixels per horizontal-pass chunk of a tall image


def pad_and_resize(img: Image.Image, size: int, background: Sequence[int] | int = CLIP_MEAN_RGB) -> Image.Image:
    """``expand_to_square(img).resize((size, size), BICUBIC)``, bit for bit, without the ``long x long`` square.

    PIL resizes in two passes, horizontal then vertical, rounding to 8 bits in between, and each
    pass is independent per row (per column). So the horizontal pass of the padded square is built
    here row by row: a wide image's content rows need no horizontal padding (resized as they are) and
    its padding rows are all the resized fill row; a tall image's rows are padded and resized in
    chunks of about 1 M pixels. Stacked, they are PIL's intermediate ``size x long`` image, which is
    then resized vertically only (``need_horizontal`` is false: same coefficients, same result).
    Memory: the input, ``size x long`` and one chunk, instead of ``long x long``.
    """
    width, height = img.size
    side = max(width, height)
    if width == height or side <= size:  # the square is no larger than the output: LLaVA's own path
        square = expand_to_square(img, background)
        return square if square.size == (size, size) else square.resize((size, size), resample=Image.Resampling.BICUBIC)
    fill = tuple(background) if not isinstance(background, int) else background
    bicubic = Image.Resampling.BICUBIC
    if width > height:
        top = (width - height) // 2
        fill_row = np.asarray(Image.new(img.mode, (side, 1), fill).resize((size, 1), resample=bicubic))
        rows = np.asarray(img.resize((size, height), resample=bicubic))  # horizontal pass only
        inter = np.empty((side, *rows.shape[1:]), rows.dtype)
        inter[:top] = fill_row
        inter[top : top + height] = rows
        inter[top + height :] = fill_row
    else:
        left = (height - width) // 2
        step = max(1, _CHUNK_PIXELS // side)
        parts = []
        for r in range(0, height, step):
            k = min(step, height - r)
            chunk = Image.new(img.mode, (side, k), fill)
            chunk.paste(img.crop((0, r, width, r + k)), (left, 0))
            parts.append(np.asarray(chunk.resize((size, k), resample=bicubic)))  # horizontal pass only
        inter = np.concatenate(parts, axis=0)
    return Image.fromarray(inter, img.mode).resize((size, size), resample=bicubic)  # vertical pass only


def preprocess_image(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA 'pad' preprocessing: ``(pixels float32 (size, size, 3), ori_size (width, height))``.

    Pad to square with ``int(mean * 255)``, resize with PIL bicubic to ``size`` (CLIPImageProcessor's
    shortest-edge resize + centre crop, which on a square image is a plain resize; done by
    :func:`pad_and_resize` in bounded memory), rescale by 1/255 and normalise. Images beyond
    :func:`check_image_size`'s limits are refused. ``ori_size`` is the size before padding (used by the selection's margin).
    """
    if size <= 0:
        raise PreprocessError(f"size={size} must be positive")
    ori_size = (int(img.size[0]), int(img.size[1]))
    check_image_size(*ori_size)
    img = to_rgb(img)
    square = pad_and_resize(img, size, tuple(int(x * 255) for x in mean))
    arr = np.asarray(square, dtype=np.float32) * np.float32(1.0 / 255.0)
    pixels = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return pixels.astype(np.float32), ori_size


# ---- prompt template -----------------------------------------------------------------------------

def _image_first(value: str) -> str:
    """LLaVA's ``preprocess_multimodal``: move ``<image>`` to the front, followed by a newline."""
    if IMAGE_PLACEHOLDER not in value:
        return value
    rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
    return (IMAGE_PLACEHOLDER + "\n" + rest).strip()


def format_prompt(question: str, has_image: bool = True, system: str = SYSTEM_PROMPT) -> str:
    """One-turn generation prompt: ``"{system} USER: <image>\\n{question} ASSISTANT:"``.

    With ``has_image`` the ``<image>`` tag is put first (an existing tag in ``question`` is moved);
    without it, a tag in the question is an error.
    """
    if has_image:
        question = _image_first(IMAGE_PLACEHOLDER + question.replace(IMAGE_PLACEHOLDER, ""))
    elif IMAGE_PLACEHOLDER in question:
        raise PreprocessError(f"format_prompt(has_image=False) but the question contains {IMAGE_PLACEHOLDER!r}")
    return f"{system}{SEP}{ROLES[0]}: {question}{SEP}{ROLES[1]}:"


_ROLE_OF = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


def format_conversation(
    turns: Sequence[dict[str, Any]],
    system: str = SYSTEM_PROMPT,
    image_first: bool = True,
) -> tuple[str, list[tuple[int, int]]]:
    """Render LLaVA-format turns with the v1 template; return ``(text, answer_spans)``.

    ``turns`` is ``[{'from': 'human', 'value': ...}, {'from': 'gpt', 'value': ...}, ...]``; a leading
    'gpt' turn is skipped (as LLaVA does) and the roles must then alternate. Each span ``(start, end)``
    is a half-open character range with ``text[start:end] == answer + "</s>"``: what training learns.
    A final 'gpt' turn whose value is ``None`` or ``""`` leaves the text ending in ``"ASSISTANT:"``
    (a generation prompt). ``image_first`` moves ``<image>`` to the front of its turn like LLaVA's
    ``preprocess_multimodal``.
    """
    turns = list(turns)
    if turns and _ROLE_OF.get(str(turns[0].get("from", "")).lower()) == 1:
        turns = turns[1:]
    if not turns:
        raise PreprocessError("the conversation has no human turn")
    text = system + SEP
    spans: list[tuple[int, int]] = []
    for j, turn in enumerate(turns):
        speaker = str(turn.get("from", "")).lower()
        role = _ROLE_OF.get(speaker)
        if role is None:
            raise PreprocessError(f"turn {j}: unknown speaker {turn.get('from')!r} (use 'human' or 'gpt')")
        if role != j % 2:
            raise PreprocessError(f"turn {j}: expected a {'human' if j % 2 == 0 else 'gpt'} turn, got {turn.get('from')!r}")
        value = turn.get("value")
        if not value:
            if role == 1 and j == len(turns) - 1:
                text += ROLES[1] + ":"
                break
            raise PreprocessError(f"turn {j} ({speaker}) has an empty value")
        value = str(value)
        if image_first:
            value = _image_first(value)
        text += ROLES[role] + ": "
        start = len(text)
        text += value + (SEP if role == 0 else SEP2)
        if role == 1:
            spans.append((start, len(text)))
    return text, spans


# ---- tokens --------------------------------------------------------------------------------------

def _encode_chunks(
    text: str, tokenizer: Any, image_token_id: int, num_image_tokens: int, with_offsets: bool
) -> tuple[list[int], list[tuple[int, int]], int]:
    """LLaVA's ``tokenizer_image_token`` with placeholder expansion; offsets are into ``text``.

    Image tokens get the empty offset ``(-1, -1)``. Returns ``(ids, offsets, num_placeholders)``.
    """
    chunks = text.split(IMAGE_PLACEHOLDER)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    strip = 0
    pos = 0
    for c, chunk in enumerate(chunks):
        if with_offsets:
            enc = tokenizer(chunk, return_offsets_mapping=True)
            chunk_ids, chunk_off = list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]
        else:
            chunk_ids = list(tokenizer(chunk)["input_ids"])
            chunk_off = [(0, 0)] * len(chunk_ids)
        if c == 0 and chunk_ids and bos is not None and chunk_ids[0] == bos:
            strip = 1  # the tokenizer adds BOS: keep it once, at the start (as LLaVA does)
            ids.append(chunk_ids[0])
            offsets.append((0, 0))
        if c > 0:
            ids.extend([image_token_id] * num_image_tokens)
            offsets.extend([(-1, -1)] * num_image_tokens)
        ids.extend(chunk_ids[strip:])
        offsets.extend((s + pos, e + pos) if e > s else (-1, -1) for s, e in chunk_off[strip:])
        pos += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets, len(chunks) - 1


def tokenize_with_image(
    text: str,
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    num_images: int | None = None,
) -> np.ndarray:
    """Tokenize ``text``, expanding each ``<image>`` into ``num_image_tokens`` copies of ``image_token_id``.

    The text is split on ``<image>`` and each chunk tokenized on its own; the tokenizer's BOS is kept
    once at the start (LLaVA's ``tokenizer_image_token``). ``num_images``, when given, must equal the
    number of ``<image>`` tags. Returns int32 ids.
    """
    if not text:
        raise PreprocessError("cannot tokenize an empty text")
    if num_image_tokens < 0:
        raise PreprocessError(f"num_image_tokens={num_image_tokens} must be >= 0")
    n_tags = text.count(IMAGE_PLACEHOLDER)
    if num_images is not None and n_tags != num_images:
        raise PreprocessError(f"the text has {n_tags} {IMAGE_PLACEHOLDER} tag(s) but {num_images} image(s) were given")
    ids, _, _ = _encode_chunks(text, tokenizer, image_token_id, num_image_tokens, with_offsets=False)
    return np.asarray(ids, np.int32)


def tokenize_conversation(
    turns: Sequence[dict[str, Any]],
    tokenizer: Any,
    image_token_id: int,
    num_image_tokens: int,
    max_len: int,
    *,
    num_images: int | None = None,
    system: str = SYSTEM_PROMPT,
    truncation: Literal["raise", "truncate"] = "raise",
    return_truncated: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, bool]:
    """Training ids and labels for a LLaVA-format conversation (v1 template, LLaVA's ``preprocess_v1``).

    ``labels`` equal the ids on assistant answer tokens and their ``</s>`` (a token counts when it
    starts inside ``answer</s>`` or on the single space before it, as LLaVA's Llama arithmetic makes
    it) and ``IGNORE_INDEX`` on BOS, system, user, role and image tokens. Needs a fast tokenizer
    (offset mapping). ``max_len`` bounds the expanded sequence: beyond it ``truncation='raise'`` raises
    :class:`PreprocessError`, ``'truncate'`` cuts the tail (with a warning; never inside an image's
    tokens). ``return_truncated`` appends a bool saying whether the sample was cut.
    """
    text, spans = format_conversation(turns, system=system)
    n_tags = text.count(IMAGE_PLACEHOLDER)
    if num_images is not None and n_tags != num_images:
        raise PreprocessError(f"the conversation has {n_tags} {IMAGE_PLACEHOLDER} tag(s) but {num_images} image(s) were given")
    if not getattr(tokenizer, "is_fast", False):
        raise PreprocessError("tokenize_conversation needs a fast tokenizer (offset mapping) to place the labels")
    ids, offsets, _ = _encode_chunks(text, tokenizer, image_token_id, num_image_tokens, with_offsets=True)
    labels = np.full(len(ids), IGNORE_INDEX, np.int32)
    for start, end in spans:
        lo = start - 1 if start > 0 and text[start - 1].isspace() else start
        for t, (s, e) in enumerate(offsets):
            if e > s and lo <= s < end:
                labels[t] = ids[t]
    input_ids = np.asarray(ids, np.int32)
    truncated = False
    if len(input_ids) > max_len:
        if truncation == "raise":
            raise PreprocessError(f"the conversation is {len(input_ids)} tokens (images expanded), more than max_len={max_len}")
        if truncation != "truncate":
            raise PreprocessError(f"truncation={truncation!r}: use 'raise' or 'truncate'")
        image_pos = np.flatnonzero(input_ids == image_token_id)
        if image_pos.size and image_pos[0] < max_len <= image_pos[-1]:
            raise PreprocessError(
                f"max_len={max_len} would cut through the image tokens (positions {image_pos[0]}..{image_pos[-1]}); "
                f"the conversation is {len(input_ids)} tokens"
            )
        warnings.warn(f"conversation truncated from {len(input_ids)} to max_len={max_len} tokens", stacklevel=2)
        input_ids, labels, truncated = input_ids[:max_len], labels[:max_len], True
    if return_truncated:
        return input_ids, labels, truncated
    return input_ids, labels


# ---- bucketing and batching --------------------------------------------------------------------

def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n; a sequence longer than the largest bucket is an error naming n."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise PreprocessError(f"sequence length {n} exceeds the largest bucket {max(buckets)} (buckets {tuple(buckets)})")


def longest_prompt(context: int, max_new_tokens: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The longest prompt, in tokens (image tokens included), that generation accepts: it fits the largest
    bucket and leaves ``max_new_tokens`` of the model's ``context`` (``max_position_embeddings``) for the answer."""
    return min(max(buckets), context - max_new_tokens)


def pad_batch(
    seqs: Sequence[np.ndarray | Sequence[int]],
    length: int | None = None,
    pad_id: int = 0,
    side: Literal["left", "right"] = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """Pad id sequences to ``length`` (default: the longest): ``(ids (B, L) int32, attention_mask (B, L) bool)``.

    Also pads labels (``pad_id=IGNORE_INDEX``; ignore the mask). A sequence longer than ``length`` is
    an error naming its index.
    """
    if side not in ("left", "right"):
        raise PreprocessError(f"side={side!r}: use 'left' or 'right'")
    arrays = [np.asarray(s, np.int32).reshape(-1) for s in seqs]
    if length is None:
        length = max((len(a) for a in arrays), default=0)
    out = np.full((len(arrays), length), pad_id, np.int32)
    mask = np.zeros((len(arrays), length), bool)
    for i, a in enumerate(arrays):
        n = len(a)
        if n > length:
            raise PreprocessError(f"sequence {i} has {n} tokens, more than the padded length {length}")
        if n == 0:
            continue
        if side == "left":
            out[i, length - n :], mask[i, length - n :] = a, True
        else:
            out[i, :n], mask[i, :n] = a, True
    return out, mask
