"""The optimizer: AdamW, linear warm-up then cosine decay, global-norm clipping, frozen groups.

Frozen parameters go through ``optax.partition`` to ``optax.set_to_zero()``, so they have no
optimizer state at all (no Adam moments); the loss also wraps them in ``stop_gradient``.
"""

from __future__ import annotations

import math
import re

import jax
import optax
from jaxtyping import PyTree

from flexattn_jax.lora import is_adapter
from flexattn_jax.quant import is_scale
from train.config import TrainConfig

TRAIN, FROZEN = "train", "frozen"
_HR = re.compile(r"/(k_hr|v_hr)/")


def is_trainable(path: str, trainable: str) -> bool:
    """Whether the parameter at ``path`` (``flatten``'s slash-joined name) trains under ``trainable`` (LoRA adapters always)."""
    if is_adapter(path):  # LoRA adapters exist only to train
        return True
    if is_scale(path):  # a quantised kernel's scales: the frozen base
        return False
    groups = {g.strip() for g in trainable.split(",") if g.strip()}
    if "all" in groups:
        return True
    if path.startswith("vision/"):
        return "vision" in groups
    if path.startswith("projector/"):
        return "projector" in groups
    if path.startswith("text/"):
        return "llm" in groups or ("hr" in groups and bool(_HR.search(path)))
    return False


def trainable_mask(params: PyTree, trainable: str) -> PyTree:
    """Same tree as ``params`` with Python bools: True where the parameter trains."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = [is_trainable(jax.tree_util.keystr(p, simple=True, separator="/"), trainable) for p, _ in flat]
    if not any(mask):
        raise ValueError(f"trainable={trainable!r} selects no parameter")
    return jax.tree_util.tree_unflatten(treedef, mask)


def param_labels(params: PyTree, trainable: str) -> PyTree:
    """``'train'`` / ``'frozen'`` per parameter, for ``optax.partition``."""
    return jax.tree.map(lambda m: TRAIN if m else FROZEN, trainable_mask(params, trainable))


def total_steps(tcfg: TrainConfig, num_samples: int | None) -> int:
    """Optimizer steps of the run: ``steps``, else ``epochs * floor(num_samples / batch_size)``."""
    if tcfg.steps is not None:
        return int(tcfg.steps)
    if not num_samples:
        raise ValueError("without --steps the number of samples must be known (epochs x samples / batch)")
    per_epoch = num_samples // tcfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_samples} samples make no batch of {tcfg.batch_size}")
    return max(1, int(math.floor(tcfg.epochs * per_epoch)))


def warmup_steps(tcfg: TrainConfig, steps: int) -> int:
    """``warmup_steps`` or ``ceil(warmup_ratio * steps)`` (the HF Trainer's rounding)."""
    if tcfg.warmup_steps is not None:
        return int(tcfg.warmup_steps)
    return int(math.ceil(tcfg.warmup_ratio * steps))


def make_schedule(tcfg: TrainConfig, steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr`` then cosine decay to ``end_lr_ratio * lr`` at ``steps``."""
    warm = min(warmup_steps(tcfg, steps), steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.lr, warmup_steps=warm, decay_steps=max(steps, warm + 1),
        end_value=tcfg.lr * tcfg.end_lr_ratio,
    )


def make_optimizer(tcfg: TrainConfig, params: PyTree, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: clipped AdamW on trainable leaves, ``set_to_zero`` (no state) on frozen ones."""
    schedule = make_schedule(tcfg, steps)
    parts = []
    if tcfg.clip_norm:  # none or 0: no clipping
        parts.append(optax.clip_by_global_norm(tcfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay))
    tx = optax.partition({TRAIN: optax.chain(*parts), FROZEN: optax.set_to_zero()}, param_labels(params, tcfg.trainable))
    return tx, schedule


def opt_state_shardings(opt_state: PyTree, params: PyTree, param_shardings: PyTree, default: jax.sharding.Sharding) -> PyTree:
    """Sharding per optimizer-state leaf: a moment of parameter ``p`` gets ``p``'s sharding, the rest ``default``.

    The parameter is found from the leaf's trailing dict keys (optax states mirror the params tree).
    """
    flat_p, _ = jax.tree_util.tree_flatten_with_path(params)
    shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in flat_p}
    flat_s = dict(zip(shapes, jax.tree.leaves(param_shardings), strict=True))
    flat, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    out = []
    for path, leaf in flat:
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(str(k.key))
        name = "/".join(reversed(keys))
        out.append(flat_s[name] if name in shapes and tuple(shapes[name]) == tuple(leaf.shape) else default)
    return jax.tree_util.tree_unflatten(treedef, out)
