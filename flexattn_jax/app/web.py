"""``flexattn-jax serve --ui``: a page for people, mounted on the API's app (Gradio, at ``/ui``).

A person uploads or pastes an image (or picks one of the demo's examples), asks about it, and reads
the answer as it streams, turn after turn about the same image. The page builds the same
chat-completions body a client would send and reads it with the API's own checks
(:func:`~flexattn_jax.app.chat.parse_chat` under the server's :class:`~flexattn_jax.app.chat.Limits`),
so bad input gets the API's message, shown in the page. At the server's HR budget the answer comes
from the server's own scheduler (the decode-slots engine streams it token by token); at another
budget (``hr_budget`` as the library spells it: ``all``, a fraction, a count, ``adaptive``) from the
jitted generation with that budget.

Where the model looked: the answer's maps come from ``generate --save-attention``'s path
(:func:`~flexattn_jax.app.inference.stream_answers`, here with ``step_maps`` for every generated
token), drawn by :func:`~flexattn_jax.app.visualize.save_overlay`: per layer and per answer token the
LR attention map as a heat map over the image and the selected HR tokens outlined. With the share of
HR tokens selected and the answer's FLOPs (:func:`~flexattn_jax.flops.generation_flops`) against the
same answer reading every HR token (``hr_budget=all``, the cross-attention cost).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import queue
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Bool

from flexattn_jax.app.chat import ChatError, ChatRequest, Limits, completion_of, parse_chat
from flexattn_jax.app.inference import Answer, GenerationOptions, stream_answers
from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.overrides import apply_overrides, parse_hr_budget
from flexattn_jax.preprocess import PreprocessError, bucket_length, load_image

UI_PATH = "/ui"
EXAMPLES = 3  # the demo's held-out images offered as examples


@dataclass
class Maps:
    """One answer's maps per generated token: ``masks`` (N, L, M) selected HR tokens, ``attention`` (N, L, G)."""

    image: str
    question: str
    answer: str
    pieces: list[str]  # each token's text
    masks: np.ndarray
    attention: np.ndarray
    key: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # names its figures (a state is copied per event)


def changes(masks: Bool[np.ndarray, "N L M"], layer: int) -> list[int]:
    """The answer tokens at which ``layer``'s HR selection differs from the previous token's (token 0 always)."""
    m = np.asarray(masks)[:, layer]
    return [0] + [i for i in range(1, len(m)) if not np.array_equal(m[i], m[i - 1])]


def selected_share(mask: Bool[np.ndarray, " M"]) -> float:
    """Share of the HR tokens selected."""
    return float(np.asarray(mask, bool).mean())


def answer_flops(params, cfg: ModelConfig, prompt_tokens: int, answer_tokens: int, max_new_tokens: int, buckets,
                 hr_strategy: str) -> tuple[float, float]:
    """``(this answer, the same answer reading every HR token)`` FLOPs of one request: its bucket's prefill plus one
    decode step per token after the first, from the project's FLOP model at ``cfg``'s HR budget and at ``hr_budget=all``."""
    from flexattn_jax.flops import generation_flops

    length = bucket_length(prompt_tokens, buckets)
    out = []
    for c in (cfg, apply_overrides(cfg, {"flex.hr_budget": None})):
        pre, step = generation_flops(params, c, 1, length, length + max_new_tokens, hr_strategy)
        out.append(pre + max(answer_tokens - 1, 0) * step)
    return out[0], out[1]


