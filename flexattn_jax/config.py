"""Model configuration: the frozen dataclass tree (:class:`ModelConfig` and its sections) and its validation.

One `ModelConfig` describes everything the model computes. Beside it: :mod:`flexattn_jax.hf_config`
builds one from a checkpoint's own ``config.json`` (llava-hf, original LLaVA-1.5, the FlexAttention
release), and :mod:`flexattn_jax.overrides` applies the CLI's dotted ``--set key=value`` strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_TOKEN_INDEX_ORIGINAL = -200  # LLaVA's tokenizer_image_token() placeholder id
IGNORE_INDEX = -100


class ConfigError(ValueError):
    """A config is missing a field, has an unknown one, or contradicts itself."""


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower: CLIP (class token, pre-LayerNorm, bias-free patch conv) or SigLIP (no class token,
    no pre-LayerNorm, a biased patch conv); both pre-LN ViTs with the same layers."""

    model_type: Literal["clip", "siglip"] = "clip"
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
    def class_token(self) -> bool:
        """CLIP puts a class token before the patches; SigLIP has none."""
        return self.model_type == "clip"

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    """The decoder: Llama (Vicuna, Llama-3), Mistral or Qwen2, which share one layer.

    ``model_type`` names the family (exported as the HF ``model_type``). ``attention_bias``: biases on
    q/k/v (Qwen2), and then on FlexAttention's HR k/v projections too. ``sliding_window``: Mistral's
    window; the attention here is full causal, so a context longer than the window is refused
    (:func:`check_context`). ``rope_scaling_type='llama3'`` is Llama-3.1's frequency scaling with
    ``rope_low_freq_factor`` / ``rope_high_freq_factor`` / ``rope_original_max_position_embeddings``.
    """

    model_type: Literal["llama", "mistral", "qwen2"] = "llama"
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_type: Literal["default", "linear", "dynamic", "llama3"] = "default"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    sliding_window: int | None = None


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def check_context(t: TextConfig, length: int) -> None:
    """Raise ValueError when ``length`` key slots exceed the decoder's sliding window (full causal attention here)."""
    if t.sliding_window is not None and length > t.sliding_window:
        raise ValueError(
            f"a context of {length} tokens exceeds text.sliding_window={t.sliding_window} (sliding_window in config.json); "
            "sliding-window attention is not implemented: keep prompt + generated tokens within the window"
        )


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
    costs the same all-M path (see ``hierarchical.DecoderLayer._attend``): the same as K = M.
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
    ``train_hr_budget`` (off: ``None``, the release projects all M): with many select rows (training), project
    and attend only the union of the HR tokens the sample's select rows selected, packed (cell by cell) into
    that static number U of slots (a fraction of M or a count); exact whenever every sample's union fits, and
    when one does not the layer takes the all-M path instead (``lax.cond``, both compiled): never truncated.
    ``train_hr_fallback=False`` compiles the packed path alone: for cost analysis only (XLA counts the
    conditional as its all-M branch), not exact when a union does not fit.
    ``hr_kernel_block_share``: the share of (query block, key block) pairs the Pallas HR kernel's cost estimate
    counts as executed (``attention_impl='splash_hr'``; which blocks are skipped is known only at run time):
    1.0, every block, is the upper bound; ``bench/hr_kernel.py`` measures the share on selection masks. It feeds
    the compiler's time estimate only; results do not depend on it.
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
    train_hr_budget: float | int | None = None
    train_hr_fallback: bool = True
    hr_kernel_block_share: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.hr_ladder, list):  # from JSON / to_dict round trips: keep the config hashable (a jit static)
            object.__setattr__(self, "hr_ladder", tuple(self.hr_ladder))


ADAPTIVE = "adaptive"


def _budget_tokens(budget: float | int, m: int) -> int:
    """A budget in HR tokens: a float is a fraction of M (rounded up), an int a count; clipped to [1, M]."""
    return max(1, min(m, math.ceil(budget * m) if isinstance(budget, float) else int(budget)))


ATTENTION_IMPLS = ("xla", "xla_chunked", "cudnn", "splash", "splash_hr", "auto")


