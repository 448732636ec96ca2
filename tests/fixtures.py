"""Tiny models and data for tests and the demo: a config, fast random parameters, synthetic batches."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from flexattn_jax.app import demo_data
from flexattn_jax.config import IGNORE_INDEX, FlexConfig, ModelConfig, TextConfig, VisionConfig
from flexattn_jax.params import abstract_params, flatten, unflatten
from flexattn_jax.selection import learnable_rows
from train.config import TrainConfig


def tiny_config(vocab_size: int = 512, image_token_id: int = 4, **overrides: Any) -> ModelConfig:
    """2-layer CLIP (28 px, 14 px patches: 4 LR tokens), 3-layer Llama (GQA), FlexAttention zoom 3 (M = 36).

    The default vocabulary (512) holds the tiny tokenizer's 484 tokens; its ``<image>`` id is 4, ``<pad>`` 3.
    """
    cfg = ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=28, patch_size=14),
        text=TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=512),
        flex=FlexConfig(enabled=True, lowres_size=28, highres_size=84, zoom_ratio=3, first_select_layer=1, threshold=48.0),
        image_token_id=image_token_id,
        pad_token_id=3,
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


TEST_SEQ_LEN = 64
TEST_BATCH = 8


def small_train_config(**overrides: Any) -> TrainConfig:
    """The optimizer settings the tests share (one compile per mesh): 30 steps, lr 1e-2, Adam eps 1e-3.

    The large epsilon keeps Adam's first update a smooth function of the gradient, so runs on
    different meshes agree to float rounding instead of flipping ``sign(g)`` of tiny gradients.
    """
    base = dict(steps=30, batch_size=TEST_BATCH, lr=1e-2, adam_eps=1e-3, warmup_steps=0, progress=False, tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> PyTree:
    """Random parameters drawn with numpy from the abstract tree (fast; no Flax init trace).

    Norm scales are 1, biases 0, everything else N(0, std). Use ``flexattn_jax.params.init_params``
    for the model's own initialisers.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in flatten(abstract_params(cfg)).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "scale":
            x = np.ones(a.shape, np.float32)
        elif leaf == "bias":
            x = np.zeros(a.shape, np.float32)
        else:
            x = rng.normal(0.0, std, a.shape).astype(np.float32)
        out[name] = x.astype(a.dtype)
    return unflatten(out)


def synthetic_batch(
    cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0, answer_len: int = 4, text_only: int = 0, rows: int | None = None
) -> dict[str, np.ndarray]:
    """A host batch of random tokens: image tokens after a short prefix, the last ``answer_len`` real
    tokens as labels, random right padding, and the learnable rows. The last ``text_only`` samples
    have no image."""
    rng = np.random.default_rng(seed)
    g = cfg.num_image_tokens
    s = cfg.image_size
    rows = seq_len if rows is None else rows
    ids = np.full((batch, seq_len), cfg.pad_token_id, np.int32)
    labels = np.full((batch, seq_len), IGNORE_INDEX, np.int32)
    mask = np.zeros((batch, seq_len), bool)
    sel_rows = np.zeros((batch, rows), np.int32)
    sel_valid = np.zeros((batch, rows), bool)
    low = max(cfg.image_token_id, cfg.pad_token_id) + 1
    for b in range(batch):
        has_image = b < batch - text_only
        n = int(rng.integers(max(g + answer_len + 3, seq_len - 6), seq_len + 1))
        tok = rng.integers(low, cfg.text.vocab_size, n).astype(np.int32)
        if has_image:
            tok[1 : 1 + g] = cfg.image_token_id
        ids[b, :n], mask[b, :n] = tok, True
        labels[b, n - answer_len : n] = tok[n - answer_len :]
        sel_rows[b], sel_valid[b], _ = learnable_rows(labels[b], has_image, rows)
    sizes = rng.integers(s // 2, 2 * s, (batch, 2))
    from flexattn_jax.selection import margin_patches

    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": rng.normal(0, 1, (batch, s, s, cfg.vision.num_channels)).astype(np.float32),
        "margin": margin_patches(sizes, cfg.lr_grid).astype(np.int32),
        "select_rows": sel_rows,
        "select_valid": sel_valid,
    }


def to_host(tree: PyTree) -> PyTree:
    """Every leaf as a numpy array (gathers sharded arrays)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def write_llava_dataset(
    directory: str | Path, seed: int, n: int, hr_size: int = 168, name: str = "data", **kwargs: Any
) -> Path:
    """Write ``images/*.png`` and ``{name}.json`` (a LLaVA-format list) under ``directory``; return the JSON path.

    Entries: ``{"id", "image" (relative to directory), "conversations": [human "<image>\\n{question}",
    gpt "{answer}"], "meta"}``. Same arguments give byte-identical files.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, question, answer, meta) in enumerate(demo_data.make_split(seed, n, hr_size, **kwargs)):
        sample_id = f"{name}-{seed}-{i:06d}"
        rel = f"images/{sample_id}.png"
        image.save(directory / rel, format="PNG")
        records.append(
            {
                "id": sample_id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + question},
                    {"from": "gpt", "value": answer},
                ],
                "meta": meta,
            }
        )
    path = directory / f"{name}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
