"""Training checkpoints: orbax ``CheckpointManager`` with async saves, last-N retention and a composite of

* ``state``: the :class:`train.step.TrainState` (step, fp32 params, optimizer state);
* ``data``: the grain iterator state (one JSON file per process), when a grain iterator is used;
* ``meta``: JSON (model config, train/data config, step, converter version, data counters, mesh).

Restore goes through abstract targets (``ShapeDtypeStruct`` with the *target* ``NamedSharding``), so a
run saved on one mesh resumes on another. A save is atomic: a step directory exists only once its
write finished, so a process killed mid-save leaves the previous step as the latest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from flexattn_jax.config import ModelConfig

try:  # the converter records its version; reuse it when available
    from convert import CONVERTER_VERSION
except Exception:  # noqa: BLE001 - convert is optional for training from random init
    CONVERTER_VERSION = None

CHECKPOINT_FORMAT = "flexattn-jax-train/1"


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


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
