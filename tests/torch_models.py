"""Tiny random transformers LLaVA models (and FlexAttention extras) for CPU parity tests.

The weights are re-initialised with fan-in scaled normals (not HF's std=0.02), so that attention
maps are far from uniform and the HR selection actually selects something.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 127


def make_tiny_llava(
    gqa: bool = True,
    tied: bool = False,
    image_size: int = 56,
    layers: int = 4,
    seed: int = 0,
    patch_size: int = 14,
    vocab_size: int = 128,
    hidden_size: int = 64,
    heads: int = 4,
    vision_layers: int = 2,
) -> LlavaForConditionalGeneration:
    """Tiny fp32 eager `LlavaForConditionalGeneration`: CLIP (hidden 32) + Llama (`layers` layers, GQA if `gqa`).

    The image placeholder id is ``IMAGE_TOKEN_ID`` (127, the last vocab entry when vocab_size=128).
    """
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    tc = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if gqa else heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=vocab_size - 1,
        vision_feature_layer=-2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    _reinit(model, seed)
    return model.float().eval()


def _reinit(model: torch.nn.Module, seed: int) -> None:
    """Deterministic fan-in scaled init (tied parameters are visited once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                if "embed_tokens" in name:
                    std = 1.0
                elif "position_embedding" in name:
                    std = 0.5
                else:
                    std = (p[0].numel()) ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # e.g. CLIP class_embedding
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def make_hd_weights(model: LlavaForConditionalGeneration, seed: int = 1) -> dict[int, tuple[torch.Tensor, ...]]:
    """Random ``k_proj_hd`` / ``v_proj_hd`` weights (Hkv*d, D) for every decoder layer, like k_proj/v_proj; plus
    their biases (Hkv*d,) where the decoder's k/v have biases (Qwen2)."""
    tc = model.config.text_config
    d = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    shape = (tc.num_key_value_heads * d, tc.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    std = tc.hidden_size**-0.5
    biased = model.model.language_model.layers[0].self_attn.k_proj.bias is not None
    out = {}
    for i in range(tc.num_hidden_layers):
        w = (torch.randn(shape, generator=gen) * std, torch.randn(shape, generator=gen) * std)
        out[i] = w + ((torch.randn(shape[0], generator=gen) * 0.1, torch.randn(shape[0], generator=gen) * 0.1) if biased else ())
    return out


def grid_side(model: LlavaForConditionalGeneration) -> int:
    """LR feature grid side g = image_size // patch_size."""
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def make_prompt(model: LlavaForConditionalGeneration, n_before: int = 5, n_after: int = 6, seed: int = 0) -> torch.Tensor:
    """(1, n_before + g*g + n_after) ids: random text, one run of g*g image placeholders, random text."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    img = model.config.image_token_id
    g = grid_side(model)
    text = torch.randint(1, vocab - 1, (n_before + n_after,), generator=gen)
    text[text == img] = 1
    ids = torch.cat([text[:n_before], torch.full((g * g,), img), text[n_before:]])
    return ids[None]


def make_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random CLIP-normalised-looking NCHW pixels with some low-frequency structure."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 7, 7, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(batch, 3, size, size, generator=gen)


BASES = ("llama3-clip", "mistral-clip", "qwen2-siglip", "llama3-siglip")


def make_tiny_base(base: str, layers: int = 3, seed: int = 0, image_size: int | None = None,
                   vocab: int = 128) -> LlavaForConditionalGeneration:
    """Tiny fp32 eager `LlavaForConditionalGeneration` of a base (``BASES``: decoder-tower), GQA everywhere.

    Llama-3: theta 500000 and the ``llama3`` rope scaling (original context 16, so that the scaled, kept and
    blended frequencies all occur at head dim 16). Mistral: a sliding window (64) above the tests' contexts.
    Qwen2: q/k/v biases, RMSNorm eps 1e-6, tied embeddings. CLIP: 56 px (a 4 x 4 grid). SigLIP: 70 px (a
    5 x 5 grid, no class token, no head, 'full' features from the last layer, as llava-interleave does).
    The image token is the last id of the vocabulary.
    """
    from transformers import MistralConfig, Qwen2Config, SiglipVisionConfig

    decoder, tower = base.split("-")
    hidden = 64
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if decoder == "llama3":
        tc = LlamaConfig(**common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16})
        tied = False
    elif decoder == "mistral":
        tc = MistralConfig(**common, sliding_window=64, head_dim=16)
        tied = False
    elif decoder == "qwen2":
        tc = Qwen2Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=True)
        tied = True
    else:
        raise ValueError(f"unknown decoder {decoder!r}")
    tc.tie_word_embeddings = tied
    if tower == "clip":
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size or 56, patch_size=14)
        layer, strategy = -2, "default"
    else:
        vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size or 70, patch_size=14, vision_use_head=False)
        layer, strategy = -1, "full"
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab - 1, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    _reinit(model, seed)
    return model.float().eval()

