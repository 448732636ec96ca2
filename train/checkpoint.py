"""Training checkpoints: orbax ``CheckpointManager`` with async saves, last-N retention and a composite of

* ``state``: the :class:`train.step.TrainState` (step, fp32 params, optimizer state);
* ``data``: the grain iterator state (one JSON file per process), when a grain iterator is used;
* ``meta``: JSON (model config, train/data config, step, converter version, data counters, mesh).

Restore goes through abstract targets (``ShapeDtypeStruct`` with the *target* ``NamedSharding``), so a
run saved on one mesh resumes on another. A save is atomic: a step directory exists only once its
write finished, so a process killed mid-save leaves the previous step as the latest.

A step damaged after its save (truncated array data, a missing ``_METADATA``, bad JSON) is skipped
by :meth:`Checkpointer.restore_latest`, which falls back to the newest step that restores and moves
the damaged directory aside (``<step>.corrupt``: kept for inspection, out of the step list). A step
whose arrays do not fit the model (a changed ``--set``) is a :class:`CheckpointMismatch` naming the
parameter, both shapes and the config settings that differ, not a fall-back.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from flexattn_jax.checkpoint import CONVERTER_VERSION
from flexattn_jax.config import ConfigError, ModelConfig

CHECKPOINT_FORMAT = "flexattn-jax-train/1"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointMismatch(ConfigError):
    """A checkpoint's arrays do not fit the model being trained (the message names parameter and settings)."""


class NoUsableCheckpoint(ConfigError):
    """Every step under the checkpoint directory is damaged (the message names each and why)."""


