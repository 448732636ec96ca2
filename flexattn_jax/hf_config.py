"""Readers for the checkpoint configs users have: a :class:`~flexattn_jax.config.ModelConfig` from a
checkpoint's own ``config.json`` (:func:`from_hf_config`), which understands

* llava-hf (``LlavaForConditionalGeneration``), transformers 4.x and 5.x field names;
* the original LLaVA-1.5 (``LlavaLlamaForCausalLM``): Llama fields at the top level plus
  ``mm_*`` fields; the CLIP config comes from the separate vision-tower directory;
* the FlexAttention release: the original layout plus ``extra`` (a dict, or the training
  script's ``"zoom_ratio:3#warmup:10#..."`` string).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from flexattn_jax.config import (
    IMAGE_TOKEN_INDEX_ORIGINAL,
    ROPE_TYPES,
    ConfigError,
    FlexConfig,
    ModelConfig,
    ProjectorConfig,
    TextConfig,
    VisionConfig,
    check_keys,
)
from flexattn_jax.overrides import override_dict

_EXTRA_KEYS = {
    "zoom_ratio": ("zoom_ratio", int),
    "lowres_size": ("lowres_size", int),
    "highres_size": ("highres_size", int),
    "threshold": ("threshold", float),
    "warmup": ("warmup", float),
    "special": ("selection", str),
}


def parse_extra(extra: dict[str, Any] | str | None) -> dict[str, Any]:
    """Parse the FlexAttention ``extra`` field (dict or ``"zoom_ratio:3#warmup:10"`` string)."""
    if extra is None or extra == {} or extra == "":
        return {}
    if isinstance(extra, str):
        pairs = {}
        for item in extra.split("#"):
            if not item:
                continue
            if ":" not in item:
                raise ConfigError(f"extra item {item!r} is not of the form key:value")
            k, v = item.split(":", 1)
            pairs[k.strip()] = v.strip()
        extra = pairs
    out: dict[str, Any] = {}
    for k, v in extra.items():
        if k not in _EXTRA_KEYS:
            raise ConfigError(f"unknown FlexAttention extra field {k!r}; known: {sorted(_EXTRA_KEYS)}")
        name, typ = _EXTRA_KEYS[k]
        try:
            out[name] = typ(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"extra field {k!r}={v!r} is not a valid {typ.__name__}") from e
    if "selection" in out and out["selection"] not in ("random",):
        raise ConfigError(f"extra field 'special'={out['selection']!r}: only 'random' is known")
    return out


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where} is missing the required field {key!r}")
    return d[key]


VISION_TYPES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
TEXT_TYPES = ("llama", "mistral", "qwen2")


def _vision_from_clip(d: dict[str, Any], where: str) -> VisionConfig:
    """The vision tower's config: CLIP or SigLIP (a tower config, or a full CLIPModel/SiglipModel config)."""
    if "vision_config" in d and isinstance(d["vision_config"], dict):  # a full CLIPModel / SiglipModel config
        d = d["vision_config"]
    kind = VISION_TYPES.get(d.get("model_type", "clip_vision_model"))
    if kind is None:
        raise ConfigError(f"{where}: vision tower model_type={d.get('model_type')!r} is not supported "
                          f"({', '.join(sorted(VISION_TYPES))})")
    if kind == "siglip" and d.get("vision_use_head", True):
        raise ConfigError(f"{where}: vision_use_head=true (SigLIP's pooling head, which LLaVA never reads) is not supported; "
                          "llava-hf SigLIP towers set it false")
    return VisionConfig(
        model_type=kind,
        hidden_size=_require(d, "hidden_size", where),
        intermediate_size=_require(d, "intermediate_size", where),
        num_layers=_require(d, "num_hidden_layers", where),
        num_heads=_require(d, "num_attention_heads", where),
        image_size=_require(d, "image_size", where),
        patch_size=_require(d, "patch_size", where),
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
        hidden_act=d.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
    )