@dataclass(frozen=True)
class ModelConfig:
    """The whole LLaVA(-FlexAttn) model.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters.
    ``scan_layers`` scans the decoder stacks (one compile for any depth); ``False`` unrolls them
    (used for XLA cost analysis, which counts a loop body once). ``attention_impl`` picks the kernel
    of the decoder's main causal attention (:func:`flexattn_jax.attention.attention`): ``auto`` takes
    cuDNN on GPU, splash on TPU, the XLA paths on CPU (dense for short sequences: the reference).
    ``splash_hr`` is splash for the main part and the Pallas HR kernel
    (:mod:`flexattn_jax.kernels.hr_attention`) for the select rows' HR part.
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
    remat_policy: Literal["none", "full", "dots_saveable"] = "none"
    attention_impl: Literal["xla", "xla_chunked", "cudnn", "splash", "splash_hr", "auto"] = "auto"
    lora_dropout: float = 0.0  # LoRA dropout on the adapters' input, applied only under a 'lora_dropout' rng (training)

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def lr_grid(self) -> int:
        """Side of the low-resolution token grid (24 for CLIP-L/14-336)."""
        return self.vision.grid_size

    @property
    def num_image_tokens(self) -> int:
        """LR image tokens placed in the sequence per image: the tower's tokens (576 + the class token for
        CLIP-L/14-336, 729 for SigLIP-384/14), less the first one with 'default' (as transformers' LLaVA does)."""
        tokens = self.vision.num_patches + (1 if self.vision.class_token else 0)
        return tokens - (1 if self.vision_feature_select_strategy == "default" else 0)

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
    def mask_layers(self) -> range:
        """Layers whose selection mask a later (hierarchical) layer attends with: ``first_select_layer`` .. L-2."""
        return range(self.flex.first_select_layer, self.text.num_layers - 1)

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
    def train_hr_tokens(self) -> int | None:
        """``flex.train_hr_budget`` in HR tokens, U (``None``: off, every layer projects all M)."""
        u = self.flex.train_hr_budget
        return None if u is None else _budget_tokens(u, self.num_hr_tokens)

    @property
    def hr_budget_tokens(self) -> int:
        """K: the static number of HR keys a select row attends to ('adaptive': M, the width of the
        selection carried between layers; each layer attends to its rung's K <= M)."""
        budget, m = self.flex.hr_budget, self.num_hr_tokens
        if budget is None or budget == ADAPTIVE:
            return m
        return _budget_tokens(budget, m)

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
        if d.get("remat_policy") == "nothing_saveable":  # the alias of 'full' that configs written before 2026-12 may hold
            d = {**d, "remat_policy": "full"}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key not in names:
                raise ConfigError(f"unknown ModelConfig field {key!r}")
            if key in subs:
                if not isinstance(value, dict):
                    raise ConfigError(f"config field {key!r} must be an object of fields, got {type(value).__name__}")
                check_keys(subs[key], value, key)
                kwargs[key] = subs[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def check_keys(cls: type, d: dict[str, Any], where: str) -> None:
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
             "rms_norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_max_position_embeddings", "max_position_embeddings"),
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
    if v.image_size % v.patch_size and v.class_token:  # SigLIP-so400m is 384 px in 14 px patches: its conv drops the 6 px left
        raise ConfigError(f"vision.image_size={v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    if not -(v.num_layers + 1) <= cfg.vision_feature_layer <= v.num_layers or cfg.vision_feature_layer % (v.num_layers + 1) == 0:
        raise ConfigError(f"vision_feature_layer={cfg.vision_feature_layer} is out of range for {v.num_layers} CLIP layers")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: use 'default' or 'full'")
    if t.rope_scaling_type not in ROPE_TYPES:
        raise ConfigError(f"text.rope_scaling_type={t.rope_scaling_type!r}: supported are {', '.join(ROPE_TYPES)}")
    if t.rope_scaling_type == "llama3" and t.rope_high_freq_factor <= t.rope_low_freq_factor:
        raise ConfigError(f"text.rope_high_freq_factor={t.rope_high_freq_factor} must exceed text.rope_low_freq_factor="
                          f"{t.rope_low_freq_factor} (llama3 rope scaling)")
    sw = t.sliding_window
    if sw is not None and (isinstance(sw, bool) or not isinstance(sw, numbers.Integral) or sw <= 0):
        raise ConfigError(f"text.sliding_window={sw!r}: use null (none) or a positive number of tokens")
    if cfg.projector.type not in ("mlp2x_gelu", "linear"):
        raise ConfigError(f"projector.type={cfg.projector.type!r}: supported are mlp2x_gelu, linear")
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: use float32, bfloat16 or float16")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl={cfg.attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout={cfg.lora_dropout!r}: use a probability in [0, 1)")
    if not f.enabled:
        return
    if f.lowres_size != v.image_size:
        raise ConfigError(f"flex.lowres_size={f.lowres_size} must equal vision.image_size={v.image_size} (the LR view is CLIP's input)")
    if f.highres_size > f.lowres_size and f.highres_size != f.zoom_ratio * f.lowres_size:
        raise ConfigError(
            f"flex.highres_size={f.highres_size} != flex.zoom_ratio={f.zoom_ratio} x flex.lowres_size={f.lowres_size}"
        )
    if cfg.num_image_tokens != v.num_patches:
        want = "default" if v.class_token else "full"
        raise ConfigError(
            f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: FlexAttention needs the square grid of "
            f"patch tokens, which a {v.model_type} tower gives with {want!r}"
        )
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
    u = f.train_hr_budget
    if u is not None and (isinstance(u, (bool, str)) or (isinstance(u, float) and not 0 < u <= 1) or (isinstance(u, int) and u < 1)):
        raise ConfigError(f"flex.train_hr_budget={u!r}: use None (off: all M), a fraction of M in (0, 1] or a positive count")
    share = f.hr_kernel_block_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ConfigError(f"flex.hr_kernel_block_share={share!r}: use the HR kernel's active block share in (0, 1] (1.0: every block)")
    ladder = f.hr_ladder
    if (not isinstance(ladder, tuple) or not ladder
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1 for x in ladder)):
        raise ConfigError(f"flex.hr_ladder={ladder!r}: use a non-empty list of fractions of M in (0, 1] (M is always the top rung)")
    if isinstance(f.hr_step_cells, bool) or not isinstance(f.hr_step_cells, int) or f.hr_step_cells < 0:
        raise ConfigError(f"flex.hr_step_cells={f.hr_step_cells!r}: use a count >= 0 of pooled cells per decode step")
