"""Our parameters -> a HF checkpoint directory (config.json + model.safetensors), by the same table.

``hf5`` writes transformers 5.x module names, ``hf4`` the llava-hf names of transformers 4.x (both
load with ``LlavaForConditionalGeneration.from_pretrained``); ``original`` writes the LLaVA-1.5 /
FlexAttention layout with the CLIP tower in ``vision_tower/`` (a ``CLIPVisionModel`` directory).
FlexAttention's ``k_proj_hd``/``v_proj_hd`` go under the decoder layers in every layout, with the
config's ``extra``; transformers reports them as unexpected keys and ignores them.
The safetensors file is written tensor by tensor: one host copy of one leaf at a time.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convert.mapping import BY_OURS, RULES, V, export_name, to_torch, torch_shape
from convert.reader import NUMPY_TO_SAFETENSORS, ConvertError
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import flatten
from flexattn_jax.paths import OutputPathError, check_output_dir

LAYOUTS = ("hf5", "hf4", "original")
VISION_SUBDIR = "vision_tower"


def _extra_string(cfg: ModelConfig) -> str:
    f = cfg.flex
    items = [f"zoom_ratio:{f.zoom_ratio}", f"warmup:{f.warmup:g}", f"lowres_size:{f.lowres_size}"]
    items += [f"highres_size:{f.highres_size}", f"threshold:{f.threshold:g}"]
    if f.selection == "random":
        items.append("special:random")
    return "#".join(items)


def _llama_fields(cfg: ModelConfig) -> dict[str, Any]:
    t = cfg.text
    rope: dict[str, Any] = {"rope_type": t.rope_scaling_type, "rope_theta": t.rope_theta}
    scaling = None
    if t.rope_scaling_type != "default":
        rope["factor"] = t.rope_scaling_factor
        if t.rope_scaling_type == "llama3":
            rope.update(low_freq_factor=t.rope_low_freq_factor, high_freq_factor=t.rope_high_freq_factor,
                        original_max_position_embeddings=t.rope_original_max_position_embeddings)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    family: dict[str, Any] = {}
    if t.model_type == "llama":
        family = {"attention_bias": False, "mlp_bias": False}
    elif t.model_type == "mistral":
        family = {"sliding_window": t.sliding_window}
    elif t.model_type == "qwen2":
        family = {"use_sliding_window": t.sliding_window is not None, "sliding_window": t.sliding_window}
    return {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": t.tie_word_embeddings,
        **family,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def clip_vision_config(cfg: ModelConfig) -> dict[str, Any]:
    """The vision tower's own config (a CLIPVisionModel or, for SigLIP, a SiglipVisionModel without its head)."""
    v = cfg.vision
    siglip = {} if v.class_token else {"vision_use_head": False}
    return {
        "architectures": ["CLIPVisionModel" if v.class_token else "SiglipVisionModel"],
        "model_type": "clip_vision_model" if v.class_token else "siglip_vision_model",
        **siglip,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }


def hf_config(cfg: ModelConfig, layout: str, image_token_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` for ``layout`` (the inverse of :func:`flexattn_jax.hf_config.from_hf_config`)."""
    dtype = str(cfg.param_dtype)
    if layout == "original" and (cfg.text.model_type != "llama" or not cfg.vision.class_token):
        raise ConvertError(f"layout 'original' is LLaVA-1.5's (Llama + CLIP); this model is {cfg.text.model_type} + "
                           f"{cfg.vision.model_type}: export it as hf5 or hf4")
    if layout == "original":
        out = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", **_llama_fields(cfg)}
        out.update(
            mm_vision_tower=VISION_SUBDIR,
            mm_projector_type=cfg.projector.type,
            mm_vision_select_layer=cfg.vision_feature_layer,
            mm_vision_select_feature="patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
            mm_hidden_size=cfg.vision.hidden_size,
            mm_use_im_start_end=False,
            mm_use_im_patch_token=False,
            image_aspect_ratio="pad",
        )
    else:
        token = cfg.image_token_id if image_token_id is None else image_token_id
        if token < 0:
            raise ConvertError(
                f"image_token_id={token} is the original LLaVA placeholder; llava-hf needs a vocabulary id "
                "(pass image_token_id=... / --image-token-id; the embedding must have a row for it)"
            )
        if cfg.projector.type != "mlp2x_gelu":
            raise ConvertError(
                f"projector.type={cfg.projector.type!r}: LlavaForConditionalGeneration has only the mlp2x_gelu projector"
            )
        text = {"model_type": cfg.text.model_type, **_llama_fields(cfg)}
        out = {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "text_config": text,
            "vision_config": {k: v for k, v in clip_vision_config(cfg).items() if k != "architectures"},
            "image_token_index": token,
            "image_seq_length": cfg.num_image_tokens,
            "projector_hidden_act": cfg.projector.hidden_act,
            "multimodal_projector_bias": cfg.projector.bias,
            "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
            "tie_word_embeddings": cfg.text.tie_word_embeddings,
            "pad_token_id": cfg.pad_token_id,
        }
    if cfg.flex.enabled:
        out["extra"] = _extra_string(cfg)
    out["torch_dtype"] = dtype
    out["dtype"] = dtype
    return out


def _entries(params: dict, cfg: ModelConfig, layout: str, vision: bool | None) -> Iterator[tuple[str, str, int | None]]:
    """(export key, our leaf, index) in table order; ``vision`` selects vision leaves only (True), none (False) or all."""
    flat = flatten(params)
    unknown = sorted(set(flat) - set(BY_OURS))
    if unknown:
        raise ConvertError(f"parameters with no export rule: {unknown}")
    for rule in RULES:
        if rule.ours not in flat or (vision is not None and rule.hf.startswith(V) != vision):
            continue
        for idx in range(flat[rule.ours].shape[0]) if rule.stacked else [None]:
            yield export_name(rule, idx, layout, cfg), rule.ours, idx


def write_safetensors(
    path: Path, params: dict, entries: list[tuple[str, str, int | None]], meta: dict[str, str] | None = None
) -> int:
    """Write ``entries`` of ``params`` (our layout) as PyTorch tensors, leaf by leaf; returns the bytes written."""
    if sys.byteorder != "little":  # pragma: no cover
        raise ConvertError("safetensors export needs a little-endian host")
    flat = flatten(params)
    header: dict[str, Any] = {"__metadata__": meta or {"format": "pt"}}
    offset = 0
    for key, leaf, idx in entries:
        x = flat[leaf]
        rule = BY_OURS[leaf]
        shape = torch_shape(rule.kind, tuple(x.shape[1:]) if idx is not None else tuple(x.shape))
        dtype = NUMPY_TO_SAFETENSORS.get(np.dtype(x.dtype))
        if dtype is None:
            raise ConvertError(f"{leaf}: dtype {x.dtype} cannot be written to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        host_leaf, host = None, None
        for _key, leaf, idx in entries:
            if leaf != host_leaf:
                host_leaf, host = leaf, np.asarray(flat[leaf])  # one leaf on the host at a time
            x = host if idx is None else host[idx]
            y = np.ascontiguousarray(to_torch(BY_OURS[leaf].kind)(x))
            f.write(y.reshape(-1).view(np.uint8).data)
    return 8 + len(blob) + offset


def export_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | Path,
    layout: str = "hf5",
    image_token_id: int | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as a HF checkpoint directory that transformers (or LLaVA's code, for 'original') loads."""
    if layout not in LAYOUTS:
        raise ConvertError(f"layout={layout!r}: use one of {LAYOUTS}")
    try:
        out = check_output_dir(out_dir, sources=[tokenizer_dir], overwrite=overwrite, flag="OUT_HF")
    except OutputPathError as e:
        raise ConvertError(str(e)) from None
    config = hf_config(cfg, layout, image_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if layout == "original":
            write_safetensors(tmp / "model.safetensors", params, list(_entries(params, cfg, layout, vision=False)))
            (tmp / VISION_SUBDIR).mkdir()
            (tmp / VISION_SUBDIR / "config.json").write_text(json.dumps(clip_vision_config(cfg), indent=2) + "\n")
            write_safetensors(tmp / VISION_SUBDIR / "model.safetensors", params, list(_entries(params, cfg, "clip", vision=True)))
        else:
            write_safetensors(tmp / "model.safetensors", params, list(_entries(params, cfg, layout, vision=None)))
        if tokenizer_dir is not None:
            from flexattn_jax.tokenizer import copy_tokenizer

            copy_tokenizer(Path(tokenizer_dir), tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