def _body(limits: Limits, image: bytes, history: list[dict[str, Any]], question: str, max_tokens: int, temperature: float,
          seed: int) -> bytes:
    """The chat-completions body of this conversation: the image in the first user message, the earlier turns, the question."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages: list[dict[str, Any]] = []
    for turn in [*history, {"role": "user", "content": question}]:
        content = turn["content"]
        if not messages and turn["role"] == "user":
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": content}]
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": turn["role"], "content": content})
    return json.dumps({"model": limits.model, "messages": messages, "max_tokens": int(max_tokens), "temperature": float(temperature),
                       "seed": int(seed)}).encode()


def read_image(path: str | None, limits: Limits) -> bytes:
    """The uploaded file's bytes, under the API's image size limit and decodable as an image; ChatError otherwise."""
    if not path:
        raise ChatError("no image: upload or paste one, or pick an example")
    size = Path(path).stat().st_size
    if size > limits.max_image_bytes:
        raise ChatError(f"the image file is {size:,} bytes, more than the limit of {limits.max_image_bytes:,} (--max-image-bytes)")
    data = Path(path).read_bytes()
    try:
        load_image(data)
    except PreprocessError as e:
        raise ChatError(f"{Path(path).name}: {e}") from e
    return data


class Page:
    """The page's work: answers through the server's scheduler, maps through the generation path, figures by visualize."""

    def __init__(self, scheduler, limits: Limits, options: GenerationOptions):
        self.scheduler, self.limits, self.options = scheduler, limits, options
        self.params, self.cfg, self.tokenizer = scheduler.params, scheduler.cfg, scheduler.tokenizer
        self.maps_lock = threading.Lock()  # one maps run at a time next to the engine
        self.out = Path(tempfile.mkdtemp(prefix="flexattn-ui-"))

    def budget_cfg(self, hr_budget: str) -> ModelConfig:
        """The server's config at the page's ``hr_budget`` (the library's spelling); ChatError names a bad one."""
        try:
            value = parse_hr_budget(hr_budget, name="hr_budget")
            return apply_overrides(self.cfg, {"flex.hr_budget": value})
        except (ConfigError, ValueError) as e:
            raise ChatError(str(e)) from e

    def maps_run(self, chat: ChatRequest, cfg: ModelConfig) -> Answer:
        """The request through ``generate --save-attention``'s path with every token's maps (its own answer included)."""
        temperature, top_p, seed = chat.sampling
        with self.maps_lock:
            (_, ans), = stream_answers(self.params, cfg, self.tokenizer, [chat.request], self.options, progress=False, step_maps=True,
                                       batch_size=1, workers=1, window=None, temperature=temperature, top_p=top_p, seed=seed or 0,
                                       hr_budget=None)  # cfg has the page's budget
        return ans

    def engine_run(self, chat: ChatRequest):
        """The request through the server's scheduler: yields ``('text', delta)`` as streamed, then ``('done', Answer)``."""
        from flexattn_jax.app.serve import Job

        events: queue.Queue = queue.Queue()
        job = Job(chat, lambda result: events.put(("done", result)), on_text=lambda text: events.put(("text", text)))
        if not self.scheduler.submit(job):
            raise ChatError("the server is stopping" if not self.scheduler.accepting else
                            f"the server is busy: {self.scheduler.pending} requests pending; retry later")
        try:
            while True:
                kind, value = events.get()
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancelled = True  # the page left: the slot is freed (no-op once answered)

    def figure(self, maps: Maps, layer: int, token: int) -> tuple[str, str]:
        """``(PNG path, caption)``: the token's map at ``layer`` with its selected HR tokens outlined (visualize's drawing)."""
        from flexattn_jax.app.visualize import save_overlay

        layer = int(np.clip(layer, 0, maps.masks.shape[1] - 1))
        token = int(np.clip(token, 0, maps.masks.shape[0] - 1))
        mask, att = maps.masks[token, layer], maps.attention[token, layer]
        path = self.out / f"map-{maps.key}-{layer}-{token}.png"
        if not path.exists():
            save_overlay(path, load_image(maps.image), att, mask, question=maps.question, answer=maps.answer, layer=layer,
                         subject=f"the attention predicting answer token {token}")
        at = changes(maps.masks, layer)
        caption = (f"layer {layer}, token {token} {maps.pieces[token]!r}: {int(mask.sum())} of {mask.size} HR tokens selected "
                   f"({selected_share(mask):.1%}); the selection changes at tokens {', '.join(map(str, at))}")
        return str(path), caption


def _pieces(tokenizer, tokens: list[int]) -> list[str]:
    return [tokenizer.decode([t]) for t in tokens]


def build_blocks(page: Page, examples: list[tuple[str, str]]):
    """The Gradio page."""
    import gradio as gr

    cfg = page.cfg
    layers = cfg.text.num_layers
    from flexattn_jax.app.visualize import mask_layer

    default_budget = "all" if cfg.flex.hr_budget is None else str(cfg.flex.hr_budget)
    with gr.Blocks(title="flexattn-jax") as blocks:
        gr.Markdown(f"## FlexAttention: ask about an image, see where the model looked\nmodel `{page.limits.model}`")
        maps_state = gr.State(None)
        turns = gr.State([])  # the conversation as said (the chat shows it; its value comes back reformatted)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="image (upload or paste)", elem_id="image",
                                 height=240)
                upload = gr.File(label="or upload an image file", type="filepath", elem_id="upload", height=110)
                question = gr.Textbox(label="question", elem_id="question", lines=2)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New chat", elem_id="clear")
                with gr.Accordion("settings", open=True):
                    hr_budget = gr.Textbox(value=default_budget, label="hr_budget: all, a fraction (0.25), a count (64) or adaptive",
                                           elem_id="hr_budget")
                    max_tokens = gr.Slider(1, page.limits.max_new_tokens, value=page.limits.max_new_tokens, step=1, label="max tokens",
                                           elem_id="max_tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
                if examples:
                    gr.Examples(examples=[list(e) for e in examples], inputs=[image, question], label="the demo's images")
            with gr.Column(scale=1):
                chat = gr.Chatbot(label="chat", elem_id="chat", height=320, render_markdown=False)
                status = gr.Markdown("", elem_id="status")
                figure = gr.Image(label="where the model looked", type="filepath", interactive=False, elem_id="map", height=560)
                layer = gr.Slider(0, layers - 1, value=mask_layer(cfg), step=1, label="layer", elem_id="layer")
                token = gr.Slider(0, max(page.limits.max_new_tokens - 1, 1), value=0, step=1, label="answer token", elem_id="token")
                caption = gr.Markdown("", elem_id="caption")
                cost = gr.Markdown("", elem_id="cost")

        def on_upload(path):  # the file goes to the image box (or its error to the status); the upload box is emptied
            if path is None:
                return None, gr.update(), ""
            try:
                read_image(path, page.limits)
            except (ChatError, OSError) as e:
                return None, gr.update(), f"**error:** {e}"
            return None, path, ""

        def respond(image_path, text, history, budget, n, temp):
            history = list(history or [])
            try:
                if not (text or "").strip():
                    raise ChatError("type a question first")
                data = read_image(image_path, page.limits)
                bcfg = page.budget_cfg(budget)
                seed = 0
                chat_req = parse_chat(_body(page.limits, data, history, text, n, temp, seed), page.limits)
            except (ChatError, OSError) as e:
                yield history, f"**error:** {e}", gr.update(), None, gr.update(), "", ""
                return
            history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            yield history, "answering ...", gr.update(), None, gr.update(), "", ""
            same = bcfg.flex.hr_budget == page.cfg.flex.hr_budget
            ans: Answer | BaseException | None = None
            if same:
                streamed = ""
                try:
                    for kind, value in page.engine_run(chat_req):
                        if kind == "text" and value:
                            streamed += value
                            history[-1] = {"role": "assistant", "content": streamed}
                            yield history, "answering ...", gr.update(), None, gr.update(), "", ""
                        elif kind == "done":
                            ans = value
                except ChatError as e:
                    yield history[:-2], f"**error:** {e}", gr.update(), None, gr.update(), "", ""
                    return
            mapped = page.maps_run(chat_req, bcfg)
            if not same:
                ans = mapped
            if isinstance(ans, BaseException) or ans is None or ans.error is not None:
                msg = ans.error if isinstance(ans, Answer) else f"{type(ans).__name__}: {ans}"
                yield history[:-2], f"**error:** {msg}", gr.update(), None, gr.update(), "", ""
                return
            done = completion_of(ans, chat_req, page.tokenizer, page.cfg)
            history[-1] = {"role": "assistant", "content": done.text}
            n_tok = min(len(ans.tokens), chat_req.max_tokens)
            if mapped.token_hr_masks is None or n_tok == 0:
                yield history, "answered (this model has no HR selection to show)", gr.update(), None, gr.update(), "", ""
                return
            note = "" if mapped.tokens[:n_tok] == ans.tokens[:n_tok] else " (maps of a re-run whose sampled tokens differ)"
            maps = Maps(image_path, text, done.text, _pieces(page.tokenizer, mapped.tokens[:n_tok]),
                        mapped.token_hr_masks[:n_tok], mapped.token_image_attention[:n_tok])
            flops, all_hr = answer_flops(page.params, bcfg, ans.prompt_tokens or 0, n_tok, page.options.max_new_tokens,
                                         page.options.buckets, page.options.hr_strategy)
            share = float(np.mean(maps.masks[:, list(cfg.mask_layers)]))
            cost_text = (f"HR tokens selected: {share:.1%} on average over the answer's {n_tok} tokens and layers "
                         f"{cfg.mask_layers.start}-{cfg.mask_layers.stop - 1} (hr_budget {budget}). "
                         f"FLOPs of this answer: {flops / 1e9:.3f} GFLOP; reading every HR token (xattn cost, hr_budget=all): "
                         f"{all_hr / 1e9:.3f} GFLOP ({flops / all_hr:.1%})")
            path, cap = page.figure(maps, mask_layer(cfg), 0)
            yield (history, f"answered{note}", maps, path, gr.update(maximum=max(n_tok - 1, 1), value=0), cap, cost_text)

        def redraw(maps, lay, tok):
            if maps is None:
                return None, ""
            return page.figure(maps, lay, tok)

        upload.upload(on_upload, [upload], [upload, image, status])
        def respond_and_keep(*args):
            for out in respond(*args):
                yield (out[0], *out)  # the chat and the conversation state get the same turns

        outputs = [chat, turns, status, maps_state, figure, token, caption, cost]
        inputs = [image, question, turns, hr_budget, max_tokens, temperature]
        ask.click(respond_and_keep, inputs, outputs)
        question.submit(respond_and_keep, inputs, outputs)
        clear.click(lambda: ([], [], "", None, None, ""), None, [chat, turns, status, maps_state, figure, caption])
        image.change(lambda: ([], [], None, ""), None, [chat, turns, maps_state, status])  # a new image: a new chat
        layer.change(redraw, [maps_state, layer, token], [figure, caption])
        token.change(redraw, [maps_state, layer, token], [figure, caption])
    return blocks


def demo_examples(cfg: ModelConfig, folder: Path, n: int = EXAMPLES) -> list[tuple[str, str]]:
    """``n`` of the demo's held-out images (its test split) written under ``folder``, each with its pattern question."""
    from flexattn_jax.app.demo import OBJECT_PX
    from flexattn_jax.app.demo_data import make_split

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (img, question, _, _) in enumerate(make_split(3000, n, hr_size=cfg.image_size, obj_px=OBJECT_PX)):
        path = folder / f"example{i}.png"
        img.save(path)
        out.append((str(path), question))
    return out


def mount_ui(app, scheduler, limits: Limits, options: GenerationOptions):
    """The page mounted at :data:`UI_PATH` on ``app`` (the API's FastAPI app), answering through ``scheduler`` with the
    server's ``options``."""
    import gradio as gr

    page = Page(scheduler, limits, options)
    examples = demo_examples(page.cfg, page.out / "examples")
    blocks = build_blocks(page, examples)
    blocks.queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, blocks, path=UI_PATH, allowed_paths=[str(page.out)], show_error=True,
                               max_file_size=max(limits.max_image_bytes * 2, 1 << 20))

