"""OpenAI chat completions <-> the inference pipeline: a request body to a :class:`~flexattn_jax.app.inference.Request`,
an :class:`~flexattn_jax.app.inference.Answer` to a completion body.

Conversation turns are rendered with the checkpoint's LLaVA template: one user turn is exactly what
``flexattn-jax generate --image ... --prompt ...`` answers (the question wrapped by
:func:`~flexattn_jax.preprocess.format_prompt`); a longer conversation (or a system message) goes
through :func:`~flexattn_jax.preprocess.format_conversation`. Every problem with a body is a
:class:`ChatError` carrying the HTTP status, the offending parameter and a message naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexattn_jax.app.inference import Answer, Request, answer_text
from flexattn_jax.paths import is_within
from flexattn_jax.preprocess import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, PreprocessError, format_conversation, text_problem

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_JSON_DEPTH = 16  # a chat body nests 6 deep (body, messages, message, content, part, image_url)
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's range of integer fields (the seed); a larger one would overflow the PRNG key


class ChatError(ValueError):
    """A request the server refuses: ``status`` (4xx), OpenAI ``type`` and ``code``, the ``param`` at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A validated chat completion request: the pipeline's request and the per-request options."""

    request: Request
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    @property
    def sampling(self) -> tuple[float, float, int | None]:
        """What a batch must share (static arguments of the jitted generation, and its seed); greedy ignores the rest."""
        return (0.0, 1.0, None) if self.temperature == 0 else (self.temperature, self.top_p, self.seed)


@dataclass(frozen=True)
class Limits:
    """The server's limits on a request (its flags)."""

    model: str
    max_new_tokens: int
    image_root: Path | None = None
    max_image_bytes: int = 20 << 20
    max_messages: int = 64
    max_text_chars: int = 1 << 16  # all text parts together: refused before tokenizing (the prompt limit is in tokens)


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise ChatError(f"'{key}' must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", param=key)
    return float(v)


