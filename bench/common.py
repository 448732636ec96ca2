"""The compared configurations, in one place: model shapes, variants, inputs, the jitted programs.

Every benchmark module (``flops``, ``walltime``, ``scaling``, ``memory``, ``torch_compare``) builds
its models and programs here, so that "``flex-0.1M/project``" means the same computation in each.

Configurations (``docs/benchmarks.md``): ``lr`` (plain LLaVA on the LR view), ``hd-seq`` (plain
LLaVA with the LR view and all zoom^2 HR tiles as images in the sequence), ``xattn`` (every row
attends to all M HR keys in the hierarchical layers: ``hr_mode='paper'``, ``selection='all'``, HR
K/V projected once at prefill and cached) and ``flex-K`` (release semantics, budget K, each HR
strategy of :data:`flexattn_jax.generate.HRStrategy`). A variant is one (configuration, strategy).

Programs: ``prefill`` (prompt -> decode state and the greedy first answer token: workload A) and
``step`` (state, token -> state, next token; workload B adds ``answer - 1`` of them).
"""

from __future__ import annotations

import dataclasses
import statistics
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from flexattn_jax import generate as G
from flexattn_jax import presets
from flexattn_jax.config import ModelConfig
from flexattn_jax.flops import counting_config

SDS = jax.ShapeDtypeStruct

CONFIGS = ("lr", "hd-seq", "xattn", "flex-M", "flex-0.25M", "flex-0.1M")
BUDGETS: dict[str, float | None] = {"flex-M": None, "flex-0.25M": 0.25, "flex-0.1M": 0.1}
REFERENCE = "xattn"
XATTN_STRATEGY = "cache"  # xattn's HR K/V: all M projected once at prefill (the cheapest way for K = M every row)


def hr_strategies() -> tuple[str, ...]:
    """Every HR K/V strategy generation offers (new ones are picked up automatically)."""
    return typing.get_args(G.HRStrategy)


# ---- model shapes ------------------------------------------------------------------------------

# the benchmarks' models, from the one registry of presets
default_config, scaled_config, smoke_config = presets.bench_7b, presets.bench_scaled, presets.bench_smoke


def with_layers(cfg: ModelConfig, text_layers: int | None = None, vision_layers: int | None = None, **flex: Any) -> ModelConfig:
    """``cfg`` with other layer counts and/or flex fields (layers unrolled: cost analysis sees every one)."""
    kw: dict[str, Any] = {"scan_layers": False}
    if text_layers is not None:
        kw["text"] = dataclasses.replace(cfg.text, num_layers=text_layers)
    if vision_layers is not None:
        kw["vision"] = dataclasses.replace(cfg.vision, num_layers=vision_layers)
    if flex:
        kw["flex"] = dataclasses.replace(cfg.flex, **flex)
    return dataclasses.replace(cfg, **kw)


def zoomed(cfg: ModelConfig, zoom: int) -> ModelConfig:
    """The same model on a ``zoom`` x ``zoom`` HR view (the LR view fixed): M = zoom^2 G."""
    f = dataclasses.replace(cfg.flex, zoom_ratio=zoom, highres_size=zoom * cfg.flex.lowres_size)
    return dataclasses.replace(cfg, flex=f)


# ---- variants ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """One compared computation: a configuration name, its HR strategy and the config that runs it."""

    name: str  # one of CONFIGS
    strategy: str | None  # HR K/V strategy (flex-K, xattn); None for the plain models
    cfg: ModelConfig  # the model that runs (flex off for lr / hd-seq)
    views: int  # images in the sequence (hd-seq: 1 + zoom^2), 0 = one HR image on the side path
    zoom: int  # of the HR view being compared (also for lr, which ignores it)

    @property
    def label(self) -> str:
        if self.strategy is None or self.name == REFERENCE:
            return self.name
        return f"{self.name}/{self.strategy}"

    @property
    def is_flex(self) -> bool:
        return self.cfg.flex.enabled

    @property
    def image_tokens(self) -> int:
        """Image tokens in the sequence."""
        return self.cfg.num_image_tokens * max(self.views, 1)


