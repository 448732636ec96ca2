"""FLOP counting from XLA's cost analysis: one reader for the benchmarks, the evaluation and the demo.

XLA counts a loop body once, so a program is counted on :func:`counting_config`, which has no loop left:
``scan_layers=False`` unrolls the layer loops (the same arithmetic, including the 'cache' strategy's
projection of all M HR tokens per hierarchical layer) and ``attention_impl='xla'`` computes every attention
densely (the chunked kernel's scan over key blocks would be counted for one block; a fused kernel is a
custom call XLA does not count at all). It is read by :func:`cost_flops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from flexattn_jax import generate as G
from flexattn_jax.config import ModelConfig
from flexattn_jax.model import forward

Phase = Literal["prefill", "step"]


def counting_config(cfg: ModelConfig, phase: Phase = "prefill") -> ModelConfig:
    """The config whose compile is counted for ``phase``: layers unrolled, attention dense (the same
    products as any kernel, none in a loop), and for a decode ``'step'`` the incremental strategy's fast path alone.

    XLA's cost analysis takes a ``lax.cond`` as its most expensive branch. The incremental
    strategy's decode step has one: the fast path (project the few newly selected cells) or the
    fallback (project all K), the exception at run time; so a step is counted with the fast path
    (``flex.hr_cache_fallback=False``). A prefill starts from an empty cache, where every selected
    token is new and the fallback is what runs: it is counted as compiled.
    """
    if phase not in ("prefill", "step"):
        raise ValueError(f"phase={phase!r}: use 'prefill' or 'step'")
    cfg = dataclasses.replace(cfg, scan_layers=False, attention_impl="xla")
    if phase == "step":
        cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, hr_cache_fallback=False))
    return cfg


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of every array leaf (nothing is computed or transferred)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def cost_flops(fn: Callable, *args, method: Literal["lowered", "compiled"] = "lowered") -> float:
    """FLOPs of ``jax.jit(fn)`` at ``args`` (arrays or shapes) from XLA's cost analysis.

    ``method='lowered'``: the module as JAX emits it (backend-independent, no compile);
    ``'compiled'``: the module the backend compiled. Count a model on :func:`counting_config`.
    """
    if method not in ("lowered", "compiled"):
        raise ValueError(f"method={method!r}: use 'lowered' or 'compiled'")
    lowered = jax.jit(fn).lower(*args)
    ca = lowered.compile().cost_analysis() if method == "compiled" else lowered.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


_CACHE: dict[tuple, Any] = {}


def cached(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per key in this process (a program's FLOPs depend on its config and shapes only)."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def forward_flops(params: Any, cfg: ModelConfig, batch: int, length: int) -> float:
    """FLOPs of one compiled training-mode :func:`~flexattn_jax.model.forward` (logits) of ``batch`` x ``length`` ids."""
    c = counting_config(cfg)
    args = (
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, c.image_size, c.image_size, c.vision.num_channels), jnp.float32),
    )
    return cost_flops(lambda p, i, x: forward(p, c, i, x, rng=jax.random.key(0)).logits, abstract(params), *args, method="compiled")


def generation_flops(params: Any, cfg: ModelConfig, batch: int, length: int, max_len: int,
                     hr_strategy: G.HRStrategy = "project") -> tuple[float, float]:
    """``(prefill, one decode step)`` FLOPs of a greedy generation batch of ``batch`` prompts of ``length`` tokens."""
    return cached(("generate", cfg, batch, length, max_len, hr_strategy),
                  lambda: _generation_flops(params, cfg, batch, length, max_len, hr_strategy))


def _generation_flops(params: Any, cfg: ModelConfig, batch: int, length: int, max_len: int, hr_strategy: str) -> tuple[float, float]:
    pre_cfg, step_cfg = counting_config(cfg, "prefill"), counting_config(cfg, "step")
    s = cfg.image_size
    p = abstract(params)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, s, s, cfg.vision.num_channels), jnp.dtype(cfg.dtype))
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    margin = jax.ShapeDtypeStruct((batch, 2), jnp.int32)

    def prefill(p, ids, pixels, mask, margin):
        return G.prefill(p, pre_cfg, ids, pixels, mask, margin, max_len=max_len, hr_strategy=hr_strategy)

    def step(p, state, token):
        return G.decode_step(p, step_cfg, state, token)

    state = jax.eval_shape(prefill, p, ids, pixels, mask, margin)[0]
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return cost_flops(prefill, p, ids, pixels, mask, margin), cost_flops(step, p, state, token)


# ---- the analytic model ----------------------------------------------------------------------------
# One convention for every analytic count (training's MFU, `flexattn-jax compile`, the benchmarks): a matmul is 2 FLOPs
# per multiply-add (softmax, norms, activations, RoPE ignored); CLIP runs the layers up to the selected hidden state
# (ModelConfig.vision_layers_used), each view's P+1 tokens attending to all P+1; a hierarchical layer projects the HR
# K/V of all M HR tokens of an image and its select rows attend to K = ModelConfig.hr_budget_tokens HR keys (training
# with flex.train_hr_budget: U = ModelConfig.train_hr_tokens of each, the selected-only path when the unions fit). Model
# FLOPs (the MFU convention, :func:`model_flops`) halve causal attention and count no recompute (remat, the select
# rows' dense recompute); the benchmarks' dense counts (causal=False) are what XLA runs with masked attention.

def vision_tower_flops(cfg: ModelConfig) -> float:
    """One view (image or HR tile) through CLIP's patch embedding and used layers."""
    v = cfg.vision
    p1 = v.num_patches + 1
    embed = 2 * v.num_patches * v.patch_size**2 * v.num_channels * v.hidden_size
    per_layer = 2 * p1 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * p1 * p1 * v.hidden_size
    return float(embed + cfg.vision_layers_used * per_layer)


