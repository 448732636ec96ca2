"""The one registry of model presets and of the release's FlexAttention training recipe.

* ``llava-flexattn-7b`` / ``-13b``: the FlexAttention release's models, LLaVA-1.5 (Vicuna v1.5 = Llama 2 + CLIP
  ViT-L/14-336 + a 2-layer GELU MLP projector, liuhaotian/llava-v1.5-{7b,13b} config.json) with its ``extra``
  field as in UMass-Foundation-Model/FlexAttention scripts/train/llava-v1.5-7b-flexattn.sh;
  ``llava-1.5-7b`` / ``-13b`` the same without FlexAttention. Kept as the ``config.json`` a checkpoint carries
  (:data:`HF_CONFIGS`), read by :func:`flexattn_jax.hf_config.from_hf_config`.
* ``llava-flexattn-llama3-8b`` / ``llava-flexattn-qwen2-7b``: FlexAttention on Llama-3-8B + CLIP-L/14-336 and on
  Qwen2-7B + SigLIP-so400m-384 (llava-hf configs; ``docs/bases.md``).
* ``demo``: the demo's CLIP (56 px) + 4-layer Llama with FlexAttention at 168 px (:func:`demo`).
* ``bench-7b``, ``bench-scaled``, ``bench-smoke``: the benchmarks' LLaVA-1.5 7B shapes at 1008 px, a CPU-sized
  model with the 7B's proportions, and a smoke-test model (:func:`bench_7b`, :func:`bench_scaled`, :func:`bench_smoke`).
* :data:`RELEASE_RECIPE` / :func:`with_release_recipe`: the release's FlexAttention settings (zoom 3, the HR view
  3x the CLIP input, threshold 48, alpha warm-up 10), applied by ``train --recipe release``.
"""

from __future__ import annotations

from typing import Any

from flexattn_jax.config import FlexConfig, ModelConfig, TextConfig, VisionConfig

# The release's training script (scripts/train/llava-v1.5-7b-flexattn.sh): its `extra` field, less the view sizes
RELEASE_RECIPE: dict[str, float] = {"zoom_ratio": 3, "warmup": 10.0, "threshold": 48.0}


def release_extra(lowres_size: int) -> str:
    """The release's ``extra`` config string for a CLIP input of ``lowres_size`` px (336: the release's own)."""
    r = RELEASE_RECIPE
    return (f"zoom_ratio:{r['zoom_ratio']}#warmup:{r['warmup']:g}#lowres_size:{lowres_size}"
            f"#highres_size:{r['zoom_ratio'] * lowres_size}#threshold:{r['threshold']:g}")


def with_release_recipe(cfg: ModelConfig, overrides: list[str] | dict[str, Any] | None = None) -> ModelConfig:
    """``cfg`` with FlexAttention on as the release trains it (:data:`RELEASE_RECIPE`, the LR view at the tower's input
    size), then ``overrides`` (``--set`` strings), validated together: ``flex.first_select_layer`` can fit a decoder
    shallower than the release's 9 layers."""
    from flexattn_jax.overrides import override_dict

    r, size = RELEASE_RECIPE, cfg.vision.image_size
    d = cfg.to_dict()
    d["flex"].update(enabled=True, zoom_ratio=int(r["zoom_ratio"]), lowres_size=size, highres_size=int(r["zoom_ratio"]) * size,
                     threshold=r["threshold"], warmup=r["warmup"])
    return ModelConfig.from_dict(override_dict(d, overrides) if overrides else d)


_LLAVA_15: dict[str, Any] = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
}
_SIZES: dict[str, dict[str, int]] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
}
HF_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"llava-flexattn-{s}": {**_LLAVA_15, **_SIZES[s], "extra": release_extra(336)} for s in _SIZES},
    **{f"llava-1.5-{s}": {**_LLAVA_15, **_SIZES[s]} for s in _SIZES},
}
# FlexAttention on today's bases (docs/bases.md), llava-hf configs. Llama-3-8B (GQA 32/8, theta 500000) + CLIP-L/14-336,
# the shape of xtuner/llava-llama-3-8b-v1_1-transformers; Qwen2-7B (GQA 28/4, q/k/v biases) + SigLIP-so400m-384/14 without
# its last layer and head ('full' features of the last kept layer: 27 x 27 = 729 tokens), llava-onevision's pairing.
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"}
_SIGLIP_384 = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
               "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "vision_use_head": False}
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128256}
_QWEN2_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 32768, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
             "pad_token_id": 151643}