def variant(base: ModelConfig, name: str, strategy: str | None = None) -> Variant:
    """The :class:`Variant` computing configuration ``name`` for a flex-enabled ``base``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; known: {CONFIGS}")
    if not base.flex.enabled:
        raise ValueError("variant() takes the flex-enabled base config (FlexAttention on, HR view set)")
    z = base.zoom
    plain = with_layers(base, enabled=False)
    plain = dataclasses.replace(plain, scan_layers=base.scan_layers)
    if name == "lr":
        cfg = dataclasses.replace(plain, flex=dataclasses.replace(plain.flex, highres_size=base.flex.lowres_size))
        return Variant(name, None, cfg, 1, z)
    if name == "hd-seq":
        return Variant(name, None, plain, 1 + z * z, z)
    if name == REFERENCE:
        cfg = dataclasses.replace(base, flex=dataclasses.replace(base.flex, selection="all", hr_mode="paper", hr_budget=None))
        return Variant(name, strategy or XATTN_STRATEGY, cfg, 0, z)
    strategies = hr_strategies()
    if strategy not in strategies:
        raise ValueError(f"{name} needs an HR strategy, one of {strategies}; got {strategy!r}")
    cfg = dataclasses.replace(base, flex=dataclasses.replace(base.flex, selection="attention", hr_mode="release",
                                                             hr_budget=BUDGETS[name]))
    return Variant(name, strategy, cfg, 0, z)


def variants(base: ModelConfig, configs: tuple[str, ...] | None = None, strategies: tuple[str, ...] | None = None) -> list[Variant]:
    """All variants (each flex-K with every strategy), in table order; ``configs`` keeps those names
    (xattn, the reference, is always kept); ``strategies`` keeps those flex strategies."""
    keep = set(CONFIGS if configs is None else configs) | {REFERENCE}
    unknown = keep - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown configuration(s) {sorted(unknown)}; known: {CONFIGS}")
    strats = hr_strategies() if strategies is None else strategies
    out = []
    for name in CONFIGS:
        if name not in keep:
            continue
        if name in BUDGETS:
            out += [variant(base, name, s) for s in strats]
        else:
            out.append(variant(base, name))
    return out


def for_counting(v: Variant, phase: str) -> Variant:
    """``v`` as counted for ``phase`` (:func:`flexattn_jax.flops.counting_config`: layers unrolled, the step's fast path)."""
    return dataclasses.replace(v, cfg=counting_config(v.cfg, phase))


# ---- inputs ------------------------------------------------------------------------------------

def sequence_length(v: Variant, prompt_len: int) -> int:
    """Prompt text tokens plus the image tokens in the sequence."""
    return prompt_len + v.image_tokens


def _pixel_shape(v: Variant, batch: int) -> tuple[int, ...]:
    c = v.cfg.vision.num_channels
    if v.is_flex:
        s = v.cfg.image_size
        return (batch, s, s, c)
    s = v.cfg.vision.image_size
    return (batch, s, s, c) if v.views == 1 else (batch, v.views, s, s, c)


def abstract_inputs(v: Variant, batch: int, prompt_len: int) -> tuple[SDS, SDS, SDS]:
    """Shapes of (input_ids, attention_mask, pixel_values) for ``batch`` samples."""
    t = sequence_length(v, prompt_len)
    return SDS((batch, t), jnp.int32), SDS((batch, t), jnp.bool_), SDS(_pixel_shape(v, batch), jnp.dtype(v.cfg.dtype))


def make_inputs(
    v: Variant, batch: int, prompt_len: int, seed: int = 0
) -> tuple[Int[Array, "B T"], Bool[Array, "B T"], Float[Array, "B ..."]]:
    """Random prompts (a few text tokens, the image tokens, the rest of the text) and pixels."""
    rng = np.random.default_rng(seed)
    cfg = v.cfg
    before = min(5, prompt_len)
    text = rng.integers(1, cfg.text.vocab_size - 1, size=(batch, prompt_len))
    text[text == cfg.image_token_id] = 1
    img = np.full((batch, v.image_tokens), cfg.image_token_id)
    ids = np.concatenate([text[:, :before], img, text[:, before:]], axis=1).astype(np.int32)
    pixels = rng.standard_normal(_pixel_shape(v, batch)).astype(np.float32)
    return jnp.asarray(ids), jnp.ones(ids.shape, bool), jnp.asarray(pixels, jnp.dtype(cfg.dtype))


def variant_params(v: Variant, params: dict) -> dict:
    """The parameters ``v`` takes, from a flex-enabled tree (plain models have no HR projections)."""
    if v.is_flex:
        return params
    attn = {k: a for k, a in params["text"]["layers"]["attn"].items() if k not in ("k_hr", "v_hr")}
    layers = {**params["text"]["layers"], "attn": attn}
    return {**params, "text": {**params["text"], "layers": layers}}


# ---- programs ----------------------------------------------------------------------------------

def prefill_fn(v: Variant, max_len: int) -> Callable:
    """``(params, ids, mask, pixels) -> (state, first answer token)``: workload A."""
    cfg, strategy = v.cfg, v.strategy or "project"

    def prefill(params, ids, mask, pixels):
        state, logits, _ = G.prefill(params, cfg, ids, pixels, mask, None, max_len=max_len, hr_strategy=strategy)
        return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return prefill


def step_fn(v: Variant) -> Callable:
    """``(params, state, token) -> (state, next token)``: one greedy decode step."""
    cfg = v.cfg

    def step(params, state, token):
        state, logits, _ = G.decode_step(params, cfg, state, token)
        return state, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return step


def max_len(v: Variant, prompt_len: int, answer_tokens: int) -> int:
    return sequence_length(v, prompt_len) + answer_tokens


# ---- cost analysis -----------------------------------------------------------------------------

def abstract_state(v: Variant, params: Any, batch: int, prompt_len: int, answer_tokens: int) -> Any:
    """The decode state's shapes after prefill."""
    ml = max_len(v, prompt_len, answer_tokens)
    state, _ = jax.eval_shape(prefill_fn(v, ml), params, *abstract_inputs(v, batch, prompt_len))
    return state


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or shape) leaf."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def add_ratios(entries: list[dict], keys: tuple[str, ...] = ("workload", "batch")) -> list[dict]:
    """``flops_ratio`` / ``time_ratio``: each entry over the xattn entry with the same ``keys``.

    With per-round timings (``round_seconds``, same length both sides) the time ratio is the median
    of the per-round ratios: a variant and xattn timed in the same round share that round's load
    from other processes, which the ratio of medians would not cancel.
    """
    ref = {tuple(e.get(k) for k in keys): e for e in entries if e["config"] == REFERENCE}
    for e in entries:
        r = ref.get(tuple(e.get(k) for k in keys))
        e["flops_ratio"] = None if r is None or not e.get("flops") or not r.get("flops") else e["flops"] / r["flops"]
        mine, theirs = e.get("round_seconds"), None if r is None else r.get("round_seconds")
        if mine and theirs and len(mine) == len(theirs):
            e["time_ratio"] = statistics.median(a / b for a, b in zip(mine, theirs, strict=True))
        else:
            e["time_ratio"] = None if r is None or not e.get("seconds") or not r.get("seconds") else e["seconds"] / r["seconds"]
    return entries