def projector_flops(cfg: ModelConfig) -> float:
    """One view's image tokens through the projector (linear, or linear-GELU-linear for ``mlp2x_gelu``)."""
    d, dv = cfg.text.hidden_size, cfg.vision.hidden_size
    return float(2 * cfg.num_image_tokens * (dv * d + (d * d if cfg.projector.type == "mlp2x_gelu" else 0)))


def views(cfg: ModelConfig) -> int:
    """CLIP passes per image: the LR view, plus the zoom^2 HR tiles with FlexAttention on."""
    return 1 + (cfg.zoom**2 if cfg.flex.enabled else 0)


def hierarchical_layers(cfg: ModelConfig) -> int:
    """Decoder layers after the select layer (0 with FlexAttention off)."""
    return max(0, cfg.text.num_layers - cfg.flex.first_select_layer - 1) if cfg.flex.enabled else 0


def decoder_flops(cfg: ModelConfig, rows: int, keys: int, causal: bool = False) -> float:
    """All decoder layers for ``rows`` tokens over ``keys`` keys: the projections and SwiGLU, and attention
    (4 x rows x keys x heads x head dim; ``causal``: rows == keys, half of it)."""
    t = cfg.text
    d, qd, kvd = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    weights = 2 * d * qd + 2 * d * kvd + 3 * d * t.intermediate_size  # q, o, k, v, gate/up/down
    attention = (2 if causal else 4) * rows * keys * qd
    return float(t.num_layers * (2 * rows * weights + attention))


def head_flops(cfg: ModelConfig, rows: int) -> float:
    """The LM head's logits for ``rows`` tokens."""
    return float(2 * rows * cfg.text.hidden_size * cfg.text.vocab_size)


def hr_kv_flops(cfg: ModelConfig, tokens: int) -> float:
    """K and V projections of ``tokens`` HR tokens in one hierarchical layer."""
    t = cfg.text
    return float(2 * tokens * t.hidden_size * 2 * t.num_kv_heads * t.head_dim)


