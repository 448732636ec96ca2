"""A model directory (the converted format) of a tiny model with random weights, for CLI tests: the one writer."""

from __future__ import annotations

from pathlib import Path

from flexattn_jax.config import ModelConfig


def write_tiny_checkpoint(d: Path, cfg: ModelConfig | None = None, seed: int = 2, std: float = 0.3) -> Path:
    """``d`` (must not exist) with random parameters of ``cfg`` (default: the tiny FlexAttention model), written by
    :func:`flexattn_jax.checkpoint.write_model` with the demo's tokenizer; returns ``d``."""
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from flexattn_jax.checkpoint import write_model
    from tests.fixtures import random_params, tiny_config

    cfg = cfg or tiny_config()

    def tokenizer_files(directory: Path) -> list[str]:
        return [Path(f).name for f in build_demo_tokenizer().save_pretrained(str(directory))]

    return write_model(random_params(cfg, seed=seed, std=std), cfg, d, {"source": "tests"}, tokenizer_files)
