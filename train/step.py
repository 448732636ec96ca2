"""The sharded train step: state, loss, gradient accumulation, one jitted update with explicit shardings.

A record's optional ``box`` adds a grounding term (``grounding_weight``; see :func:`loss_sums`), normalised
by the batch's grounded rows counted up front, so accumulation stays exact with it too.
A step takes a batch laid out ``(A, Bm, ...)``: A microbatches (``grad_accum``) of Bm samples
(global), the Bm axis sharded over ``('data', 'fsdp')``. Gradients of the summed token
cross-entropy are accumulated in fp32 by a ``lax.scan`` over the microbatches and divided by the
total number of answer tokens, so accumulating A microbatches equals one batch A times larger.
Only trainable leaves are differentiated; frozen ones (``stop_gradient``) come back bit-identical.
The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Float, Int, PyTree

from flexattn_jax import lora as L
from flexattn_jax import quant as Q
from flexattn_jax import sharding as S
from flexattn_jax.config import IGNORE_INDEX, ModelConfig
from flexattn_jax.model import forward
from flexattn_jax.params import abstract_params, flatten, unflatten
from flexattn_jax.selection import answer_targets, grounded_rows, grounding_cross_entropy
from train.config import TrainConfig
from train.optim import make_optimizer, opt_state_shardings, trainable_mask

BATCH_KEYS: tuple[str, ...] = (
    "input_ids", "labels", "attention_mask", "pixel_values", "margin", "select_rows", "select_valid", "grounding",
)


class TrainState(NamedTuple):
    """Everything a step updates: step counter, fp32 master parameters, optimizer state."""

    step: Int[Array, ""]
    params: PyTree
    opt_state: PyTree


def alpha_at(cfg: ModelConfig, step: Int[Array, ""] | int, steps_per_epoch: int) -> Float[Array, ""]:
    """FlexAttention's blend weight for the optimizer update that follows ``step`` updates.

    ``'release'``: ``min(1, epochs_done * warmup)`` with ``epochs_done = step / steps_per_epoch``, the
    value the release's bundled HF ``Trainer`` passes as ``inputs["step"] = self.state.epoch``: 0 for
    every microbatch of the first update, then ``epoch + (batches done in the epoch) / (batches per
    epoch)`` set after each update, so all microbatches of one accumulated update share it and it keeps
    growing across epochs (it is a function of the saved step: a resume continues it).
    ``'constant'``: 1 at every step (the select output alone, as at evaluation).
    """
    if cfg.flex.alpha_schedule == "constant":
        return jnp.float32(1.0)
    epochs_done = jnp.asarray(step, jnp.float32) / jnp.float32(max(int(steps_per_epoch), 1))
    return jnp.minimum(jnp.float32(1.0), epochs_done * jnp.float32(cfg.flex.warmup))


class LossSums(NamedTuple):
    """One microbatch's sums: answer-token cross-entropy and, with grounding, the maps' cross-entropy."""

    ce: Float[Array, ""]
    tokens: Int[Array, ""]
    grounding: Float[Array, ""]
    grounding_rows: Int[Array, ""]


def loss_sums(
    params: PyTree, cfg: ModelConfig, batch: Mapping[str, jax.Array], alpha: Float[Array, ""], rng: jax.Array | None = None,
    grounding: bool = False,
) -> LossSums:
    """The training objective's sums for one batch (:class:`LossSums`).

    Row t predicts token t+1; a target counts when ``labels[t+1] != IGNORE_INDEX``. Logits are fp32.
    With ``grounding`` (FlexAttention only), the select rows' maps of every layer whose mask a later
    layer uses (``first_select_layer`` .. L-2) are scored against ``batch['grounding']``
    (:func:`flexattn_jax.selection.grounding_cross_entropy`); samples without a box add nothing.
    """
    out = forward(
        params, cfg, batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"],
        margin=batch.get("margin"), select_rows=batch.get("select_rows"), select_valid=batch.get("select_valid"),
        alpha=alpha, rng=rng, return_maps=grounding,
    )
    logits = out.logits[:, :-1].astype(jnp.float32)
    targets = batch["labels"][:, 1:]
    valid = answer_targets(batch["labels"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    g_sum, g_rows = jnp.float32(0.0), jnp.int32(0)
    if grounding:
        layers = cfg.mask_layers
        maps = out.image_attention[layers.start : layers.stop]
        g_sum, g_rows = grounding_cross_entropy(maps, batch["grounding"], batch["select_valid"])
    return LossSums(jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid.astype(jnp.int32)), g_sum, g_rows)


def token_loss_sums(
    params: PyTree, cfg: ModelConfig, batch: Mapping[str, jax.Array], alpha: Float[Array, ""], rng: jax.Array | None = None
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """``(sum of next-token cross-entropy over answer tokens, number of answer tokens)`` for one batch."""
    sums = loss_sums(params, cfg, batch, alpha, rng)
    return sums.ce, sums.tokens


@dataclasses.dataclass
class StepFns:
    """A compiled-on-demand train step and what placing data for it needs."""

    cfg: ModelConfig
    tcfg: TrainConfig  # only the step-relevant fields (STEP_FIELDS) are meaningful here
    mesh: Mesh
    total_steps: int
    steps_per_epoch: int  # optimizer steps per data epoch: the unit of FlexAttention's alpha warm-up
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mask: PyTree  # Python bools, True = trainable
    param_shardings: PyTree
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
    step: Any  # jitted (state, batch) -> (state, metrics)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        """Sharding of one ``(A, Bm, ...)`` batch array: Bm over (data, fsdp)."""
        return S.batch_sharding(self.mesh, shape, batch_dim=1)

    def place_params(self, params: PyTree) -> PyTree:
        """Parameters as the state holds them, placed by the rules table (a jitted cast, no host copy).

        Trainable leaves become fp32 masters (``cfg.param_dtype``). With LoRA, a tree without adapters gets fresh
        ones (:func:`flexattn_jax.lora.init_adapters`, from ``seed``), the frozen base is cast to the compute dtype
        (never fp32 unless that is the compute dtype) and, with ``base_quant``, quantised (:mod:`flexattn_jax.quant`).
        """
        target = self.abstract_state.params
        lcfg = self.tcfg.lora

        def prepare(p):
            if lcfg.enabled:
                base, adapters = L.split_adapters(p)
                if lcfg.base_quant != "none" and not Q.is_quantized(base):
                    base = Q.quantize_params(base, lcfg.base_quant, targets=Q.QUANT_TARGETS)
                if not adapters:
                    adapters = L.init_adapters(base, lcfg, jax.random.key(self.tcfg.seed), self.cfg.param_dtype)
                p = L.with_adapters(base, adapters)
            return jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), p, target)

        return jax.jit(prepare, out_shardings=self.param_shardings)(params)

    def saved_state(self, state: TrainState) -> TrainState:
        """What a checkpoint holds: the whole state, or with LoRA only the trainable leaves (adapters and named groups)."""
        if not self.tcfg.lora.enabled:
            return state
        flat = flatten(state.params)
        keep = flatten(self.mask)
        return state._replace(params=unflatten({k: v for k, v in flat.items() if keep[k]}))

    @property
    def abstract_saved(self) -> TrainState:
        """Restore target of :meth:`saved_state` (shapes, dtypes, shardings)."""
        return self.saved_state(self.abstract_state)

    def from_saved(self, saved: TrainState, params: PyTree | None) -> TrainState:
        """The full state from a restored :meth:`saved_state`; with LoRA the frozen base comes from ``params``."""
        if not self.tcfg.lora.enabled:
            return saved
        if params is None:
            raise ValueError("resuming a LoRA run needs the base model's parameters (its checkpoints hold only the adapters)")
        full = flatten(self.place_params(L.split_adapters(params)[0]))
        full.update(flatten(saved.params))
        return saved._replace(params=unflatten(full))

    def init_state(self, params: PyTree) -> TrainState:
        """A fresh state (step 0, zero moments) from parameters, placed on the mesh."""
        params = self.place_params(params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step, params, opt_state)


# TrainConfig fields the step depends on (the rest are loop settings): the cache key of make_step.
STEP_FIELDS: tuple[str, ...] = (
    "lr", "warmup_ratio", "warmup_steps", "end_lr_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps",
    "clip_norm", "trainable", "seed", "nan_check", "grounding_weight", "lora",
)


def train_abstract_params(cfg: ModelConfig, tcfg: TrainConfig) -> PyTree:
    """The state's parameter tree (``ShapeDtypeStruct`` leaves): :func:`abstract_params`, and with LoRA the adapters
    (``param_dtype``), the frozen leaves in the compute dtype ``cfg.dtype`` and, with ``base_quant``, quantised."""
    abstract = abstract_params(cfg)
    lcfg = tcfg.lora
    if not lcfg.enabled:
        return abstract
    mask = flatten(trainable_mask(abstract, tcfg.trainable))
    flat = {k: a if mask[k] else jax.ShapeDtypeStruct(a.shape, jnp.dtype(cfg.dtype)) for k, a in flatten(abstract).items()}
    base = unflatten(flat)
    if lcfg.base_quant != "none":
        base = Q.quantized_abstract(base, lcfg.base_quant, targets=Q.QUANT_TARGETS)
    adapters = jax.eval_shape(lambda: L.init_adapters(abstract, lcfg, jax.random.key(0), cfg.param_dtype))
    return L.with_adapters(base, adapters)


def make_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh, total_steps: int, steps_per_epoch: int | None = None) -> StepFns:
    """Build the optimizer, the state shardings and the jitted step for ``cfg`` on ``mesh`` (cached).

    Parameters are the tree of :func:`abstract_params` of ``cfg``, fp32 masters when
    ``cfg.param_dtype`` is float32 (compute in ``cfg.dtype``). ``steps_per_epoch`` (optimizer steps
    per pass over the data; default ``total_steps``: the run is one epoch) paces the alpha warm-up
    (:func:`alpha_at`). Calls with the same model config, step-relevant train settings
    (:data:`STEP_FIELDS`), mesh and step counts share one jitted step.
    """
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
    key = tuple(getattr(tcfg, f) for f in STEP_FIELDS)
    return _make_step(cfg, key, mesh, int(total_steps), int(steps_per_epoch or total_steps))


@functools.lru_cache(maxsize=16)
def _make_step(cfg: ModelConfig, key: tuple, mesh: Mesh, total_steps: int, steps_per_epoch: int) -> StepFns:
    tcfg = TrainConfig(**dict(zip(STEP_FIELDS, key, strict=True)))
    abstract = train_abstract_params(cfg, tcfg)
    tx, schedule = make_optimizer(tcfg, abstract, total_steps)
    mask = trainable_mask(abstract, tcfg.trainable)
    p_shard = S.param_shardings(abstract, mesh)
    repl = S.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    o_shard = opt_state_shardings(abstract_opt, abstract, p_shard, repl)
    state_shardings = TrainState(repl, p_shard, o_shard)
    abstract_state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        S.abstract_with_shardings(abstract, p_shard),
        S.abstract_with_shardings(abstract_opt, o_shard),
    )
    mask_leaves = jax.tree.leaves(mask)
    train_shardings = [s for s, m in zip(jax.tree.leaves(p_shard), mask_leaves, strict=True) if m]
    lcfg = tcfg.lora
    fwd_cfg = dataclasses.replace(cfg, lora_dropout=lcfg.dropout) if lcfg.enabled else cfg
    use_rng = (cfg.flex.enabled and cfg.flex.selection == "random") or fwd_cfg.lora_dropout > 0
    grounding = tcfg.grounding_weight > 0
    if grounding and not cfg.flex.enabled:
        raise ValueError(f"grounding_weight={tcfg.grounding_weight} trains the selection maps: it needs FlexAttention "
                         "(flex.enabled)")
    base_key = jax.random.key(tcfg.seed)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        leaves, treedef = jax.tree.flatten(state.params)
        trainable = [x for x, m in zip(leaves, mask_leaves, strict=True) if m]
        frozen = [jax.lax.stop_gradient(x) for x, m in zip(leaves, mask_leaves, strict=True) if not m]
        alpha = alpha_at(cfg, state.step, steps_per_epoch)
        step_key = jax.random.fold_in(base_key, state.step)

        # the objective is  CE sum / answer tokens + weight x grounding sum / grounded rows,  both counted over the
        # whole batch up front, so that gradients summed over microbatches and divided by the answer tokens give it
        # exactly for any grad_accum
        g_scale = jnp.float32(0.0)
        if grounding:
            tokens = jnp.sum(answer_targets(batch["labels"]).astype(jnp.float32))
            maps = len(cfg.mask_layers) * jnp.sum(grounded_rows(batch["grounding"], batch["select_valid"]).astype(jnp.float32))
            g_scale = tcfg.grounding_weight * tokens / jnp.maximum(maps, 1.0)

        def loss_fn(train_leaves, mb, key):
            it_t, it_f = iter(train_leaves), iter(frozen)
            full = [next(it_t) if m else next(it_f) for m in mask_leaves]
            params = jax.tree.unflatten(treedef, full)
            if lcfg.enabled:  # the forward takes B scaled by alpha / r; the optimizer sees PEFT's unscaled B
                params = L.scaled(params, lcfg.scale)
            sums = loss_sums(params, fwd_cfg, mb, alpha, key if use_rng else None, grounding=grounding)
            return sums.ce + g_scale * sums.grounding, (sums.ce, sums.tokens, sums.grounding, sums.grounding_rows)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n_micro = batch["input_ids"].shape[0]
        if n_micro == 1:
            (_, (loss_sum, count, g_sum, g_rows)), grads = grad_fn(trainable, jax.tree.map(lambda x: x[0], batch), step_key)
            grads = [g.astype(jnp.float32) for g in grads]
        else:

            def body(carry, xs):
                g_acc, *sums = carry
                mb, i = xs
                (_, mb_sums), g = grad_fn(trainable, mb, jax.random.fold_in(step_key, i))
                g_acc = [a + b.astype(jnp.float32) for a, b in zip(g_acc, g, strict=True)]
                g_acc = [jax.lax.with_sharding_constraint(a, sh) for a, sh in zip(g_acc, train_shardings, strict=True)]
                return (g_acc, *(a + b for a, b in zip(sums, mb_sums, strict=True))), None

            zeros = [jnp.zeros(x.shape, jnp.float32) for x in trainable]
            init = (zeros, jnp.float32(0.0), jnp.int32(0), jnp.float32(0.0), jnp.int32(0))
            (grads, loss_sum, count, g_sum, g_rows), _ = jax.lax.scan(body, init, (batch, jnp.arange(n_micro)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = [g / denom for g in grads]
        loss = loss_sum / denom
        grad_norm = optax.global_norm(grads)
        it_g = iter(grads)
        full_grads = [next(it_g).astype(x.dtype) if m else jnp.zeros_like(x) for x, m in zip(leaves, mask_leaves, strict=True)]
        updates, new_opt = tx.update(jax.tree.unflatten(treedef, full_grads), state.opt_state, state.params)
        # optax.apply_updates on the trainable leaves; frozen ones (quantised ints among them) come back bit-identical
        new_leaves = [jnp.asarray(x + u).astype(x.dtype) if m else x
                      for x, u, m in zip(leaves, jax.tree.leaves(updates), mask_leaves, strict=True)]
        new_state = TrainState(state.step + 1, jax.tree.unflatten(treedef, new_leaves), new_opt)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if tcfg.nan_check:  # a non-finite step leaves the state untouched; the loop then stops
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "alpha": alpha, "answer_tokens": count, "finite": finite,
        }
        if grounding:
            metrics["grounding"] = g_sum / jnp.maximum(g_rows, 1).astype(jnp.float32)  # the maps' mean cross-entropy
        return new_state, metrics

    step = S.OnMesh(jax.jit(  # traced with the mesh ambient: kernels for its devices, under shard_map
        train_step,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    ), mesh)
    return StepFns(cfg, tcfg, mesh, total_steps, steps_per_epoch, tx, schedule, mask, p_shard, state_shardings, abstract_state, step)


# ---- host batches -> global arrays ------------------------------------------------------------------

def split_microbatches(batch: Mapping[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """Host batch ``(B_local, ...)`` -> ``(A, B_local / A, ...)`` (sample i goes to microbatch i // (B/A))."""
    out = {}
    for k in BATCH_KEYS:
        if k not in batch:
            continue
        x = np.asarray(batch[k])
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch[{k!r}] has {x.shape[0]} rows, not a multiple of grad_accum={grad_accum}")
        out[k] = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    return out


def global_batch(fns: StepFns, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local ``(A, Bm_local, ...)`` arrays -> global ``(A, Bm, ...)`` arrays sharded over (data, fsdp).

    Uses ``jax.make_array_from_process_local_data``: each process passes its own slice of the batch.
    """
    n_proc = jax.process_count()
    out = {}
    for k, x in local.items():
        gshape = (x.shape[0], x.shape[1] * n_proc, *x.shape[2:])
        out[k] = jax.make_array_from_process_local_data(fns.batch_sharding(gshape), x, gshape)
    return out


def make_example_batch(cfg: ModelConfig, batch: int, seq_len: int, rows: int, grad_accum: int = 1) -> dict[str, np.ndarray]:
    """All-padding host batch of the right shapes and dtypes (for AOT lowering and FLOP counts)."""
    s = cfg.image_size
    b = batch
    return split_microbatches(
        {
            "input_ids": np.zeros((b, seq_len), np.int32),
            "labels": np.full((b, seq_len), IGNORE_INDEX, np.int32),
            "attention_mask": np.ones((b, seq_len), bool),
            "pixel_values": np.zeros((b, s, s, cfg.vision.num_channels), np.float32),
            "margin": np.zeros((b, 2), np.int32),
            "select_rows": np.zeros((b, rows), np.int32),
            "select_valid": np.zeros((b, rows), bool),
            "grounding": np.zeros((b, cfg.lr_grid**2), np.float32),
        },
        grad_accum,
    )


__all__ = [
    "BATCH_KEYS", "LossSums", "StepFns", "TrainState", "alpha_at", "global_batch", "loss_sums", "make_step",
    "split_microbatches", "token_loss_sums", "train_abstract_params",
]
