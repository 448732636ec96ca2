"""Our params for the tiny transformers models of ``torch_models``, through the project's converter.

The torch model is saved with ``save_pretrained`` and read back by :func:`convert.read_checkpoint`
(the same key mapping users get); FlexAttention's per-layer ``k_proj_hd`` / ``v_proj_hd`` are then
added as the converter's mapping says (``attn/{k,v}_hr/kernel`` = weight.T, stacked over layers).
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from convert import read_checkpoint
from flexattn_jax.config import FlexConfig, ModelConfig

from .oracle import OracleFlexConfig


def convert_torch_model(model) -> tuple[dict, ModelConfig]:
    """(params, cfg) of a transformers ``LlavaForConditionalGeneration`` via a llava-hf save."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        converted = read_checkpoint(d, progress=False)
    return jax.tree.map(jnp.asarray, converted.params), converted.cfg


def with_flex(params: dict, cfg: ModelConfig, hd_weights: dict, oracle_cfg: OracleFlexConfig, **extra) -> tuple[dict, ModelConfig]:
    """Add the HR projections and the FlexAttention config matching ``oracle_cfg``."""
    budget = oracle_cfg.hr_budget
    flex = FlexConfig(
        enabled=True,
        zoom_ratio=oracle_cfg.zoom_ratio,
        lowres_size=oracle_cfg.lowres_size,
        highres_size=oracle_cfg.highres_size,
        threshold=oracle_cfg.threshold,
        first_select_layer=oracle_cfg.first_select_layer,
        pool_size=oracle_cfg.pool_size,
        hr_mode=oracle_cfg.hr_mode,
        selection=oracle_cfg.selection,
        hr_budget=budget,
        **extra,
    )
    cfg = dataclasses.replace(cfg, flex=flex)
    n = cfg.text.num_layers
    attn = dict(params["text"]["layers"]["attn"])
    attn["k_hr"] = {"kernel": jnp.asarray(np.stack([hd_weights[i][0].numpy().T for i in range(n)]))}
    attn["v_hr"] = {"kernel": jnp.asarray(np.stack([hd_weights[i][1].numpy().T for i in range(n)]))}
    if len(hd_weights[0]) == 4:  # the biases of a decoder with q/k/v biases (Qwen2)
        attn["k_hr"]["bias"] = jnp.asarray(np.stack([hd_weights[i][2].numpy() for i in range(n)]))
        attn["v_hr"]["bias"] = jnp.asarray(np.stack([hd_weights[i][3].numpy() for i in range(n)]))
    layers = {**params["text"]["layers"], "attn": attn}
    return {**params, "text": {**params["text"], "layers": layers}}, cfg


def tiny_flex_model(layers: int = 4, **oracle_kwargs):
    """``(torch model, its HR weights, our params, cfg)``: the tiny transformers LLaVA (56 px CLIP) with random
    HR projections, FlexAttention on at 168 px (zoom 3: M = 144), selection at layer 1, threshold 48."""
    from .torch_models import make_hd_weights, make_tiny_llava

    model = make_tiny_llava(layers=layers)
    hd = make_hd_weights(model)
    params, cfg = convert_torch_model(model)
    oc = OracleFlexConfig(**{"lowres_size": 56, "highres_size": 168, "first_select_layer": 1, "threshold": 48, **oracle_kwargs})
    params, cfg = with_flex(params, cfg, hd, oc)
    return model, hd, params, cfg