HF_CONFIGS["llava-flexattn-llama3-8b"] = {"model_type": "llava", "text_config": _LLAMA3_8B, "vision_config": _CLIP_L_336,
                                          "image_token_index": 128257, "vision_feature_layer": -2,
                                          "vision_feature_select_strategy": "default", "extra": release_extra(336)}
HF_CONFIGS["llava-flexattn-qwen2-7b"] = {"model_type": "llava", "text_config": _QWEN2_7B, "vision_config": _SIGLIP_384,
                                         "image_token_index": 151646, "vision_feature_layer": -1,
                                         "vision_feature_select_strategy": "full", "extra": release_extra(384)}


def demo(vocab_size: int) -> ModelConfig:
    """A CLIP (56 px, 14 px patches) + 4-layer Llama; FlexAttention at 168 px, selection from layer 0.

    Hierarchical attention in layers 1-3: a tiny decoder needs the HR tokens early to learn to read them
    (selecting at layer 1, the release's depth fraction, left seed 1 on the LR-only plateau)."""
    from flexattn_jax.tokenizer import IMAGE_ID

    return ModelConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=56, patch_size=14),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
            max_position_embeddings=512,
        ),
        # selection from layer 0 (the release: 8 of 32); the warm-up of the release's training script: alpha reaches 1
        # after a tenth of an epoch
        flex=FlexConfig(enabled=True, zoom_ratio=3, lowres_size=56, highres_size=168, first_select_layer=0, threshold=64.0,
                        warmup=RELEASE_RECIPE["warmup"]),
        image_token_id=IMAGE_ID,
        pad_token_id=3,
        eos_token_id=2,
    )


def bench_7b() -> ModelConfig:
    """LLaVA-1.5 7B shapes with FlexAttention at 1008 px (bf16; flex switched per benchmark configuration)."""
    return ModelConfig(
        flex=FlexConfig(enabled=True, highres_size=1008, lowres_size=336, zoom_ratio=3, first_select_layer=8),
        dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
    )


def bench_scaled() -> ModelConfig:
    """A CPU-sized LLaVA-FlexAttn, fp32, with the 7B model's proportions where they matter for ratios.

    Text: hidden 512, 8 layers (first selection layer 2, so 5 of 8 hierarchical; 7B: 23 of 32),
    8 heads of 64, SwiGLU 1376 (7B's 2.69 x hidden), vocab 4096. CLIP: hidden 256, 3 layers (2 run),
    patch 14 at 168 px: a 12 x 12 LR grid (G = 144), zoom 3: M = 1296 HR tokens on a 36 x 36 grid,
    pooled to 9 x 9 cells as in the release. With a 16-token prompt N = 160 and M / N = 8.1
    (7B at 1008 px: 5184 / 636 = 8.2).
    """
    return ModelConfig(
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4, image_size=168, patch_size=14),
        text=TextConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8,
                        head_dim=64),
        flex=FlexConfig(enabled=True, highres_size=504, lowres_size=168, zoom_ratio=3, first_select_layer=2),
        image_token_id=4095, dtype="float32", param_dtype="float32", scan_layers=False,
    )


def bench_smoke(dtype: str = "bfloat16") -> ModelConfig:
    """A small config for the benchmarks' smoke runs (``--tiny``/``--smoke``: fast compiles)."""
    return ModelConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=28, patch_size=7),
        text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16),
        flex=FlexConfig(enabled=True, highres_size=84, lowres_size=28, zoom_ratio=3, first_select_layer=1, pool_size=2),
        image_token_id=100, dtype=dtype, param_dtype=dtype, scan_layers=False,
    )


def preset(name: str, **kwargs: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a preset name (see the module docstring), ``kwargs`` to its builder (``demo``
    takes its tokenizer's ``vocab_size``); ValueError naming the known ones."""
    from flexattn_jax.hf_config import from_hf_config

    if name in HF_CONFIGS:
        return from_hf_config(HF_CONFIGS[name], **kwargs)
    builders = {"demo": demo, "bench-7b": bench_7b, "bench-scaled": bench_scaled, "bench-smoke": bench_smoke}
    if name not in builders:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(names())}")
    return builders[name](**kwargs)


def names() -> tuple[str, ...]:
    """Every preset name."""
    return (*HF_CONFIGS, "demo", "bench-7b", "bench-scaled", "bench-smoke")