def _integer(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ChatError(f"'{key}' must be an integer, got {v!r}", param=key)
    if not INT64[0] <= v <= INT64[1]:
        raise ChatError(f"'{key}' must be a 64-bit integer (from -2**63 to 2**63 - 1), got {v}", param=key)
    return v


def _text(v: str, where: str) -> str:
    """``v`` unless it cannot be encoded as UTF-8 (an unpaired surrogate escape), refused naming ``where``."""
    if (bad := text_problem(v)) is not None:
        raise ChatError(f"{where} is {bad}", param=where)
    return v


def json_depth(obj: Any) -> int:
    """How deeply ``obj`` (parsed JSON) nests lists and objects (a scalar: 0), without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            depth = max(depth, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


def image_bytes_of(url: Any, limits: Limits, param: str) -> bytes | str:
    """An ``image_url``'s image: the decoded payload of a ``data:`` URL, or a file path confined to ``--image-root``.

    A path (plain or ``file://``) is resolved with its symbolic links followed and must lie inside
    the root (``..`` and links out of it are refused), and the file must exist and be at most
    ``max_image_bytes`` (so must the decoded data). Remote URLs are not fetched.
    """
    if not isinstance(url, str) or not url:
        raise ChatError("'image_url.url' must be a non-empty string (a data: URL or a path under --image-root)", param=param)
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ChatError("an image data: URL must be base64-encoded ('data:image/png;base64,...')", param=param)
        if len(payload) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
            raise ChatError(f"the image data is more than the limit of {limits.max_image_bytes:,} bytes (--max-image-bytes)",
                            param=param, status=413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ChatError(f"the image data: URL is not valid base64 ({e})", param=param) from e
        if len(data) > limits.max_image_bytes:
            raise ChatError(f"the image data is {len(data):,} bytes, more than the limit of {limits.max_image_bytes:,} "
                            "(--max-image-bytes)", param=param, status=413)
        return data
    if url.startswith(("http://", "https://")):
        raise ChatError("remote image URLs are not fetched; send the image as a data: URL or a path under --image-root",
                        param=param)
    if limits.image_root is None:
        raise ChatError("image paths are refused: the server was started without --image-root; send the image as a data: URL",
                        param=param, status=403, type="permission_error")
    spec = url.removeprefix("file://")
    try:
        path = Path(spec) if Path(spec).is_absolute() else limits.image_root / spec
        inside = is_within(path, limits.image_root)
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise ChatError(f"image path {spec!r}: {e}", param=param) from e
    if not inside:
        raise ChatError(f"image path {spec!r} is outside --image-root (after resolving '..' and symbolic links)",
                        param=param, status=403, type="permission_error")
    if not real.is_file():
        raise ChatError(f"image file not found under --image-root: {spec}", param=param)
    size = real.stat().st_size
    if size > limits.max_image_bytes:
        raise ChatError(f"image file {spec} is {size:,} bytes, more than the limit of {limits.max_image_bytes:,} (--max-image-bytes)",
                        param=param, status=413)
    return str(real)


def _content(msg: dict, j: int, limits: Limits, images: list[tuple[int, bytes | str]]) -> str:
    """A message's text (its text parts joined by newlines); its image parts are appended to ``images``."""
    content = msg.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{j}].content")
    if not isinstance(content, list):
        raise ChatError(f"messages[{j}].content must be a string or a list of parts, got {type(content).__name__}",
                        param=f"messages[{j}].content")
    texts = []
    for k, part in enumerate(content):
        where = f"messages[{j}].content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ChatError(f"{where}.text must be a string", param=where)
            texts.append(_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            if msg.get("role") != "user":
                raise ChatError(f"{where}: images are accepted in user messages only", param=where)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            images.append((j, image_bytes_of(url, limits, f"{where}.image_url")))
        else:
            raise ChatError(f"{where}: unsupported content part type {kind!r} (use 'text' or 'image_url')", param=where)
    return "\n".join(texts)


def parse_chat(raw: bytes, limits: Limits) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body and render its conversation; raises :class:`ChatError`."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"the request body is not valid JSON: {e}") from e
    except RecursionError as e:  # the parser's own limit, far beyond ours
        raise ChatError(f"the request body nests lists/objects more than {MAX_JSON_DEPTH} levels deep") from e
    if (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise ChatError(f"the request body nests lists/objects {depth} levels deep, more than the limit of {MAX_JSON_DEPTH}")
    if not isinstance(body, dict):
        raise ChatError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model != limits.model:
        raise ChatError(f"the model {model!r} does not exist; this server serves {limits.model!r} (GET /v1/models)",
                        param="model", status=404, code="model_not_found")
    if body.get("n", 1) != 1:
        raise ChatError(f"'n' must be 1 (one choice per request), got {body.get('n')!r}", param="n")
    if body.get("logprobs"):
        raise ChatError("'logprobs' is not supported", param="logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = limits.max_new_tokens if body.get(key) is None else _integer(body[key], key)
    if max_tokens < 1:
        raise ChatError(f"'{key}' must be at least 1, got {max_tokens}", param=key)
    if max_tokens > limits.max_new_tokens:
        raise ChatError(f"'{key}' {max_tokens} is more than this server's --max-new-tokens {limits.max_new_tokens}", param=key)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = None if body.get("seed") is None else _integer(body["seed"], "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ChatError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    stop = [_text(s, "stop") for s in stop]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ChatError(f"'stream' must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ChatError("'stream_options' must be an object", param="stream_options")
    return ChatRequest(render(body.get("messages"), limits), max_tokens, temperature, top_p, seed, stop, stream,
                       bool(options.get("include_usage")))


def render(messages: Any, limits: Limits) -> Request:
    """The pipeline request of a conversation: exactly one image; the last message from the user.

    One user turn without a system message is :func:`~flexattn_jax.preprocess.format_prompt`'s
    prompt (what ``generate`` renders); otherwise the turns (system text as the system prompt,
    the image tag at the front of its turn) are rendered by ``format_conversation``.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise ChatError(f"'messages' has {len(messages)} messages, more than the limit of {limits.max_messages}", param="messages")
    images: list[tuple[int, bytes | str]] = []
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for j, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ChatError(f"messages[{j}].role must be 'system', 'user' or 'assistant', got {role!r}", param=f"messages[{j}].role")
        text = _content(msg, j, limits, images)
        if role in ("system", "developer"):
            if turns:
                raise ChatError(f"messages[{j}]: a system message must come before the conversation", param=f"messages[{j}]")
            system.append(text)
            continue
        turns.append({"from": "human" if role == "user" else "gpt", "value": text, "index": j})
    if not images:
        raise ChatError("the request has no image: add an image_url part (a data: URL or a path under --image-root) "
                        "to a user message", param="messages")
    if len(images) > 1:
        raise ChatError(f"the request has {len(images)} images; one image per conversation is supported", param="messages")
    chars = sum(len(t["value"]) for t in turns) + sum(map(len, system))
    if chars > limits.max_text_chars:
        raise ChatError(f"the messages hold {chars:,} characters of text, more than the limit of {limits.max_text_chars:,}",
                        param="messages")
    if not turns or turns[-1]["from"] != "human":
        raise ChatError("the last message must be from the user", param="messages")
    (at, image), = images
    if len(turns) == 1 and not system:
        return Request(image, turns[0]["value"])
    for t in turns:
        if t["index"] == at:
            t["value"] = IMAGE_PLACEHOLDER + "\n" + t["value"].replace(IMAGE_PLACEHOLDER, "")
    try:
        text, _ = format_conversation([{"from": t["from"], "value": t["value"]} for t in turns] + [{"from": "gpt", "value": None}],
                                      system="\n".join(system) if system else SYSTEM_PROMPT)
    except PreprocessError as e:
        raise ChatError(f"messages: {e}", param="messages") from e
    return Request(image, text, formatted=True)


@dataclass
class Completion:
    """What a request gets back: the text (max_tokens and stop applied), why it ended, the token counts."""

    text: str
    finish_reason: str  # 'stop' (EOS or a stop sequence) or 'length'
    prompt_tokens: int
    completion_tokens: int


def completion_of(ans: Answer, chat: ChatRequest, tokenizer, cfg) -> Completion:
    """``ans`` cut to the request's ``max_tokens`` and at its first stop sequence (the stop sequence left out)."""
    toks = ans.tokens[: chat.max_tokens]
    text = ans.text if len(toks) == len(ans.tokens) else answer_text(tokenizer, cfg, toks)
    finish = "stop" if toks and toks[-1] == cfg.eos_token_id else "length"
    cuts = [i for i in (text.find(s) for s in chat.stop) if i >= 0]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return Completion(text or "", finish, ans.prompt_tokens or 0, len(toks))


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def completion_body(c: Completion, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                         "logprobs": None}],
            "usage": _usage(c)}


class StreamWriter:
    """The ``chat.completion.chunk`` objects of one streamed answer, made as its text arrives (one id for all)."""

    def __init__(self, model: str):
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def role(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def text(self, text: str) -> dict[str, Any]:
        return self.chunk({"content": text})

    def finish(self, c: Completion) -> dict[str, Any]:
        return self.chunk({}, c.finish_reason)

    def usage(self, c: Completion) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": _usage(c)}

