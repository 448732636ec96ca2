"""Fine-tuning: LLaVA-format data (grain), optax AdamW with frozen groups, a sharded jitted step, orbax checkpoints.

Python API::

    from train import TrainConfig, train
    params, metrics = train(cfg, params, data, TrainConfig(steps=100, batch_size=8), mesh)

``data`` is a :class:`TrainData` (LLaVA JSON + images) or any iterable of host batches.
"""

from train.checkpoint import Checkpointer
from train.config import DataConfig, TrainConfig
from train.data import DataError, TrainData
from train.loop import TrainingDiverged, summarize, train
from train.step import TrainState, make_step

__all__ = [
    "Checkpointer",
    "DataConfig",
    "DataError",
    "TrainConfig",
    "TrainData",
    "TrainState",
    "TrainingDiverged",
    "make_step",
    "summarize",
    "train",
]
