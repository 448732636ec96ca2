"""The training loop: data -> global batches -> sharded step -> metrics, checkpoints, NaN guard.

``train(cfg, params, data, TrainConfig(...), mesh)`` is the Python API (the CLI and the demo use it).
``data`` is a :class:`train.data.TrainData` (grain: deterministic, resumable, process-sharded) or any
iterable of host batches (dicts of numpy arrays with the process-local batch first; a sequence is
cycled). Metrics of step s are read while step s+1 runs (one step of lag), except at save points.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jaxtyping import PyTree

from flexattn_jax import sharding as S
from flexattn_jax.config import IGNORE_INDEX, ModelConfig
from flexattn_jax.flops import lora_train_flops, mfu
from flexattn_jax.selection import learnable_rows
from train.checkpoint import Checkpointer, make_meta
from train.config import DataConfig, TrainConfig
from train.data import TrainData, grounding_note
from train.distributed import StepAgreement
from train.metrics import MetricsLogger, device_peak_tflops, train_flops
from train.optim import total_steps as count_steps
from train.step import BATCH_KEYS, StepFns, TrainState, global_batch, make_step, split_microbatches

_log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the state was not updated and no checkpoint was written for it."""

    def __init__(self, step: int, last_checkpoint: int | None, record: dict[str, Any]):
        self.step, self.last_checkpoint, self.record = step, last_checkpoint, record
        super().__init__(
            f"non-finite loss/grad norm at step {step} (loss={record.get('loss')}, grad_norm={record.get('grad_norm')}); "
            f"stopped; last good checkpoint: {last_checkpoint if last_checkpoint is not None else 'none'}"
        )


class TrainingStopped(Exception):  # noqa: N818 - a stop request, not an error
    """Training stopped at a stop request (Ctrl-C, SIGTERM) after the step in flight; its checkpoint was saved."""

    def __init__(self, step: int, saved: int | None, by_other: bool = False):
        self.step, self.saved = step, saved
        where = f"checkpoint of step {saved} saved" if saved is not None else "no checkpoint (no output directory)"
        who = " (another process of the run was asked to stop)" if by_other else ""
        super().__init__(f"stopped after step {step}{who}; {where}")


# ---- host batch helpers ------------------------------------------------------------------------------

