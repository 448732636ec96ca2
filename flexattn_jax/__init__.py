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
import os
import sys
from pathlib import Path
from typing import Any

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor


def tpu_chips_present(pci_root: Path = Path("/sys/bus/pci/devices")) -> bool | None:
    """Whether this host has TPU chips (PCI devices of Google's vendor id); None when it cannot tell (no sysfs)."""
    try:
        return GOOGLE_PCI_VENDOR in [(d / "vendor").read_text().strip() for d in pci_root.iterdir() if (d / "vendor").is_file()]
    except OSError:
        return None


def skip_absent_tpu(environ=os.environ, pci_root: Path = Path("/sys/bus/pci/devices")) -> bool:
    """Keep JAX off libtpu on a host without TPU chips (sets ``JAX_PLATFORMS=cpu``); True when it did.

    The ``tpu`` extra installs libtpu for compile-only TPU targets (``flexattn-jax compile``, which works
    with ``JAX_PLATFORMS=cpu``). On a CPU host JAX would otherwise initialise libtpu as a runtime backend
    and print a dozen hostname errors before every command. A user's own ``JAX_PLATFORMS`` wins, and a host
    with the CUDA plugin too is left alone (its GPU must stay visible). Runs at ``import flexattn_jax`` (and
    so before every command); when jax was imported first, its ``jax_platforms`` setting is updated too.
    """
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    if any(importlib.util.find_spec(name) is not None for name in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return False
    if tpu_chips_present(pci_root) is not False:  # chips, or no sysfs (not Linux): let JAX decide
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    if environ is os.environ and "jax" in sys.modules:  # jax read the variable at its import
        try:
            sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception:  # noqa: BLE001 - its backends are up already: nothing left to keep quiet
            pass
    return True


skip_absent_tpu()

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
    "GenerationOptions": "flexattn_jax.app.inference",
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
