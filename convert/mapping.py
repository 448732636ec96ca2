"""The key-mapping table between PyTorch checkpoints and our parameter tree, used in both directions.

Every PyTorch key is first rewritten to a *canonical* name (the in-memory names of transformers 5.x
``LlavaForConditionalGeneration``, e.g. ``model.language_model.layers.3.self_attn.q_proj.weight``)
by a per-layout prefix table, then looked up in :data:`RULES`, which names our leaf and the
transform. Layer-indexed keys (``{i}``) fill slice ``i`` of the stacked leading axis.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flexattn_jax.config import ModelConfig

V = "model.vision_tower."
P = "model.multi_modal_projector."
T = "model.language_model."
H = "lm_head."


@dataclass(frozen=True)
class Rule:
    """One canonical PyTorch tensor name <-> one leaf of our tree (a slice of it when ``{i}`` is in ``hf``)."""

    hf: str
    ours: str
    kind: str  # 'copy' | 'linear' (weight.T) | 'conv' (OIHW <-> HWIO)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _rules() -> list[Rule]:
    r: list[Rule] = []

    def norm(hf: str, ours: str, bias: bool = True) -> None:
        r.append(Rule(f"{hf}.weight", f"{ours}/scale", "copy"))
        if bias:
            r.append(Rule(f"{hf}.bias", f"{ours}/bias", "copy"))

    def linear(hf: str, ours: str, bias: bool = True) -> None:
        r.append(Rule(f"{hf}.weight", f"{ours}/kernel", "linear"))
        if bias:
            r.append(Rule(f"{hf}.bias", f"{ours}/bias", "copy"))

    # vision tower: CLIP, or SigLIP (a patch-conv bias; no class embedding, no pre-LayerNorm)
    r.append(Rule(V + "embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"))
    r.append(Rule(V + "embeddings.patch_embedding.bias", "vision/patch_embed/bias", "copy"))
    r.append(Rule(V + "embeddings.class_embedding", "vision/class_embed", "copy"))
    r.append(Rule(V + "embeddings.position_embedding.weight", "vision/pos_embed/embedding", "copy"))
    norm(V + "pre_layrnorm", "vision/pre_norm")
    vl = V + "encoder.layers.{i}."
    for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
        linear(vl + f"self_attn.{hf}", f"vision/layers/attn/{ours}")
    norm(vl + "layer_norm1", "vision/layers/norm1")
    norm(vl + "layer_norm2", "vision/layers/norm2")
    linear(vl + "mlp.fc1", "vision/layers/mlp/fc1")
    linear(vl + "mlp.fc2", "vision/layers/mlp/fc2")
    norm(V + "post_layernorm", "vision/post_norm")
    # projector
    linear(P + "linear_1", "projector/linear_1")
    linear(P + "linear_2", "projector/linear_2")
    # Llama / Mistral / Qwen2 decoder (HF is rotate-half already: no q/k permutation); Qwen2 has q/k/v biases
    r.append(Rule(T + "embed_tokens.weight", "text/embed/embedding", "copy"))
    tl = T + "layers.{i}."
    norm(tl + "input_layernorm", "text/layers/input_norm", bias=False)
    attn = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("k_proj_hd", "k_hr"), ("v_proj_hd", "v_hr"))
    for hf, ours in attn:
        linear(tl + f"self_attn.{hf}", f"text/layers/attn/{ours}", bias=ours != "o")
    norm(tl + "post_attention_layernorm", "text/layers/post_norm", bias=False)
    for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        linear(tl + f"mlp.{hf}", f"text/layers/mlp/{ours}", bias=False)
    norm(T + "norm", "text/final_norm", bias=False)
    r.append(Rule(H + "weight", "text/lm_head/kernel", "linear"))
    return r


RULES: list[Rule] = _rules()
BY_HF: dict[str, Rule] = {rule.hf: rule for rule in RULES}
BY_OURS: dict[str, Rule] = {rule.ours: rule for rule in RULES}

# Source prefix -> canonical prefix, per layout. For export the first entry for a canonical prefix is
# used; later entries are aliases accepted on import.
LAYOUT_PREFIXES: dict[str, list[tuple[str, str]]] = {
    # transformers 5.x module names
    "hf5": [(V, V), (P, P), (T, T), (H, H), ("model.vision_tower.vision_model.", V)],
    # transformers 4.x names (llava-hf on the Hub); 5.x save_pretrained writes these but drops `vision_model.`
    "hf4": [
        ("vision_tower.vision_model.", V),
        ("multi_modal_projector.", P),
        ("language_model.model.", T),
        ("language_model.lm_head.", H),
        ("vision_tower.", V),
    ],
    # original LLaVA-1.5 / FlexAttention release (LlavaLlamaForCausalLM)
    "original": [
        ("model.mm_projector.0.", P + "linear_1."),
        ("model.mm_projector.2.", P + "linear_2."),
        ("model.", T),
        (H, H),
        ("model.vision_tower.vision_tower.vision_model.", V),  # vision tower saved inside the checkpoint
        ("model.mm_projector.", P + "linear_1."),  # mm_projector_type 'linear' (a bare nn.Linear)
    ],
    # a separate CLIP directory (CLIPVisionModel / CLIPModel save_pretrained, 4.x or 5.x)
    "clip": [("vision_model.", V), ("", V)],
}

# Keys that carry no parameters of ours; matched with re.search on the source key.
IGNORED: dict[str, list[str]] = {
    "all": [r"rotary_emb\.(original_)?inv_freq$", r"(^|\.)embeddings\.position_ids$"],
    # a full CLIPModel directory also holds the text tower and the projections
    "clip": [r"^text_model\.", r"^visual_projection\.", r"^text_projection\.", r"^logit_scale$"],
}

_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where a source tensor goes: our leaf, the stacked index (or None) and the rule."""

    leaf: str
    index: int | None
    rule: Rule