def complete_batch(batch: Mapping[str, Any], cfg: ModelConfig, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Fill what a user batch may omit: attention mask (all ones), pixels (zeros), margin (zeros), the
    learnable rows (from the labels, samples with image tokens only) and grounding targets (zeros: none)."""
    out = {k: np.asarray(v) for k, v in batch.items() if not str(k).startswith("_")}
    if "input_ids" not in out or "labels" not in out:
        raise ValueError("a training batch needs at least 'input_ids' and 'labels'")
    b, t = out["input_ids"].shape
    out.setdefault("attention_mask", np.ones((b, t), bool))
    out["attention_mask"] = out["attention_mask"].astype(bool)
    s = cfg.image_size
    out.setdefault("pixel_values", np.zeros((b, s, s, cfg.vision.num_channels), np.float32))
    out.setdefault("margin", np.zeros((b, 2), np.int32))
    if "select_rows" not in out:
        r = min(max_rows or t, t)
        has_image = (out["input_ids"] == cfg.image_token_id).any(axis=1)
        packed = [learnable_rows(out["labels"][i], bool(has_image[i]), r) for i in range(b)]
        out["select_rows"] = np.stack([p[0] for p in packed])
        out["select_valid"] = np.stack([p[1] for p in packed])
    out.setdefault("select_valid", np.ones(out["select_rows"].shape, bool))
    out.setdefault("grounding", np.zeros((b, cfg.lr_grid**2), np.float32))
    return {k: out[k] for k in BATCH_KEYS}


def pad_to_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a host batch's sequence axis to ``length`` (multi-host bucket agreement)."""
    t = batch["input_ids"].shape[1]
    if t == length:
        return batch
    extra = length - t
    out = dict(batch)
    out["input_ids"] = np.pad(batch["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
    out["labels"] = np.pad(batch["labels"], ((0, 0), (0, extra)), constant_values=IGNORE_INDEX)
    out["attention_mask"] = np.pad(batch["attention_mask"], ((0, 0), (0, extra)), constant_values=False)
    r = batch["select_rows"].shape[1]
    if r == t:  # rows sized to the length: grow with it
        out["select_rows"] = np.pad(batch["select_rows"], ((0, 0), (0, extra)))
        out["select_valid"] = np.pad(batch["select_valid"], ((0, 0), (0, extra)), constant_values=False)
    return out


def _restore(ckpt: Checkpointer, fns: StepFns, cfg: ModelConfig, say: Any,
             params: PyTree | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The newest restorable state (on this run's mesh), past damaged steps. The data position is the step
    (:class:`train.data.TrainData` reads step s's global batch on any process count); this process's counters
    of late bad samples continue only when the step was saved with as many processes. A LoRA run's checkpoint
    holds the trainables only: the base is ``params``."""
    saved, meta = ckpt.restore_latest(fns.abstract_saved, None, cfg, say=say)
    state = fns.from_saved(saved, params)
    if meta.get("process_count", 1) != jax.process_count():
        meta.pop("data_state", None)
    return state, meta


def _existing(out_dir: Path) -> set[str]:
    """The run directory's entries this run may create ('.' = the directory itself) that exist already."""
    names = (".", "metrics.jsonl", "metrics.superseded.jsonl", "tensorboard", "checkpoints")
    return {n for n in names if (out_dir / n).exists()}


def _has_steps(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _remove_created(out_dir: Path, before: set[str]) -> None:
    """Remove what this run created under ``out_dir`` (nothing that existed before it)."""
    if "." not in before:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for n in ("metrics.jsonl", "metrics.superseded.jsonl", "tensorboard", "checkpoints"):
        if n not in before:
            p = out_dir / n
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _cycle(data: Iterable) -> Iterator:
    if isinstance(data, Sequence):
        return itertools.chain.from_iterable(itertools.repeat(data))
    return iter(data)


# ---- the loop ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Pending:
    step: int  # 1-based step number this update produces
    metrics: Any
    tokens: int
    flops: float
    compiled: bool
    extra: dict[str, Any]
    t_dispatch: float


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every step of one run reads: fixed from set-up to the summary."""

    cfg: ModelConfig
    tcfg: TrainConfig
    fns: StepFns
    data: TrainData | Iterable[Mapping[str, Any]]
    ckpt: Checkpointer | None
    logger: MetricsLogger
    data_config: DataConfig | None
    extra_meta: dict[str, Any] | None
    stop: Callable[[], bool]  # a stop request (polled before each step)
    start: int  # the step the run continues after (the restored checkpoint's; 0 for a fresh run)
    total: int  # the schedule's steps
    show: bool  # this process reports (logging on, process 0)
    peak_flops: float | None  # one device's peak FLOP/s (None: unknown, no MFU)
    vision_trains: bool  # whether the step trains CLIP (its backward is counted)

    @property
    def is_grain(self) -> bool:
        return isinstance(self.data, TrainData)

    @property
    def end(self) -> int:
        """The step this run stops after (``stop_at`` ends a run before its schedule does)."""
        return min(self.total, self.tcfg.stop_at) if self.tcfg.stop_at is not None else self.total

    @property
    def pad_to_max(self) -> bool:
        """Several hosts must pad to one length: needed with buckets, or for batches we did not make."""
        return jax.process_count() > 1 and (not self.is_grain or bool(self.data_config and self.data_config.buckets))


@dataclasses.dataclass
class _Ledger:
    """What the run has done so far."""

    last_saved: int | None  # the newest checkpoint's step
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    shapes: set[tuple] = dataclasses.field(default_factory=set)  # the global batch shapes compiled so far
    last_ready: float | None = None  # when the previous step's metrics were on the host (perf_counter)


def train(
    cfg: ModelConfig,
    params: PyTree | None,
    data: TrainData | Iterable[Mapping[str, Any]],
    tcfg: TrainConfig,
    mesh: Mesh | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = True,
    data_config: DataConfig | None = None,
    extra_meta: dict[str, Any] | None = None,
    log: bool = True,
    stop: Callable[[], bool] | None = None,
) -> tuple[PyTree, list[dict[str, Any]]]:
    """Train ``params`` on ``data``; return ``(params, per-step metric records)``.

    ``mesh`` defaults to ``make_mesh()`` (FSDP over all devices). Parameters are kept as fp32 masters
    (``cfg.param_dtype`` is set to float32; compute follows ``cfg.dtype``). With ``out_dir``, metrics go
    to ``out_dir/metrics.jsonl`` and TensorBoard, checkpoints to ``out_dir/checkpoints`` every
    ``save_every`` steps and at the end; with ``resume`` the latest checkpoint there (state and data
    position) is continued, and ``params`` may be None. Raises :class:`TrainingDiverged` on NaN/inf.
    FlexAttention's alpha warm-up (:func:`train.step.alpha_at`) counts epochs of ``data`` (its
    ``batches_per_epoch``, or the length of a sequence of batches); an unsized iterable is one epoch.
    ``stop()`` True (a Ctrl-C / SIGTERM flag, polled before each step) ends the run after the step in
    flight: its checkpoint is saved (with ``out_dir``) and :class:`TrainingStopped` is raised.
    With ``tcfg.lora`` enabled the checkpoints hold the adapters and the other trainables only, and a resume
    needs ``params`` (the base; :meth:`train.step.StepFns.from_saved`).
    """
    mesh = mesh or S.make_mesh()
    cfg = dataclasses.replace(cfg, param_dtype="float32")
    total, per_epoch = _plan(data, tcfg, mesh, log)
    fns = make_step(cfg, tcfg, mesh, total, per_epoch)
    primary = jax.process_index() == 0
    out = Path(out_dir) if out_dir else None
    before = _existing(out) if out is not None else set()
    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep, async_save=tcfg.async_save) if out is not None else None
    logger: MetricsLogger | None = None
    is_grain = isinstance(data, TrainData)
    iterator = None if is_grain else _cycle(data)
    finished = False
    try:
        state = _start_state(fns, cfg, params, data, ckpt if resume else None, log and primary)
        start = int(jax.device_get(state.step))
        logger = MetricsLogger(out_dir if primary else None, log_every=tcfg.log_every, tensorboard=tcfg.tensorboard,
                               enabled=log and primary, start_step=start)
        if is_grain:  # the data position is the step, on any process count
            iterator = data.iterator(start)
        elif start and isinstance(data, Sequence):  # a list of batches: continue where we stopped
            iterator = itertools.islice(iterator, start, None)
        peak = tcfg.peak_tflops if tcfg.peak_tflops is not None else device_peak_tflops()
        ctx = _Context(cfg, tcfg, fns, data, ckpt, logger, data_config, extra_meta, stop or (lambda: False), start, total,
                       show=log and primary, peak_flops=peak * 1e12 if peak else None, vision_trains=_vision_trains(fns))
        result = _run(ctx, state, iterator)
        finished = True
        return result
    finally:
        if logger is not None:
            logger.close()
        if ckpt is not None:
            ckpt.close()
        close = getattr(iterator, "close", None)
        if is_grain and callable(close):  # stop grain's prefetch threads / worker processes
            close()
        # a run that failed before producing anything (bad data, a bad checkpoint) leaves no empty run directory
        if not finished and out is not None and primary and not (logger is not None and logger.written) \
                and not _has_steps(out / "checkpoints"):
            _remove_created(out, before)


# ---- set-up --------------------------------------------------------------------------------------------

def _plan(data: TrainData | Iterable[Mapping[str, Any]], tcfg: TrainConfig, mesh: Mesh, log: bool) -> tuple[int, int | None]:
    """``(the schedule's steps, optimizer steps per epoch of the data)``, after checking the batch fits the data and mesh.

    The alpha warm-up counts epochs as the release's Trainer does: optimizer steps / steps per pass over the data."""
    if isinstance(data, TrainData):
        if log and (note := grounding_note(tcfg.grounding_weight, data.records)) is not None:
            warnings.warn(note, stacklevel=3)
        total = count_steps(tcfg, data.num_usable)  # the scan: the same usable samples on every process
        if data.batch_size != tcfg.batch_size or data.grad_accum != tcfg.grad_accum:
            raise ValueError(
                f"TrainData batch {data.batch_size}/{data.grad_accum} != TrainConfig {tcfg.batch_size}/{tcfg.grad_accum}"
            )
    elif tcfg.steps is not None:
        total = tcfg.steps
    elif hasattr(data, "__len__"):
        total = max(1, int(tcfg.epochs * len(data)))  # type: ignore[arg-type]
    else:
        raise ValueError("an unsized data iterable needs TrainConfig.steps")
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if jax.process_count() > 1 and tcfg.micro_batch % batch_devices:
        raise ValueError(
            f"on several hosts the microbatch ({tcfg.micro_batch} = batch_size / grad_accum) must be a multiple of "
            f"data x fsdp = {batch_devices}"
        )
    if isinstance(data, TrainData):
        return total, data.plan.batches_per_epoch
    return total, len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]


def _start_state(fns: StepFns, cfg: ModelConfig, params: PyTree | None, data: Any, ckpt: Checkpointer | None,
                 say: bool) -> TrainState:
    """The state to continue: the newest restorable checkpoint in ``ckpt`` (with the data counters saved with it),
    else a fresh state of ``params``."""
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = _restore(ckpt, fns, cfg, _log.warning if say else None, params)
        if isinstance(data, TrainData) and meta.get("data_state"):
            data.counter.load_state(meta["data_state"])
        if say:
            _log.info("resumed from %s step %d", ckpt.directory, int(state.step))
        return state
    if params is None:
        raise ValueError("no parameters and no checkpoint to resume from")
    return fns.init_state(params)


def _vision_trains(fns: StepFns) -> bool:
    """Whether any CLIP parameter is trainable (then the step's FLOPs count CLIP's backward)."""
    return any(m for p, m in zip(_paths(fns.mask), jax.tree.leaves(fns.mask), strict=True) if p.startswith("vision/"))


# ---- the steps -----------------------------------------------------------------------------------------

def _run(ctx: _Context, state: TrainState, iterator: Iterator) -> tuple[PyTree, list[dict[str, Any]]]:
    """Steps ``ctx.start + 1`` .. ``ctx.end``: each after every process's word (go, stop or end of data), its metrics
    read one step later (at once at save points), checkpoints when due; then the run's last checkpoint."""
    from flexattn_jax.logs import progress

    bar = progress(total=ctx.total, initial=ctx.start, disable=not (ctx.tcfg.progress and ctx.show), unit="step")
    ledger = _Ledger(ctx.ckpt.latest_step() if ctx.ckpt is not None else None)
    sync = StepAgreement(ctx.tcfg.sync_timeout_s)
    said = ctx.start  # the first step whose word this process has not given
    stopped = by_other = False
    pending: _Pending | None = None
    try:
        for s in range(ctx.start, ctx.end):
            host, extra = _next_batch(ctx, iterator)
            # every process's word before the step: all stop together, or all run the step with one batch length
            asked = ctx.stop()
            word = "stop" if asked else ("end" if host is None else "go")
            verdict, length = sync.agree(s, word, 0 if host is None else host["input_ids"].shape[1])
            said = s + 1
            if verdict == "end":
                warnings.warn(f"the data ran out after {s} steps (of {ctx.total}); stopping", stacklevel=2)
                break
            if verdict == "stop":
                stopped, by_other = True, not asked
                break
            state, dispatched = _dispatch(ctx, ledger, state, host, length, s + 1, extra)
            if pending is not None:
                _finish(ctx, ledger, pending, bar)
            pending = dispatched
            if _save_due(ctx, s + 1) or s + 1 == ctx.end:
                _finish(ctx, ledger, pending, bar)
                pending = None
                if _save_due(ctx, s + 1):
                    _save(ctx, ledger, s + 1, state)
        if pending is not None:
            _finish(ctx, ledger, pending, bar)
        _conclude(ctx, ledger, state, stopped, by_other)
    except (TrainingStopped, TrainingDiverged):
        raise  # every process reaches these by itself (the same stop word, the same global loss)
    except BaseException as e:
        sync.fail(said, f"{type(e).__name__}: {e}")  # the others stop at their next step instead of waiting
        raise
    finally:
        bar.close()
    return state.params, ledger.records


def _next_batch(ctx: _Context, iterator: Iterator) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """The next host batch with every step key (:func:`complete_batch`) and the record fields it brings (its epoch,
    learnable rows dropped); ``(None, {})`` when a user iterable ran dry (a TrainData plan covers the run)."""
    try:
        raw = next(iterator)
    except StopIteration:
        return None, {}
    extra = {"epoch": int(raw["_epoch"])} if "_epoch" in raw else {}
    if "_rows_dropped" in raw:
        extra["select_rows_dropped"] = int(raw["_rows_dropped"])  # learnable rows beyond max_select_rows
    return complete_batch(raw, ctx.cfg, ctx.data_config.max_select_rows if ctx.data_config else None), extra


def _dispatch(ctx: _Context, ledger: _Ledger, state: TrainState, host: dict[str, np.ndarray], length: int, step_no: int,
              extra: dict[str, Any]) -> tuple[TrainState, _Pending]:
    """Start step ``step_no`` on ``host`` (padded to the agreed ``length`` on several hosts) without waiting for it;
    its global tokens and model FLOPs (:func:`flexattn_jax.flops.train_flops`, or ``lora_train_flops`` for a LoRA run)
    go with it."""
    if ctx.pad_to_max:
        host = pad_to_length(host, length, ctx.cfg.pad_token_id)
    batch = global_batch(ctx.fns, split_microbatches(host, ctx.tcfg.grad_accum))
    shape = tuple((k, v.shape) for k, v in batch.items())
    compiled = shape not in ledger.shapes
    ledger.shapes.add(shape)
    procs = jax.process_count()
    b_glob, t_len = host["input_ids"].shape[0] * procs, host["input_ids"].shape[1]
    images = int((host["input_ids"] == ctx.cfg.image_token_id).any(axis=1).sum()) * procs
    rows = host["select_rows"].shape[1]
    lora = ctx.tcfg.lora
    flops = (lora_train_flops(ctx.cfg, b_glob, t_len, rows, lora.rank, ctx.vision_trains, images) if lora is not None and lora.enabled
             else train_flops(ctx.cfg, b_glob, t_len, rows, ctx.vision_trains, images))
    t0 = time.perf_counter()
    state, metrics = ctx.fns.step(state, batch)
    return state, _Pending(step_no, metrics, b_glob * t_len, flops, compiled, extra, t0)


def _record(m: Mapping[str, Any], p: _Pending, seconds: float, devices: int, peak_flops: float | None) -> dict[str, Any]:
    """One step's metric record: the step's host metrics ``m``, its throughput over ``seconds`` on ``devices`` and its
    MFU (:func:`flexattn_jax.flops.mfu`, ``peak_flops`` per device)."""
    rec: dict[str, Any] = {
        "step": p.step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
        "alpha": float(m["alpha"]), "answer_tokens": int(m["answer_tokens"]), "finite": bool(m["finite"]),
        "tokens": p.tokens, "step_time_s": seconds, "tokens_per_s": p.tokens / seconds,
        "tokens_per_s_per_device": p.tokens / seconds / devices,
        "tflops_per_s_per_device": p.flops / seconds / devices / 1e12, "flops_per_step": p.flops, "compiled": p.compiled,
        "mfu": mfu(p.flops, seconds, devices, peak_flops),
    }
    if "grounding" in m:
        rec["grounding"] = float(m["grounding"])
    rec.update(p.extra)
    return rec


def _finish(ctx: _Context, ledger: _Ledger, p: _Pending, bar: Any) -> None:
    """Wait for ``p``'s metrics, record and log them; a non-finite step (with ``nan_check``) raises
    :class:`TrainingDiverged`. A step's time runs from when the previous step's metrics were ready (the device
    was busy until then), or from its dispatch when it compiled."""
    m = jax.device_get(p.metrics)
    now = time.perf_counter()
    begin = p.t_dispatch if (ledger.last_ready is None or p.compiled) else max(ledger.last_ready, p.t_dispatch)
    ledger.last_ready = now
    rec = _record(m, p, max(now - begin, 1e-9), ctx.fns.mesh.size, ctx.peak_flops)
    if ctx.is_grain:
        rec["skipped"] = sum(ctx.data.stats()["skipped"].values())  # type: ignore[union-attr]
    ledger.records.append(rec)
    ctx.logger.log(rec, write=bar.write if not bar.disable else None)
    bar.update(1)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
    if ctx.tcfg.nan_check and not rec["finite"]:
        if ctx.ckpt is not None:
            ctx.ckpt.wait()
        raise TrainingDiverged(rec["step"], ledger.last_saved, rec)


def _save_due(ctx: _Context, step_no: int) -> bool:
    """Whether step ``step_no`` is saved when it finishes: every ``save_every`` steps, and the run's end with ``save_final``."""
    return ctx.ckpt is not None and (step_no % max(1, ctx.tcfg.save_every) == 0 or (step_no == ctx.end and ctx.tcfg.save_final))


def _save(ctx: _Context, ledger: _Ledger, step_no: int, state: TrainState) -> None:
    """Checkpoint ``state`` as step ``step_no`` with the run's metadata (settings, data position, mesh)."""
    meta = make_meta(ctx.cfg, step_no, train_config=ctx.tcfg.to_dict(),
                     data_config=(ctx.data_config.to_dict() if ctx.data_config else {}),
                     data_state=ctx.data.stats() if ctx.is_grain else {}, mesh=ctx.fns.mesh,  # type: ignore[union-attr]
                     extra=ctx.extra_meta)
    ctx.ckpt.save(step_no, ctx.fns.saved_state(state), meta)  # type: ignore[union-attr]
    ledger.last_saved = step_no


def _conclude(ctx: _Context, ledger: _Ledger, state: TrainState, stopped: bool, by_other: bool) -> None:
    """The run's end: its last step saved (with ``save_final``, or at a stop request), then at a stop request
    :class:`TrainingStopped` once the checkpoint is written."""
    last = ledger.records[-1]["step"] if ledger.records else None
    if ctx.ckpt is not None and (ctx.tcfg.save_final or stopped) and last is not None and ledger.last_saved != last:
        _save(ctx, ledger, last, state)
    if stopped:
        if ctx.ckpt is not None:
            ctx.ckpt.wait()
        raise TrainingStopped(last if last is not None else ctx.start, ledger.last_saved if ctx.ckpt is not None else None,
                              by_other)


def _paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def summarize(records: Sequence[dict[str, Any]], skip_compiled: bool = True) -> dict[str, Any]:
    """Mean throughput over steady-state steps (compile steps excluded), first/last loss (and grounding term)."""
    steady = [r for r in records if not (skip_compiled and r.get("compiled"))] or list(records)
    if not steady:
        return {}

    def mean(k: str) -> float | None:
        vals = [r[k] for r in steady if r.get(k) is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "steps": len(records), "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
        "step_time_s": mean("step_time_s"), "tokens_per_s": mean("tokens_per_s"),
        "tokens_per_s_per_device": mean("tokens_per_s_per_device"),
        "tflops_per_s_per_device": mean("tflops_per_s_per_device"), "mfu": mean("mfu"),
        **({"first_grounding": records[0]["grounding"], "last_grounding": records[-1]["grounding"]}
           if "grounding" in records[0] else {}),
    }
