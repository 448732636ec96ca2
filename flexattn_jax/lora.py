"""LoRA on the pure-functional parameter tree: adapters next to the kernels they adapt.

A target linear ``.../q/kernel`` of shape ``(L, in, out)`` (stacked decoder layers) gets two sibling
leaves, ``.../q/lora_a`` ``(L, in, r)`` and ``.../q/lora_b`` ``(L, r, out)``. The decoder's
:class:`flexattn_jax.text.Linear` computes ``x W + dropout(x) A B`` whenever they are present, so the
frozen base never changes form or dtype and no merged copy of ``W`` is made; the scale ``alpha / r``
is applied to ``B`` by :func:`scaled` (what the forward is given), never stored. These are PEFT's
semantics: ``lora_A.weight = lora_a.T``, ``lora_B.weight = lora_b.T``, ``A`` Kaiming-uniform, ``B``
zero, scaling ``alpha / r``, dropout on the adapter path's input only.

Defaults are the release's (LLaVA-1.5 ``train.py``): rank 64, alpha 16, dropout 0.05, every linear of
the language model (``find_all_linear_names``: q/k/v/o, gate/up/down and FlexAttention's
``k_proj_hd``/``v_proj_hd``; the projector, the vision tower and ``lm_head`` excluded).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from flexattn_jax.params import flatten, unflatten
from flexattn_jax.quant import MODES as QUANT_MODES

DEFAULT_TARGETS = r"^text/layers/(attn/(q|k|v|o|k_hr|v_hr)|mlp/(gate|up|down))$"
ADAPTER_LEAVES = ("lora_a", "lora_b")

# our module paths <-> the release's (PEFT's target_modules) module names
MODULE_NAMES: dict[str, str] = {
    "attn/q": "q_proj", "attn/k": "k_proj", "attn/v": "v_proj", "attn/o": "o_proj",
    "attn/k_hr": "k_proj_hd", "attn/v_hr": "v_proj_hd", "mlp/gate": "gate_proj", "mlp/up": "up_proj", "mlp/down": "down_proj",
}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (the release's flags ``lora_enable``, ``lora_r``, ``lora_alpha``, ``lora_dropout``)."""

    enabled: bool = False
    """Train adapters on the frozen base instead of the base itself."""
    rank: int = 64
    """Adapter rank r (``lora_r``)."""
    alpha: float = 16.0
    """Scale numerator: the adapter output is multiplied by ``alpha / rank`` (``lora_alpha``)."""
    dropout: float = 0.05
    """Dropout on the adapter path's input during training (``lora_dropout``)."""
    targets: str = DEFAULT_TARGETS
    """Regex over module paths (``text/layers/attn/q``; a kernel's path without ``/kernel``) that get adapters."""
    base_quant: Literal["none", "int8", "int4", "nf4"] = "none"
    """QLoRA: store the frozen base's decoder linears quantised (``none``, ``int8``, ``int4``, ``nf4``; see flexattn_jax.quant)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora targets {self.targets!r} is not a regex: {e}") from None
        if self.base_quant not in ("none", *QUANT_MODES):
            raise ValueError(f"base_quant={self.base_quant!r}: use none, {', '.join(QUANT_MODES)}")

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``: ``alpha / r``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_adapter(path: str) -> bool:
    """Whether ``path`` (a flattened parameter name) is a LoRA adapter leaf."""
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def target_modules(params: PyTree, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Module paths (``text/layers/attn/q``) whose ``kernel`` the regex ``targets`` selects; an error when none."""
    rx = re.compile(targets)
    mods = sorted(p[: -len("/kernel")] for p in flatten(params) if p.endswith("/kernel") and rx.search(p[: -len("/kernel")]))
    if not mods:
        raise ValueError(f"lora targets {targets!r} match no linear of the model (module paths like text/layers/attn/q)")
    return mods


def init_adapters(params: PyTree, lcfg: LoraConfig, key: jax.Array, dtype: str = "float32") -> dict[str, jax.Array]:
    """Fresh adapters ``{module/lora_a: (..., in, r), module/lora_b: (..., r, out)}`` for ``lcfg``'s targets.

    ``A`` is PEFT's default init (``kaiming_uniform(a=sqrt(5))``: U(-1/sqrt(in), 1/sqrt(in))), ``B`` zero,
    so a fresh adapter leaves the model's output unchanged.
    """
    flat = flatten(params)
    out = {}
    for i, mod in enumerate(target_modules(params, lcfg.targets)):
        w = flat[f"{mod}/kernel"]
        *lead, d_in, d_out = w.shape
        bound = 1.0 / np.sqrt(d_in)
        out[f"{mod}/lora_a"] = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, lcfg.rank), jnp.dtype(dtype),
                                                  -bound, bound)
        out[f"{mod}/lora_b"] = jnp.zeros((*lead, lcfg.rank, d_out), jnp.dtype(dtype))
    return out


def with_adapters(params: PyTree, adapters: dict[str, jax.Array]) -> PyTree:
    """``params`` plus the (flat-named) ``adapters``; an adapter of a module without a kernel is an error."""
    flat = flatten(params)
    for name in adapters:
        if f"{name.rsplit('/', 1)[0]}/kernel" not in flat:
            raise ValueError(f"adapter {name} has no kernel {name.rsplit('/', 1)[0]}/kernel in the model")
    return unflatten({**flat, **adapters})


def split_adapters(params: PyTree) -> tuple[PyTree, dict[str, jax.Array]]:
    """``(base tree, {flat name: adapter})``: the inverse of :func:`with_adapters`."""
    flat = flatten(params)
    return unflatten({k: v for k, v in flat.items() if not is_adapter(k)}), {k: v for k, v in flat.items() if is_adapter(k)}


def scaled(params: PyTree, scale: float | Float[Array, ""]) -> PyTree:
    """The tree the forward takes: every ``lora_b`` multiplied by ``scale`` (``alpha / r``). Differentiable."""
    flat = flatten(params)
    return unflatten({k: (v * jnp.asarray(scale, v.dtype) if k.endswith("/lora_b") else v) for k, v in flat.items()})


def delta(a: Float[Array, "*L i r"], b: Float[Array, "*L r o"], scale: float) -> Float[Array, "*L i o"]:
    """``scale * A B`` in fp32 (the weight change an adapter makes; ``(in, out)`` like the kernel)."""
    return scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def merge(params: PyTree, scale: float) -> PyTree:
    """PEFT's ``merge_and_unload``: ``W += scale * A B`` for every adapted kernel (its dtype kept); adapters removed."""
    base, adapters = split_adapters(params)
    flat = flatten(base)
    for name in adapters:
        if not name.endswith("/lora_a"):
            continue
        mod = name[: -len("/lora_a")]
        w = flat[f"{mod}/kernel"]
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"{mod}/kernel is quantised ({w.dtype}): dequantise the base before merging adapters into it")
        flat[f"{mod}/kernel"] = (w.astype(jnp.float32) + delta(adapters[name], adapters[f"{mod}/lora_b"], scale)).astype(w.dtype)
    return unflatten(flat)


__all__ = [
    "ADAPTER_LEAVES", "DEFAULT_TARGETS", "MODULE_NAMES", "LoraConfig", "delta", "init_adapters", "is_adapter",
    "merge", "scaled", "split_adapters", "target_modules", "with_adapters",
]
