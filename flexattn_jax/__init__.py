"""flexattn-jax: FlexAttention (Li et al., ECCV 2024) for LLaVA-1.5 in JAX/Flax.

The names a user types::

    import flexattn_jax as fx

    params, cfg = fx.load_checkpoint("ckpt/")                       # a converted model directory
    answers = fx.answer(params, cfg, tokenizer, [fx.Request("cat.jpg", "What is on the mat?")])
    out = fx.forward(params, cfg, input_ids, pixel_values)          # logits (training-mode forward)
    gen = fx.generate.generate(params, cfg, input_ids, pixel_values, mask, margin, max_new_tokens=32)

(``fx.generate`` is the generation module: ``prefill``, ``decode_step``, ``generate``.) Everything is
imported on first use, so ``import flexattn_jax.model`` stays light and loads nothing
of the application layer (:mod:`flexattn_jax.app`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "flexattn_jax.config",
    "VisionConfig": "flexattn_jax.config",
    "TextConfig": "flexattn_jax.config",
    "ProjectorConfig": "flexattn_jax.config",
    "FlexConfig": "flexattn_jax.config",
    "ConfigError": "flexattn_jax.config",
    "apply_overrides": "flexattn_jax.overrides",
    "from_hf_config": "flexattn_jax.hf_config",
    "load_checkpoint": "flexattn_jax.checkpoint",
    "write_model": "flexattn_jax.checkpoint",
    "CheckpointError": "flexattn_jax.checkpoint",
    "init_params": "flexattn_jax.params",
    "forward": "flexattn_jax.model",
    "load_tokenizer": "flexattn_jax.tokenizer",
    "make_mesh": "flexattn_jax.sharding",
    "Request": "flexattn_jax.app.inference",
    "Answer": "flexattn_jax.app.inference",
    "answer": "flexattn_jax.app.inference",
    "stream_answers": "flexattn_jax.app.inference",
}
_RENAMED = {"load_checkpoint": "load_converted"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexattn_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