def canonical(key: str, layouts: list[str]) -> str | None:
    """Rewrite a source key to its canonical name by the longest matching prefix of ``layouts``."""
    best: tuple[str, str] | None = None
    for layout in layouts:
        for src, can in LAYOUT_PREFIXES[layout]:
            if key.startswith(src) and (best is None or len(src) > len(best[0])):
                best = (src, can)
    return None if best is None else best[1] + key[len(best[0]) :]


def is_ignored(key: str, extra: tuple[str, ...] = ()) -> bool:
    pats = IGNORED["all"] + [p for name in extra for p in IGNORED[name]]
    return any(re.search(p, key) for p in pats)


def lookup(canonical_name: str) -> Target | None:
    """The rule and layer index for a canonical name, or None when no rule matches."""
    m = _INDEX.search(canonical_name)
    if m is not None:
        rule = BY_HF.get(canonical_name[: m.start()] + ".{i}." + canonical_name[m.end() :])
        if rule is not None:
            return Target(rule.ours, int(m.group(1)), rule)
    rule = BY_HF.get(canonical_name)
    return None if rule is None else Target(rule.ours, None, rule)


def export_name(rule: Rule, index: int | None, layout: str, cfg: ModelConfig) -> str:
    """The key a leaf (slice) gets in ``layout``: the inverse of :func:`canonical` + :func:`lookup`."""
    name = rule.hf.replace("{i}", str(index)) if rule.stacked else rule.hf
    if layout == "original" and cfg.projector.type == "linear" and name.startswith(P + "linear_1."):
        return "model.mm_projector." + name[len(P + "linear_1.") :]
    best: tuple[str, str] | None = None
    for src, can in LAYOUT_PREFIXES[layout]:
        if name.startswith(can) and (best is None or len(can) > len(best[1])):
            best = (src, can)
    if best is None:
        raise KeyError(f"{name} has no prefix in layout {layout!r}")
    return best[0] + name[len(best[1]) :]


# ---- transforms --------------------------------------------------------------------------------

def to_ours(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """PyTorch layout -> ours."""
    return {"copy": lambda x: x, "linear": lambda x: x.T, "conv": lambda x: x.transpose(2, 3, 1, 0)}[kind]


def to_torch(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """Ours -> PyTorch layout (inverse of :func:`to_ours`)."""
    return {"copy": lambda x: x, "linear": lambda x: x.T, "conv": lambda x: x.transpose(3, 2, 0, 1)}[kind]


def torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a tensor whose shape in our layout is ``ours``."""
    if kind == "linear":
        return tuple(reversed(ours))
    if kind == "conv":
        h, w, i, o = ours
        return (o, i, h, w)
    return tuple(ours)
