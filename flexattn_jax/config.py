"""Model configuration: frozen dataclasses, and readers for the checkpoint configs users have.

One `ModelConfig` describes everything the model computes. It is built from a checkpoint's own
``config.json`` by :func:`from_hf_config`, which understands

* llava-hf (``LlavaForConditionalGeneration``), transformers 4.x and 5.x field names;
* the original LLaVA-1.5 (``LlavaLlamaForCausalLM``): Llama fields at the top level plus
  ``mm_*`` fields; the CLIP config comes from the separate vision-tower directory;
* the FlexAttention release: the original layout plus ``extra`` (a dict, or the training
  script's ``"zoom_ratio:3#warmup:10#..."`` string).

Every field can be overridden with dotted ``key=value`` strings (:func:`apply_overrides`), which is
what the CLI's ``--set`` flags map to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IMAGE_TOKEN_INDEX_ORIGINAL = -200  # LLaVA's tokenizer_image_token() placeholder id
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config is missing a field, has an unknown one, or contradicts itself."""


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (pre-LN ViT)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """Llama decoder."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_type: Literal["default", "linear", "dynamic"] = "default"
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"


@dataclass(frozen=True)
class ProjectorConfig:
    """LLaVA multimodal projector: ``mlp2x_gelu`` (Linear, GELU, Linear) or ``linear``."""

    type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    hidden_act: str = "gelu"
    bias: bool = True


@dataclass(frozen=True)
class FlexConfig:
    """FlexAttention settings (the release's ``config.extra`` plus this project's options).

    ``hr_budget`` is the static number K of high-resolution tokens a select row may attend to:
    ``None`` means all M (exactly the release), a float in (0, 1] a fraction of M, an int a count
    (a budget below the selection truncates it to the K best-scored tokens). ``'adaptive'`` is exact
    too and pays for what is selected: ``hr_ladder`` is a static ladder of budgets (fractions of M;
    M itself is always the top rung) and each hierarchical layer takes, with ``lax.switch``, the
    smallest rung holding every token selected by any select row of the batch, so nothing is ever
    truncated and the HR projections and attention cost that rung's K (one compile serves every
    rung). In generation the rung sizes the 'project' strategy's projections and attention, the
    'cache' strategy's gathers and attention, and the 'incremental' strategy's fallback projections
    (its M-slot cache and fast path are unchanged). In training, with many select rows, every rung
    costs the same all-M path (see ``text.DecoderLayer._attend``): the same as K = M.
    ``hr_mode='release'`` lets only the select rows see HR keys; ``'paper'`` makes every row a
    select row with its own mask. ``selection`` picks how the mask is made: from attention (the
    method), ``'random'`` (the release's ablation) or ``'all'`` (every HR token: LLaVA-XAttn).
    In training the learnable rows blend ``(1 - alpha) * ordinary + alpha * select``:
    ``alpha_schedule='release'`` reproduces the release, whose bundled HF ``Trainer`` passes
    ``step = state.epoch`` (fractional epochs done, 0 at the first update), so alpha =
    min(1, epochs done x ``warmup``) ramps from 0 to 1 over the first 1/``warmup`` epoch
    (``warmup`` defaults to the release's 3.0; its training script passes 10); ``'constant'`` keeps
    alpha = 1 from the first step. Forward calls outside training (evaluation) use alpha = 1.
    ``hr_step_cells`` sizes the incremental HR K/V cache of generation (``hr_strategy='incremental'``):
    a decode step projects at most that many newly selected pooled cells' tokens on its fast path and
    falls back (``lax.cond``) to projecting all K selected tokens when more are new; exact either way.
    ``hr_cache_fallback=False`` compiles the fast path alone: for cost analysis only (XLA counts a
    conditional as its most expensive branch), not exact when more cells are new. The default of 3
    cells minimises the mean expected projections per step over the sources ``bench/stability.py``
    measures (random-weight scaled model at K = M and 0.1 M, the demo model).
    """

    enabled: bool = False
    zoom_ratio: int = 3
    lowres_size: int = 336
    highres_size: int = 1008
    threshold: float = 64.0
    first_select_layer: int = 8
    pool_size: int = 9
    hr_budget: float | int | Literal["adaptive"] | None = None
    hr_ladder: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
    warmup: float = 3.0
    hr_mode: Literal["release", "paper"] = "release"
    selection: Literal["attention", "random", "all"] = "attention"
    random_grid: int = 8
    random_prob: float = 0.1
    alpha_schedule: Literal["release", "constant"] = "release"
    hr_step_cells: int = 3
    hr_cache_fallback: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.hr_ladder, list):  # from JSON / to_dict round trips: keep the config hashable (a jit static)
            object.__setattr__(self, "hr_ladder", tuple(self.hr_ladder))


ADAPTIVE = "adaptive"


ATTENTION_IMPLS = ("xla", "xla_chunked", "cudnn", "splash", "auto")


@dataclass(frozen=True)
class ModelConfig:
    """The whole LLaVA(-FlexAttn) model.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters.
    ``scan_layers`` scans the decoder stacks (one compile for any depth); ``False`` unrolls them
    (used for XLA cost analysis, which counts a loop body once). ``attention_impl`` picks the kernel
    of the decoder's main causal attention (:func:`flexattn_jax.attention.attention`): ``auto`` takes
    cuDNN on GPU, splash on TPU, the XLA paths on CPU (dense for short sequences: the reference).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    flex: FlexConfig = field(default_factory=FlexConfig)
    image_token_id: int = 32000
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots_saveable", "nothing_saveable"] = "none"
    attention_impl: Literal["xla", "xla_chunked", "cudnn", "splash", "auto"] = "auto"

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def lr_grid(self) -> int:
        """Side of the low-resolution token grid (24 for CLIP-L/14-336)."""
        return self.vision.grid_size

    @property
    def num_image_tokens(self) -> int:
        """LR image tokens placed in the sequence per image (576, or 577 with 'full')."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra

    @property
    def zoom(self) -> int:
        """Tiles per side of the HR image (1 when the HR image is no larger than the CLIP input)."""
        if self.flex.highres_size <= self.flex.lowres_size:
            return 1
        return self.flex.zoom_ratio

    @property
    def hr_grid(self) -> int:
        return self.zoom * self.lr_grid

    @property
    def num_hr_tokens(self) -> int:
        """M: high-resolution tokens per image."""
        return self.hr_grid**2

    @property
    def hr_cell_tokens(self) -> int:
        """HR tokens in the largest pooled selection cell (64 at 7B: a 72-grid over 9 x 9 cells)."""
        return math.ceil(self.hr_grid / self.flex.pool_size) ** 2

    @property
    def hr_step_tokens(self) -> int:
        """New HR tokens the incremental cache projects per decode step on its fast path."""
        return min(self.hr_budget_tokens, self.flex.hr_step_cells * self.hr_cell_tokens)

    @property
    def hr_adaptive(self) -> bool:
        """``flex.hr_budget == 'adaptive'``: a ladder of budgets chosen per layer at run time."""
        return self.flex.hr_budget == ADAPTIVE

    @property
    def hr_rungs(self) -> tuple[int, ...]:
        """The adaptive ladder in HR tokens, ascending, distinct, M last (a fixed budget: its K alone)."""
        m = self.num_hr_tokens
        if not self.hr_adaptive:
            return (self.hr_budget_tokens,)
        ks = {max(1, min(m, math.ceil(f * m))) for f in self.flex.hr_ladder}
        return tuple(sorted(ks | {m}))

    @property
    def hr_budget_tokens(self) -> int:
        """K: the static number of HR keys a select row attends to ('adaptive': M, the width of the
        selection carried between layers; each layer attends to its rung's K <= M)."""
        budget, m = self.flex.hr_budget, self.num_hr_tokens
        if budget is None or budget == ADAPTIVE:
            return m
        if isinstance(budget, float):
            return max(1, min(m, math.ceil(budget * m)))
        return max(1, min(m, int(budget)))

    @property
    def image_size(self) -> int:
        """Side of the pixel input the model takes (the HR size when FlexAttention is on)."""
        return self.flex.highres_size if self.flex.enabled else self.vision.image_size

    @property
    def vision_layers_used(self) -> int:
        """CLIP layers that run: up to the selected hidden state."""
        n = self.vision.num_layers
        return self.vision_feature_layer % (n + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be an object of fields, got {type(d).__name__}")
        subs = {"vision": VisionConfig, "text": TextConfig, "projector": ProjectorConfig, "flex": FlexConfig}
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key not in names:
                raise ConfigError(f"unknown ModelConfig field {key!r}")
            if key in subs:
                if not isinstance(value, dict):
                    raise ConfigError(f"config field {key!r} must be an object of fields, got {type(value).__name__}")
                _check_keys(subs[key], value, key)
                kwargs[key] = subs[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {unknown}; known: {sorted(names)}")


# Checkpoint-config names of fields whose name here differs (said in messages so a config.json is easy to fix).
_HF_NAMES = {
    "text.num_layers": "num_hidden_layers", "text.num_heads": "num_attention_heads", "text.num_kv_heads": "num_key_value_heads",
    "vision.num_layers": "num_hidden_layers", "vision.num_heads": "num_attention_heads",
}
_POSITIVE = {
    "vision": ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size", "num_channels",
               "layer_norm_eps"),
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "rms_norm_eps", "rope_theta", "rope_scaling_factor", "max_position_embeddings"),
    "flex": ("zoom_ratio", "lowres_size", "highres_size", "pool_size", "random_grid"),
}


def _named(path: str, value: Any) -> str:
    """``path=value``, plus the checkpoint config's name of the field where it differs."""
    alias = _HF_NAMES.get(path)
    return f"{path}={value!r}" + (f" ({alias} in config.json)" if alias else "")


def _type_error(path: str, value: Any, typ: Any) -> str | None:
    """Why ``value`` is not of the field type ``typ`` (None when it is); unions are checked by :func:`validate`."""
    origin = getattr(typ, "__origin__", None)
    if origin is Literal:
        return None if value in typ.__args__ else f"use one of {', '.join(map(repr, typ.__args__))}"
    if typ is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if typ is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "must be an integer"
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "must be a number"
        return None if math.isfinite(value) else "must be finite"
    if typ is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def _check_types(cfg: ModelConfig) -> None:
    """Every field of the expected type and every size positive; the message names the field and the value."""
    sections = {"": cfg, "vision.": cfg.vision, "text.": cfg.text, "projector.": cfg.projector, "flex.": cfg.flex}
    for prefix, obj in sections.items():
        hints = typing.get_type_hints(type(obj))
        for fld in dataclasses.fields(obj):
            value = getattr(obj, fld.name)
            if prefix == "" and fld.name in ("vision", "text", "projector", "flex"):
                continue
            why = _type_error(prefix + fld.name, value, hints[fld.name])
            if why:
                raise ConfigError(f"{_named(prefix + fld.name, value)}: {why}")
        for name in _POSITIVE.get(prefix[:-1], ()):
            if getattr(obj, name) <= 0:
                raise ConfigError(f"{_named(prefix + name, getattr(obj, name))} must be positive")


def validate(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` naming the field when a field has the wrong type or range, or the config contradicts itself."""
    _check_types(cfg)
    t, v, f = cfg.text, cfg.vision, cfg.flex
    if t.hidden_size % t.num_heads:
        raise ConfigError(f"text.hidden_size={t.hidden_size} is not divisible by {_named('text.num_heads', t.num_heads)}")
    if t.num_heads % t.num_kv_heads:
        raise ConfigError(f"text.num_heads={t.num_heads} is not a multiple of text.num_kv_heads={t.num_kv_heads}")
    if v.hidden_size % v.num_heads:
        raise ConfigError(f"vision.hidden_size={v.hidden_size} is not divisible by vision.num_heads={v.num_heads}")
    if v.image_size % v.patch_size:
        raise ConfigError(f"vision.image_size={v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    if not -(v.num_layers + 1) <= cfg.vision_feature_layer <= v.num_layers or cfg.vision_feature_layer % (v.num_layers + 1) == 0:
        raise ConfigError(f"vision_feature_layer={cfg.vision_feature_layer} is out of range for {v.num_layers} CLIP layers")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: use 'default' or 'full'")
    if t.rope_scaling_type not in ("default", "linear", "dynamic"):
        raise ConfigError(f"text.rope_scaling_type={t.rope_scaling_type!r}: supported are default, linear, dynamic")
    if cfg.projector.type not in ("mlp2x_gelu", "linear"):
        raise ConfigError(f"projector.type={cfg.projector.type!r}: supported are mlp2x_gelu, linear")
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: use float32, bfloat16 or float16")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl={cfg.attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}")
    if not f.enabled:
        return
    if f.lowres_size != v.image_size:
        raise ConfigError(f"flex.lowres_size={f.lowres_size} must equal vision.image_size={v.image_size} (the LR view is CLIP's input)")
    if f.highres_size > f.lowres_size and f.highres_size != f.zoom_ratio * f.lowres_size:
        raise ConfigError(
            f"flex.highres_size={f.highres_size} != flex.zoom_ratio={f.zoom_ratio} x flex.lowres_size={f.lowres_size}"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise ConfigError("FlexAttention needs vision_feature_select_strategy='default' (a square grid of image tokens)")
    if not 0 <= f.random_prob <= 1:
        raise ConfigError(f"flex.random_prob={f.random_prob!r}: use a probability in [0, 1]")
    if f.warmup < 0:
        raise ConfigError(f"flex.warmup={f.warmup!r} must be >= 0")
    if not 0 <= f.first_select_layer < t.num_layers:
        raise ConfigError(f"flex.first_select_layer={f.first_select_layer} is not a layer of a {t.num_layers}-layer decoder")
    if f.hr_mode not in ("release", "paper"):
        raise ConfigError(f"flex.hr_mode={f.hr_mode!r}: use 'release' or 'paper'")
    if f.selection not in ("attention", "random", "all"):
        raise ConfigError(f"flex.selection={f.selection!r}: use 'attention', 'random' or 'all'")
    if f.alpha_schedule not in ("release", "constant"):
        raise ConfigError(f"flex.alpha_schedule={f.alpha_schedule!r}: use 'release' (the release's warm-up) or 'constant' (alpha = 1)")
    b = f.hr_budget
    if isinstance(b, str) and b != ADAPTIVE:
        raise ConfigError(f"flex.hr_budget={b!r}: use None (all), 'adaptive', a fraction in (0, 1] or a positive count")
    if b is not None and not isinstance(b, str) and (
        isinstance(b, bool) or (isinstance(b, float) and not 0 < b <= 1) or (isinstance(b, int) and b < 1)
    ):
        raise ConfigError(f"flex.hr_budget={b!r}: use None (all), 'adaptive', a fraction in (0, 1] or a positive count")
    ladder = f.hr_ladder
    if (not isinstance(ladder, tuple) or not ladder
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1 for x in ladder)):
        raise ConfigError(f"flex.hr_ladder={ladder!r}: use a non-empty list of fractions of M in (0, 1] (M is always the top rung)")
    if isinstance(f.hr_step_cells, bool) or not isinstance(f.hr_step_cells, int) or f.hr_step_cells < 0:
        raise ConfigError(f"flex.hr_step_cells={f.hr_step_cells!r}: use a count >= 0 of pooled cells per decode step")


# ---- overrides ------------------------------------------------------------------------------

def parse_hr_budget(text: str | float | None, name: str = "hr_budget") -> float | int | str | None:
    """The one reader of an HR budget given as text (``--hr-budget``, ``--set flex.hr_budget=``).

    ``None`` / ``'all'`` / ``'none'`` -> None (all M tokens); ``'adaptive'`` -> the ladder; an integer -> a count >= 1; a number with a
    point or exponent -> a fraction in (0, 1]. Anything else raises :class:`ConfigError` naming ``name`` and the value.
    """
    if text is None or isinstance(text, int | float) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip()
        if t.lower() in ("all", "none", "null"):
            return None
        if t.lower() == ADAPTIVE:
            return ADAPTIVE
        try:
            value = int(t)
        except ValueError:
            try:
                value = float(t)
            except ValueError:
                raise ConfigError(f"{name} {text!r}: use a count (e.g. 64), a fraction in (0, 1] (e.g. 0.25), 'all', 'adaptive'") from None
    if value is not None and ((isinstance(value, float) and not 0 < value <= 1) or (isinstance(value, int) and value < 1)):
        raise ConfigError(f"{name} {text!r}: use a count >= 1, a fraction in (0, 1], 'all' or 'adaptive'")
    return value


def _parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse an override's text by the dataclass field's type ``typ``; a mismatch raises ConfigError naming ``key``."""
    low = text.strip().lower()
    origin = getattr(typ, "__origin__", None)
    if key == "flex.hr_budget":
        return parse_hr_budget(text, name=key)
    if typ is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if origin is Literal:
        if text not in typ.__args__:
            raise ConfigError(f"{key}={text!r}: use one of {', '.join(map(repr, typ.__args__))}")
        return text
    if typ is str:
        return text
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: ModelConfig, overrides: list[str] | dict[str, Any]) -> ModelConfig:
    """Return ``cfg`` with dotted fields replaced, e.g. ``["flex.threshold=48", "dtype=bfloat16"]``.

    All overrides are applied before the result is validated (once), so fields that must change
    together can be changed together. An unknown field name raises :class:`ConfigError` naming it.
    """
    return ModelConfig.from_dict(_override_dict(cfg.to_dict(), overrides))


def _override_dict(d: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig.to_dict()`` form with the overrides applied (string values parsed by the field's type)."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    sections = ("vision", "text", "projector", "flex")
    d = {k: dict(v) if k in sections else v for k, v in d.items()}
    for key, value in items:
        parts = key.split(".")
        if len(parts) == 1 and key in d and key not in sections:
            node, name = d, key
        elif len(parts) == 2 and parts[0] in sections and parts[1] in d[parts[0]]:
            node, name = d[parts[0]], parts[1]
        else:
            raise ConfigError(f"unknown config field {key!r}")
        node[name] = _parse_value(value, _field_type(key), key) if isinstance(value, str) else value
    return d


def _field_type(key: str) -> Any:
    """The resolved type annotation of a dotted field name (e.g. ``flex.threshold`` -> float)."""
    section, _, name = key.rpartition(".")
    classes = {"": ModelConfig, "vision": VisionConfig, "text": TextConfig, "projector": ProjectorConfig, "flex": FlexConfig}
    return typing.get_type_hints(classes[section])[name]


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


# ---- readers for checkpoint configs --------------------------------------------------------

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


def _vision_from_clip(d: dict[str, Any], where: str) -> VisionConfig:
    if "vision_config" in d and isinstance(d["vision_config"], dict):  # a full CLIPModel config
        d = d["vision_config"]
    return VisionConfig(
        hidden_size=_require(d, "hidden_size", where),
        intermediate_size=_require(d, "intermediate_size", where),
        num_layers=_require(d, "num_hidden_layers", where),
        num_heads=_require(d, "num_attention_heads", where),
        image_size=_require(d, "image_size", where),
        patch_size=_require(d, "patch_size", where),
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "quick_gelu"),
    )


def _text_from_llama(d: dict[str, Any], where: str) -> TextConfig:
    hidden = _require(d, "hidden_size", where)
    heads = _require(d, "num_attention_heads", where)
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = rope.get("factor", scaling.get("factor", 1.0))
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_type not in ("default", "linear", "dynamic"):
        raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported (default, linear, dynamic)")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={d['hidden_act']!r}; the Llama decoder here uses silu")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias/mlp_bias are not supported (Llama has no biases)")
    return TextConfig(
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
        rope_scaling_factor=_float(factor),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
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
        _check_keys(FlexConfig, flex_kwargs, f"{where} extra")
        d_cfg["flex"] = {**d_cfg["flex"], **flex_kwargs}
    elif extra:
        raise ConfigError(f"{where}: 'extra' has FlexAttention fields {sorted(extra)} but no zoom_ratio")
    if overrides:
        d_cfg = _override_dict(d_cfg, overrides)
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
