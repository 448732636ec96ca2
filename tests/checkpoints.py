"""A converted-format checkpoint directory of train.testing's tiny FlexAttention model, for CLI tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_checkpoint(d: Path, seed: int = 2, std: float = 0.3) -> Path:
    """orbax params + metadata.json + the tiny tokenizer in ``d`` (created); returns ``d``."""
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from flexattn_jax.checkpoint import CONVERTER_VERSION, FORMAT, save_params
    from tests.fixtures import random_params, tiny_config

    cfg = tiny_config()
    d.mkdir(parents=True, exist_ok=True)
    save_params(random_params(cfg, seed=seed, std=std), d / "params")
    (d / "metadata.json").write_text(json.dumps({"format": FORMAT, "converter_version": CONVERTER_VERSION,
                                                 "model_config": cfg.to_dict()}))
    build_demo_tokenizer().save_pretrained(str(d))
    return d
