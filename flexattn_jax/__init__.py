"""flexattn-jax: FlexAttention (Li et al., ECCV 2024) for LLaVA-1.5 in JAX/Flax.

The names a user types (``demo_out/model`` is the model ``flexattn-jax demo`` writes; any directory
written by ``flexattn-jax convert`` works the same):

```python
import flexattn_jax as fx

params, cfg = fx.load_checkpoint("demo_out/model")     # parameters + the config they were converted with
tokenizer = fx.load_tokenizer("demo_out/model")
answers = fx.answer(params, cfg, tokenizer, [fx.Request("image.png", "What pattern is the small square?")], max_new_tokens=8)
print(answers[0].text, answers[0].error)
```

Underneath are pure functions of pytrees: ``fx.forward(params, cfg, input_ids, pixel_values, ...)`` and the
generation module ``fx.generate`` (``prefill``, ``decode_step``, ``generate``); docs/inference.md goes from
an image to logits and tokens with them. Submodules (``fx.generate``, ``fx.model``, ``fx.selection``, ...) and
the exported names are imported on first use, so ``import flexattn_jax`` stays light and loads nothing of
the application layer (:mod:`flexattn_jax.app`) until a name from it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
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
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule, e.g. fx.generate (binds itself)
        raise AttributeError(f"module 'flexattn_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