def _text_from_llama(d: dict[str, Any], where: str) -> TextConfig:
    """The decoder's config: Llama (original LLaVA configs carry no model_type of their own), Mistral or Qwen2."""
    family = d.get("model_type", "llama")
    if family in ("llava_llama", "llava"):
        family = "llama"
    if family not in TEXT_TYPES:
        raise ConfigError(f"{where}: decoder model_type={family!r} is not supported ({', '.join(TEXT_TYPES)})")
    hidden = _require(d, "hidden_size", where)
    heads = _require(d, "num_attention_heads", where)
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"

    def rope_field(name: str, default: Any) -> Any:
        return rope.get(name, scaling.get(name, default))

    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={d['hidden_act']!r}; the decoder here uses silu")
    if family != "qwen2" and (d.get("attention_bias") or d.get("mlp_bias")):
        raise ConfigError(f"{where}: attention_bias/mlp_bias are not supported for {family} (biases on q/k/v: Qwen2 only)")
    window = d.get("sliding_window")
    if family == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if family == "llama":
        window = None
    return TextConfig(
        model_type=family,
        vocab_size=_require(d, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", where),
        num_layers=_require(d, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else hidden),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=_float(theta),
        rope_scaling_type=rope_type,
        rope_scaling_factor=_float(rope_field("factor", 1.0)),
        rope_low_freq_factor=_float(rope_field("low_freq_factor", 1.0)),
        rope_high_freq_factor=_float(rope_field("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=rope_field("original_max_position_embeddings", 8192),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2",
        sliding_window=window,
    )


def detect_layout(d: dict[str, Any]) -> Literal["llava-hf", "llava-original", "flexattn"]:
    """Which kind of checkpoint config this is."""
    if d.get("model_type") == "llava" or "text_config" in d:
        return "llava-hf"
    archs = d.get("architectures") or []
    if "mm_vision_tower" in d or "mm_projector_type" in d or "LlavaLlamaForCausalLM" in archs or d.get("model_type") == "llava_llama":
        return "flexattn" if parse_extra(d.get("extra")).get("zoom_ratio") else "llava-original"
    raise ConfigError(
        "config.json is neither llava-hf (model_type 'llava') nor original LLaVA (mm_vision_tower / LlavaLlamaForCausalLM)"
    )


def from_hf_config(
    config: dict[str, Any] | str | Path,
    vision_config: dict[str, Any] | str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> ModelConfig:
    """Build a :class:`ModelConfig` from a checkpoint's ``config.json`` (a dict, file or directory).

    For the original LLaVA / FlexAttention layouts, ``vision_config`` is the separate CLIP
    vision tower's config (dict, file or directory); without it, CLIP-L/14-336 is assumed only if
    ``mm_vision_tower`` names it, otherwise it is an error. ``overrides`` (as :func:`apply_overrides`)
    apply before the FlexAttention fields are validated, so e.g. ``flex.first_select_layer`` can be
    fixed for a model shallower than the release's layer 8.
    """
    d = _load_json(config)
    where = f"config.json ({config})" if isinstance(config, (str, Path)) else "config.json"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    try:
        return _from_hf_dict(d, where, vision_config, overrides)
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _from_hf_dict(
    d: dict[str, Any], where: str, vision_config: dict[str, Any] | str | Path | None, overrides: list[str] | dict[str, Any] | None
) -> ModelConfig:
    layout = detect_layout(d)
    if layout == "llava-hf":
        text_d = dict(_require(d, "text_config", where))
        if "tie_word_embeddings" in d and "tie_word_embeddings" not in text_d:
            text_d["tie_word_embeddings"] = d["tie_word_embeddings"]
        vision = _vision_from_clip(_require(d, "vision_config", where), where + " vision_config")
        text = _text_from_llama(text_d, where + " text_config")
        layer = d.get("vision_feature_layer", -2)
        if isinstance(layer, (list, tuple)):
            raise ConfigError(f"{where}: vision_feature_layer={layer} (a list) is not supported; use one layer")
        act = d.get("projector_hidden_act", "gelu")
        cfg = ModelConfig(
            vision=vision,
            text=text,
            projector=ProjectorConfig(type="mlp2x_gelu", hidden_act=act, bias=bool(d.get("multimodal_projector_bias", True))),
            image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
            pad_token_id=_first_int(text_d.get("pad_token_id", d.get("pad_token_id")), 0),
            bos_token_id=_first_int(text_d.get("bos_token_id"), 1),
            eos_token_id=_first_int(text_d.get("eos_token_id"), 2),
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        )
        extra = parse_extra(d.get("extra"))
    else:
        text = _text_from_llama(d, where)
        if vision_config is None:
            tower = str(d.get("mm_vision_tower", ""))
            if "clip-vit-large-patch14-336" not in tower:
                raise ConfigError(
                    f"{where}: the vision tower {tower!r} lives outside this checkpoint; pass its config (vision_config=/--vision-tower)"
                )
            vision = VisionConfig()
        else:
            vision = _vision_from_clip(_load_json(vision_config), f"vision tower config ({vision_config})")
        ptype = d.get("mm_projector_type", "linear")
        if ptype not in ("mlp2x_gelu", "linear"):
            raise ConfigError(f"{where}: mm_projector_type={ptype!r} is not supported (mlp2x_gelu, linear)")
        select = d.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ConfigError(f"{where}: mm_vision_select_feature={select!r}: use 'patch' or 'cls_patch'")
        mm_hidden = d.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != vision.hidden_size:
            raise ConfigError(f"{where}: mm_hidden_size={mm_hidden} contradicts the vision tower's hidden_size={vision.hidden_size}")
        cfg = ModelConfig(
            vision=vision,
            text=text,
            projector=ProjectorConfig(type=ptype, hidden_act="gelu", bias=True),
            image_token_id=IMAGE_TOKEN_INDEX_ORIGINAL,
            pad_token_id=_first_int(d.get("pad_token_id"), 0),
            bos_token_id=_first_int(d.get("bos_token_id"), 1),
            eos_token_id=_first_int(d.get("eos_token_id"), 2),
            vision_feature_layer=d.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy="default" if select == "patch" else "full",
        )
        extra = parse_extra(d.get("extra"))
    d_cfg = cfg.to_dict()
    if extra.get("zoom_ratio"):
        flex_kwargs = {"enabled": True, "lowres_size": vision.image_size, "highres_size": vision.image_size * extra["zoom_ratio"]}
        flex_kwargs.update(extra)
        check_keys(FlexConfig, flex_kwargs, f"{where} extra")
        d_cfg["flex"] = {**d_cfg["flex"], **flex_kwargs}
    elif extra:
        raise ConfigError(f"{where}: 'extra' has FlexAttention fields {sorted(extra)} but no zoom_ratio")
    if overrides:
        d_cfg = override_dict(d_cfg, overrides)
    return ModelConfig.from_dict(d_cfg)


def _first_int(value: Any, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and not _is_int(value):
        raise ConfigError(f"token id {value!r} must be an integer")
    return default if value is None else int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _float(value: Any) -> Any:
    """``float(value)`` for numbers; anything else is returned as is, for :func:`validate` to name."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _load_json(src: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(src, dict):
        return src
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"no config file at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
