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
    is_grain = isinstance(data, TrainData)
    if is_grain:
        if log and (note := grounding_note(tcfg.grounding_weight, data.records)) is not None:
            warnings.warn(note, stacklevel=2)
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
    # the alpha warm-up counts epochs as the release's Trainer does: optimizer steps / steps per pass over the data
    per_epoch = data.plan.batches_per_epoch if is_grain else (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
    fns = make_step(cfg, tcfg, mesh, total, per_epoch)
    primary = jax.process_index() == 0
    out = Path(out_dir) if out_dir else None
    before = _existing(out) if out is not None else set()
    ckpt = Checkpointer(out / "checkpoints", keep=tcfg.keep, async_save=tcfg.async_save) if out is not None else None
    logger: MetricsLogger | None = None
    iterator = None if is_grain else _cycle(data)
    finished = False
    try:
        state: TrainState | None = None
        if ckpt is not None and resume and ckpt.latest_step() is not None:
            say = _log.warning if log and primary else None
            state, meta = _restore(ckpt, fns, cfg, say, params)
            if is_grain and meta.get("data_state"):
                data.counter.load_state(meta["data_state"])
            if log and primary:
                _log.info("resumed from %s step %d", ckpt.directory, int(state.step))
        if state is None:
            if params is None:
                raise ValueError("no parameters and no checkpoint to resume from")
            state = fns.init_state(params)
        start = int(jax.device_get(state.step))
        logger = MetricsLogger(out_dir if primary else None, log_every=tcfg.log_every, tensorboard=tcfg.tensorboard,
                               enabled=log and primary, start_step=start)
        if is_grain:  # the data position is the step, on any process count
            iterator = data.iterator(start)
        elif start and isinstance(data, Sequence):  # a list of batches: continue where we stopped
            iterator = itertools.islice(iterator, start, None)
        result = _run(cfg, tcfg, fns, state, start, total, data, iterator, is_grain, ckpt, logger, data_config, extra_meta, log,
                      stop or (lambda: False))
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


def _run(cfg, tcfg, fns: StepFns, state, start, total, data, iterator, is_grain, ckpt, logger, data_config, extra_meta, log,
         stop: Callable[[], bool]):
    from flexattn_jax.logs import progress

    mesh = fns.mesh
    n_dev = mesh.size
    peak = tcfg.peak_tflops if tcfg.peak_tflops is not None else device_peak_tflops()
    vision_trains = any(m for p, m in zip(_paths(fns.mask), jax.tree.leaves(fns.mask), strict=True) if p.startswith("vision/"))
    primary = jax.process_index() == 0
    bar = progress(total=total, initial=start, disable=not (tcfg.progress and log and primary), unit="step")
    write = bar.write if not bar.disable else None
    records: list[dict[str, Any]] = []
    seen_shapes: set[tuple] = set()
    last_saved = ckpt.latest_step() if ckpt is not None else None
    last_ready = None
    pending: _Pending | None = None

    def meta_for(step: int) -> dict[str, Any]:
        return make_meta(cfg, step, train_config=tcfg.to_dict(), data_config=(data_config.to_dict() if data_config else {}),
                         data_state=data.stats() if is_grain else {}, mesh=mesh, extra=extra_meta)

    def finish(p: _Pending) -> dict[str, Any]:
        nonlocal last_ready
        m = jax.device_get(p.metrics)
        now = time.perf_counter()
        begin = p.t_dispatch if (last_ready is None or p.compiled) else max(last_ready, p.t_dispatch)
        dt = max(now - begin, 1e-9)
        last_ready = now
        rec: dict[str, Any] = {
            "step": p.step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "alpha": float(m["alpha"]), "answer_tokens": int(m["answer_tokens"]), "finite": bool(m["finite"]),
            "tokens": p.tokens, "step_time_s": dt, "tokens_per_s": p.tokens / dt,
            "tokens_per_s_per_device": p.tokens / dt / n_dev,
            "tflops_per_s_per_device": p.flops / dt / n_dev / 1e12, "flops_per_step": p.flops, "compiled": p.compiled,
        }
        rec["mfu"] = rec["tflops_per_s_per_device"] / peak if peak else None
        if "grounding" in m:
            rec["grounding"] = float(m["grounding"])
        rec.update(p.extra)
        if is_grain:
            rec["skipped"] = sum(data.stats()["skipped"].values())
        records.append(rec)
        logger.log(rec, write=write)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
        return rec

    def check(rec: dict[str, Any]) -> None:
        if tcfg.nan_check and not rec["finite"]:
            if ckpt is not None:
                ckpt.wait()
            raise TrainingDiverged(rec["step"], last_saved, rec)

    end = min(total, tcfg.stop_at) if tcfg.stop_at is not None else total
    # several hosts must pad to one length: needed with buckets, or for batches we did not make
    pad_to_max = jax.process_count() > 1 and (not is_grain or bool(data_config and data_config.buckets))
    sync = StepAgreement(tcfg.sync_timeout_s)
    said = start  # the first step whose word this process has not given
    stopped = False
    try:
        for s in range(start, end):
            try:
                raw = next(iterator)
            except StopIteration:  # a user iterable ran dry (a TrainData plan covers the run)
                raw = None
            host, extra = None, {}
            if raw is not None:
                extra = {"epoch": int(raw["_epoch"])} if "_epoch" in raw else {}
                if "_rows_dropped" in raw:
                    extra["select_rows_dropped"] = int(raw["_rows_dropped"])  # learnable rows beyond max_select_rows
                host = complete_batch(raw, cfg, data_config.max_select_rows if data_config else None)
            # every process's word before the step: all stop together, or all run the step with one batch length
            asked = stop()
            word = "stop" if asked else ("end" if host is None else "go")
            verdict, length = sync.agree(s, word, 0 if host is None else host["input_ids"].shape[1])
            said = s + 1
            if verdict == "end":
                warnings.warn(f"the data ran out after {s} steps (of {total}); stopping", stacklevel=2)
                break
            if verdict == "stop":
                stopped = True
                break
            if pad_to_max:
                host = pad_to_length(host, length, cfg.pad_token_id)
            local = split_microbatches(host, tcfg.grad_accum)
            batch = global_batch(fns, local)
            shape = tuple((k, v.shape) for k, v in batch.items())
            compiled = shape not in seen_shapes
            seen_shapes.add(shape)
            b_glob, t_len = host["input_ids"].shape[0] * jax.process_count(), host["input_ids"].shape[1]
            images = int((host["input_ids"] == cfg.image_token_id).any(axis=1).sum()) * jax.process_count()
            flops = train_flops(cfg, b_glob, t_len, host["select_rows"].shape[1], vision_trains, images)
            t0 = time.perf_counter()
            state, metrics = fns.step(state, batch)
            if pending is not None:
                check(finish(pending))
            pending = _Pending(s + 1, metrics, b_glob * t_len, flops, compiled, extra, t0)
            step_no = s + 1
            save_now = ckpt is not None and (step_no % max(1, tcfg.save_every) == 0 or (step_no == end and tcfg.save_final))
            if save_now or step_no == end:
                rec = finish(pending)
                pending = None
                check(rec)
                if save_now:
                    ckpt.save(step_no, fns.saved_state(state), meta_for(step_no))
                    last_saved = step_no
        if pending is not None:
            check(finish(pending))
            pending = None
        if ckpt is not None and (tcfg.save_final or stopped) and records and last_saved != records[-1]["step"]:
            ckpt.save(records[-1]["step"], fns.saved_state(state), meta_for(records[-1]["step"]))
            last_saved = records[-1]["step"]
        if stopped:
            if ckpt is not None:
                ckpt.wait()
            raise TrainingStopped(records[-1]["step"] if records else start, last_saved if ckpt is not None else None, not asked)
    except (TrainingStopped, TrainingDiverged):
        raise  # every process reaches these by itself (the same stop word, the same global loss)
    except BaseException as e:
        sync.fail(said, f"{type(e).__name__}: {e}")  # the others stop at their next step instead of waiting
        raise
    finally:
        bar.close()
    return state.params, records


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
