"""FLOPs of the programs an evaluation ran, from XLA's cost analysis of their lowered modules.

XLA counts a loop body once, so programs are lowered for counting with the layers unrolled
(``scan_layers=False``; the same arithmetic) through the benchmarks' one cost reader,
``bench.common.cost_flops`` (eval is app layer, like the demo, and may import bench).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import cost_flops
from flexattn_jax import generate as G
from flexattn_jax.config import ModelConfig


def counting_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with its layer loops unrolled, so that every layer is counted."""
    return dataclasses.replace(cfg, scan_layers=False)


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of every array leaf (nothing is computed or transferred)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


_CACHE: dict[tuple, Any] = {}


def cached(key: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per key in this process (a program's FLOPs depend on its config and shapes only)."""
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def generation_flops(params: dict, cfg: ModelConfig, batch: int, length: int, max_len: int,
                     hr_strategy: str = "project") -> tuple[float, float]:
    """``(prefill, one decode step)`` FLOPs of a greedy generation batch of ``batch`` prompts of ``length`` tokens."""
    return cached(("generate", cfg, batch, length, max_len, hr_strategy),
                  lambda: _generation_flops(params, cfg, batch, length, max_len, hr_strategy))


def _generation_flops(params: dict, cfg: ModelConfig, batch: int, length: int, max_len: int, hr_strategy: str) -> tuple[float, float]:
    c = counting_config(cfg)
    s = cfg.image_size
    p = abstract(params)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, s, s, cfg.vision.num_channels), jnp.dtype(cfg.dtype))
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    margin = jax.ShapeDtypeStruct((batch, 2), jnp.int32)

    def prefill(p, ids, pixels, mask, margin):
        return G.prefill(p, c, ids, pixels, mask, margin, max_len=max_len, hr_strategy=hr_strategy)

    def step(p, state, token):
        return G.decode_step(p, c, state, token)

    state = jax.eval_shape(prefill, p, ids, pixels, mask, margin)[0]
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return cost_flops(prefill, p, ids, pixels, mask, margin), cost_flops(step, p, state, token)
