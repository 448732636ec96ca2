"""Training and data settings: frozen dataclasses whose defaults are the release's fine-tuning recipe.

The FlexAttention release fine-tunes LLaVA-1.5-7B for one epoch on the LLaVA-665k mix with lr 2e-5,
cosine decay, 3% linear warm-up, no weight decay, gradient clipping at 1.0 (the HF Trainer default),
global batch 128, 1008 px images (zoom 3), selection threshold 48 and alpha warm-up 10 (model config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from flexattn_jax.lora import LoraConfig
from flexattn_jax.preprocess import SYSTEM_PROMPT_VICUNA_V1

TRAINABLE_GROUPS: tuple[str, ...] = ("projector", "llm", "hr", "vision", "all")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, step and loop settings.

    ``batch_size`` is the global batch per optimizer step (all hosts, all microbatches);
    ``grad_accum`` splits it into that many microbatches, scanned inside the jitted step.
    ``steps`` (if set) wins over ``epochs``; ``stop_at`` ends this invocation once the state reaches
    that step (the schedule still spans the whole run: time-limited jobs, resumed later).
    ``trainable`` is a comma list of ``projector``, ``llm``
    (the decoder, ``*_hr`` kernels included), ``hr`` (only the ``*_hr`` kernels), ``vision``, ``all``.
    ``grounding_weight`` > 0 (FlexAttention only) adds that weight x the cross-entropy between the select
    rows' LR maps and the records' ``box`` (:func:`train.step.loss_sums`): a departure from the release,
    whose maps get no training signal of their own (the selection's threshold passes no gradient).
    ``lora`` (:class:`flexattn_jax.lora.LoraConfig`, ``enabled``) trains rank-r adapters on the decoder's linears
    instead of the decoder itself, plus the groups of ``trainable`` (``projector``, ``hr``); the frozen base stays in
    the compute dtype (``base_quant``: int8 / int4, QLoRA) and checkpoints hold only what trains.
    """

    steps: int | None = None
    stop_at: int | None = None
    epochs: float = 1.0
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    clip_norm: float | None = 1.0
    trainable: str = "projector,llm"
    seed: int = 0
    log_every: int = 1
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    save_final: bool = True
    peak_tflops: float | None = None
    progress: bool = True
    tensorboard: bool = True
    nan_check: bool = True
    grounding_weight: float = 0.0
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size={self.batch_size} and grad_accum={self.grad_accum} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        if not self.grounding_weight >= 0:
            raise ValueError(f"grounding_weight={self.grounding_weight} must be >= 0")
        groups = [g.strip() for g in self.trainable.split(",") if g.strip()]
        bad = sorted(set(groups) - set(TRAINABLE_GROUPS))
        if not groups or bad:
            raise ValueError(f"trainable={self.trainable!r}: use a comma list of {TRAINABLE_GROUPS}")
        if isinstance(self.lora, dict):  # from to_dict / JSON
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if self.lora.enabled and {"llm", "all"} & set(groups):
            raise ValueError(f"trainable={self.trainable!r} with LoRA: the decoder trains through its adapters; name only "
                             "projector, hr or vision (e.g. --trainable projector)")
        if self.lora.base_quant != "none" and not self.lora.enabled:
            raise ValueError(f"base_quant={self.lora.base_quant!r} is QLoRA: it needs LoRA enabled (--lora)")
        if self.lora.base_quant != "none" and "hr" in groups and "k_hr" in self.lora.targets:
            raise ValueError("trainable 'hr' with a quantised base: the k_hr/v_hr kernels would be quantised; train them "
                             "through their adapters instead (drop 'hr' from --trainable)")

    @property
    def micro_batch(self) -> int:
        """Global batch of one microbatch."""
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DataConfig:
    """LLaVA-format data: a JSON list (or JSONL) of ``{id, image?, conversations}`` plus an image folder.

    ``max_len`` bounds the expanded sequence (images count ``num_image_tokens``); batches are padded
    to ``max_len``, or with ``buckets`` to the smallest bucket holding the batch's longest sample
    (one compile per bucket). ``max_select_rows`` caps R, the learnable rows per sample (default
    ``max_len``). Bad samples (missing/unreadable image, ``<image>`` tag mismatch, malformed turns,
    too long with ``truncation='drop'``) are counted and skipped with ``on_error='skip'`` or raise a
    :class:`train.data.DataError` with ``'raise'``. ``add_image_tag`` prepends ``<image>`` to the
    first human turn of an image sample that lacks it (else it is a bad sample). A record may carry
    ``box``: [x0, y0, x1, y1], the pixels of its original image where the answer's detail lies, which
    ``TrainConfig.grounding_weight`` trains the selection maps towards.
    """

    data: str = ""
    images: str = ""
    max_len: int = 2048
    max_select_rows: int | None = None
    buckets: tuple[int, ...] | None = None
    group_by_length: bool = True
    group_size: int = 16
    shuffle: bool = True
    seed: int = 0
    workers: int = 0
    threads: int = 2
    prefetch: int = 4
    on_error: Literal["skip", "raise"] = "skip"
    truncation: Literal["drop", "truncate"] = "drop"
    add_image_tag: bool = False
    system_prompt: str = SYSTEM_PROMPT_VICUNA_V1
    tokenizer: str | None = None
    max_logged_errors: int = 20

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} must be >= 2")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={self.on_error!r}: use 'skip' or 'raise'")
        if self.truncation not in ("drop", "truncate"):
            raise ValueError(f"truncation={self.truncation!r}: use 'drop' or 'truncate'")
        if self.buckets is not None and max(self.buckets) > self.max_len:
            raise ValueError(f"buckets {self.buckets} exceed max_len={self.max_len}")
        if self.max_select_rows is not None and self.max_select_rows < 1:
            raise ValueError(f"max_select_rows={self.max_select_rows} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