def hr_attention_flops(cfg: ModelConfig, rows: int, keys: int) -> float:
    """``rows`` select rows attending to ``keys`` HR keys in one hierarchical layer."""
    return float(4 * rows * keys * cfg.text.num_heads * cfg.text.head_dim)


def model_flops(cfg: ModelConfig, batch: int, seq_len: int, select_rows: int, *, train: bool = False,
                vision_trains: bool = False, images: int | None = None) -> float:
    """Model FLOPs of one forward (``train``: forward + backward) over ``batch`` sequences of ``seq_len`` tokens
    with ``select_rows`` select rows, ``images`` of them with an image (default: all). The MFU convention (see
    above): training counts 3x the forward of what trains (decoder, HR path, projector) and 1x the frozen CLIP
    tower (3x with ``vision_trains``)."""
    images = batch if images is None else images
    text = batch * (decoder_flops(cfg, seq_len, seq_len, causal=True) + head_flops(cfg, seq_len))
    tokens, keys = cfg.num_hr_tokens, cfg.hr_budget_tokens
    if train and cfg.train_hr_tokens is not None:  # selected-only training: U tokens projected and attended
        tokens, keys = cfg.train_hr_tokens, min(keys, cfg.train_hr_tokens)
    hr = images * hierarchical_layers(cfg) * (hr_kv_flops(cfg, tokens) + hr_attention_flops(cfg, select_rows, keys))
    vision = images * views(cfg) * vision_tower_flops(cfg)
    projector = images * views(cfg) * projector_flops(cfg)
    if not train:
        return text + hr + vision + projector
    return 3.0 * (text + hr + projector) + (3.0 if vision_trains else 1.0) * vision


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, select_rows: int, vision_trains: bool = False,
                images: int | None = None) -> float:
    """Model FLOPs of one training step (:func:`model_flops` with ``train=True``)."""
    return model_flops(cfg, batch, seq_len, select_rows, train=True, vision_trains=vision_trains, images=images)


def lora_train_flops(cfg: ModelConfig, batch: int, seq_len: int, select_rows: int, rank: int, vision_trains: bool = False,
                     images: int | None = None) -> float:
    """Model FLOPs of one LoRA training step (adapters on every decoder linear, the HR K/V projections included; the
    projector trains): :func:`train_flops` less the frozen linears' weight gradients (one forward's worth of the
    decoder's projections, the LM head and the HR K/V projections of the ``images`` samples with an image, default
    all), plus the rank-``rank`` adapters' 3x forward."""
    t = cfg.text
    images = batch if images is None else images
    d, qd, kvd = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    hier = hierarchical_layers(cfg)
    m = cfg.num_hr_tokens if cfg.train_hr_tokens is None else cfg.train_hr_tokens  # the HR tokens the step projects
    frozen = batch * (decoder_flops(cfg, seq_len, 0) + head_flops(cfg, seq_len)) + images * hier * hr_kv_flops(cfg, m)
    widths = 2 * (d + qd) + 2 * (d + kvd) + 3 * (d + t.intermediate_size)  # in + out of q, o, k, v, gate, up, down
    adapters = 6 * rank * (batch * t.num_layers * seq_len * widths + images * hier * m * 2 * (d + kvd))
    return train_flops(cfg, batch, seq_len, select_rows, vision_trains, images) - frozen + float(adapters)


def decode_step_model_flops(cfg: ModelConfig, batch: int, cache_len: int) -> float:
    """Model FLOPs of one greedy decode step of ``batch`` sequences over a cache of ``cache_len`` slots: each new
    token through the decoder (over every slot) and the head, and as a select row over K HR keys."""
    hr = hierarchical_layers(cfg) * hr_attention_flops(cfg, 1, cfg.hr_budget_tokens)
    return batch * (decoder_flops(cfg, 1, cache_len) + head_flops(cfg, 1) + hr)


def mfu(flops: float, seconds: float, devices: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` on ``devices`` chips of ``peak_flops`` each."""
    return None if not peak_flops or seconds <= 0 else flops / (seconds * devices * peak_flops)
