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