class Checkpointer:
    """Save / restore training state under ``directory`` (keeps the last ``keep`` steps)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries -----------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest complete step (an interrupted save is not a step)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # ---- save --------------------------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, meta: dict[str, Any], data_iterator: Any = None, *, force: bool = True) -> bool:
        """Start saving ``step`` (asynchronously when enabled); returns whether a save was started.

        The arrays are copied off the devices before this returns, so ``state`` may be donated next.
        """
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(_jsonable(meta))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return bool(self.manager.save(int(step), args=ocp.args.Composite(**items), force=force))

    def wait(self) -> None:
        """Block until pending async saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ---- restore -----------------------------------------------------------------------------------------
    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: latest)."""
        step = self._step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(
        self, abstract_state: PyTree, step: int | None = None, data_iterator: Any = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """``(state, meta)`` of ``step`` (default latest), placed by ``abstract_state``'s shardings.

        ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves carrying target shardings (any mesh).
        With ``data_iterator``, its grain state is restored in place too.
        """
        step = self._step(step)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"])

    def stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """``{'params/text/...': shape}`` of the state saved at ``step`` (read from its ``_METADATA``)."""
        meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        tree = getattr(meta, "item_metadata", meta)
        return {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}

    def check_fits(self, abstract_state: PyTree, step: int, meta: dict[str, Any], cfg: ModelConfig | None = None) -> None:
        """Raise :class:`CheckpointMismatch` when ``step``'s arrays differ from ``abstract_state`` in name or shape."""
        stored = self.stored_shapes(step)
        want = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        problems = [(k, stored.get(k), v) for k, v in want.items() if stored.get(k) != v]
        problems += [(k, v, None) for k, v in stored.items() if k not in want]
        if not problems:
            return
        problems.sort(key=lambda x: (not x[0].startswith("params/"), x[0]))  # parameters before optimizer state
        name, there, here = problems[0]
        what = (f"{name} is {there} there, {here} here" if there is not None and here is not None
                else f"{name} is missing there" if there is None else f"{name} is not in this model")
        settings = config_diff(meta.get("model_config"), cfg.to_dict() if cfg is not None else None)
        why = f"; the model config differs in {', '.join(settings)}" if settings else ""
        more = f" (and {len(problems) - 1} more arrays)" if len(problems) > 1 else ""
        raise CheckpointMismatch(
            f"checkpoint {self.directory / str(step)} does not fit this model: {what}{more}{why}; resume with the "
            "settings it was saved with (same --config-json/--set/--recipe), or train into a new --out"
        )

    def restore_latest(
        self, abstract_state: PyTree, data_iterator: Any = None, cfg: ModelConfig | None = None, say: Any = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """``(state, meta)`` of the newest step that restores, falling back past damaged ones.

        Each damaged step (unreadable metadata, JSON or array data) newer than the restored one is
        reported through ``say`` (default ``warnings.warn``) with its directory and the reason, and renamed
        ``<step>.corrupt`` (process 0) so that the run's next saves do not collide with it. A step that
        does not fit the model raises :class:`CheckpointMismatch`; no restorable step at all raises
        :class:`NoUsableCheckpoint` and renames nothing.
        """
        say = say or (lambda m: warnings.warn(m, stacklevel=3))
        skipped: list[tuple[Path, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            d = self.directory / str(step)
            try:
                meta = self.read_meta(step)
                self.stored_shapes(step)
            except Exception as e:  # noqa: BLE001 - any unreadable metadata makes the step unusable
                skipped.append((d, _reason(e)))
                continue
            self.check_fits(abstract_state, step, meta, cfg)
            try:
                out = self.restore(abstract_state, step, data_iterator)
            except Exception as e:  # noqa: BLE001 - TensorStore/OCDBT read errors on damaged array data
                skipped.append((d, _reason(e)))
                continue
            for bad, reason in skipped:
                say(f"skipped damaged checkpoint {bad}: {reason}; {self._move_aside(bad)}; resuming from step {step}")
            if skipped:
                self.manager.reload()
            return out
        listed = "; ".join(f"{d.name}: {r}" for d, r in skipped) or "none"
        raise NoUsableCheckpoint(f"no usable checkpoint under {self.directory} ({listed}); move the damaged steps away "
                                 "to start over, or train into a new --out")

    @staticmethod
    def _move_aside(d: Path) -> str:
        """Rename a damaged step ``<step>.corrupt`` (kept, out of orbax's step list); all processes wait for it."""
        target = d.with_name(d.name + CORRUPT_SUFFIX)
        n = 1
        while target.exists():
            target, n = d.with_name(f"{d.name}{CORRUPT_SUFFIX}{n}"), n + 1
        if jax.process_index() == 0:
            d.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"move aside {d}")
        return f"moved to {target}"

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        return int(step)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_meta(cfg: ModelConfig, step: int, *, train_config: dict | None = None, data_config: dict | None = None,
              data_state: dict | None = None, mesh: jax.sharding.Mesh | None = None, extra: dict | None = None) -> dict[str, Any]:
    """The JSON metadata stored with each step."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model_config": cfg.to_dict(),
        "train_config": train_config or {},
        "data_config": data_config or {},
        "data_state": data_state or {},
        "converter_version": CONVERTER_VERSION,
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "process_count": jax.process_count(),
        "time": time.time(),
    }
    if extra:
        meta.update(extra)
    return meta


def config_diff(saved: dict | None, current: dict | None, limit: int = 4) -> list[str]:
    """``['text.num_heads (checkpoint 4, now 2)', ...]``: the model-config fields that differ."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return []

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(_jsonable(saved)), flat(_jsonable(current))  # as stored: a tuple (flex.hr_ladder) reads back as a list
    diff = [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diff[:limit] + ([f"{len(diff) - limit} more"] if len(diff) > limit else [])


def _path(p: Any) -> str:
    return jax.tree_util.keystr(p, simple=True, separator="/")


def _reason(e: BaseException) -> str:
    """A one-line reason: the exception type and the first line of its message (TensorStore specs are long)."""
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, FileNotFoundError):
        return f"missing file ({e.filename or str(e).splitlines()[0]})" if e.filename else f"missing file: {str(e).splitlines()[0]}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:200]}"


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
