"""Training and data settings: frozen dataclasses whose defaults are the release's fine-tuning recipe.

The FlexAttention release fine-tunes LLaVA-1.5-7B for one epoch on the LLaVA-665k mix with lr 2e-5,
cosine decay, 3% linear warm-up, no weight decay, gradient clipping at 1.0 (the HF Trainer default),
global batch 128, 1008 px images (zoom 3), selection threshold 48 and alpha warm-up 10 (model config).
"""

from __future__ import annotations

import dataclasses
import math
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
    ``sync_timeout_s`` bounds how long a process of a multi-process run waits for the others' word before a
    step (:class:`train.distributed.StepAgreement`) before it stops with an error naming the missing one;
    it must exceed the spread of the processes' compile and checkpoint times.
    ``lora`` (:class:`flexattn_jax.lora.LoraConfig`, ``enabled``) trains rank-r adapters on the decoder's linears
    instead of the decoder itself, plus the groups of ``trainable`` (``projector``, ``hr``); the frozen base stays in
    the compute dtype (``base_quant``: int8 / int4, QLoRA) and checkpoints hold only what trains.
    """

    steps: int | None = None
    """Optimizer steps of the whole run; wins over epochs."""
    stop_at: int | None = None
    """End this invocation at this step; the schedule still spans steps/epochs."""
    epochs: float = 1.0
    """Epochs over the data."""
    batch_size: int = 128
    """Global batch per optimizer step, all hosts and microbatches."""
    grad_accum: int = 1
    """Microbatches per step, scanned inside the jitted step."""
    lr: float = 2e-5
    """Peak learning rate."""
    warmup_ratio: float = 0.03
    """Linear warm-up, as a fraction of the steps."""
    warmup_steps: int | None = None
    """Warm-up steps (wins over warmup_ratio)."""
    end_lr_ratio: float = 0.0
    """Final learning rate of the cosine decay, as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_b1: float = 0.9
    """AdamW beta1."""
    adam_b2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_norm: float | None = 1.0
    """Global-norm gradient clipping; none or 0 disables it."""
    trainable: str = "projector,llm"
    """Comma list of projector, llm (the decoder, *_hr kernels included), hr (only the *_hr kernels), vision, all."""
    seed: int = 0
    """Seed of random init, data order and random selection."""
    log_every: int = 1
    """A metrics line every N steps."""
    save_every: int = 500
    """A checkpoint every N steps."""
    keep: int = 3
    """Checkpoints to keep."""
    async_save: bool = True
    """Write checkpoints in the background."""
    save_final: bool = True
    """A checkpoint at the last step."""
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for MFU (none: the known GPUs/TPUs' table)."""
    progress: bool = True
    """A progress bar (a plain line every few seconds when stderr is no terminal)."""
    tensorboard: bool = True
    """TensorBoard event files under the run directory."""
    nan_check: bool = True
    """Stop on a NaN/inf loss, keeping the last good checkpoint."""
    grounding_weight: float = 0.0
    """Weight of the grounding term (cross-entropy between the select rows' LR maps and each record's 'box');
    FlexAttention only, not in the release; 0: off."""
    sync_timeout_s: float = 600.0
    """Multi-host: seconds a process waits for the others' word before a step, then an error naming the missing one."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapters on the decoder's linears instead of training the decoder (see docs/lora.md)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size={self.batch_size} and grad_accum={self.grad_accum} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1]")
        if not (math.isfinite(self.sync_timeout_s) and self.sync_timeout_s > 0):
            raise ValueError(f"sync_timeout_s={self.sync_timeout_s} must be a finite number > 0")
        if not (math.isfinite(self.grounding_weight) and self.grounding_weight >= 0):
            raise ValueError(f"grounding_weight={self.grounding_weight} must be a finite number >= 0")
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
    """LLaVA-format JSON list or JSONL."""
    images: str = ""
    """Folder the samples' 'image' paths are relative to."""
    max_len: int = 2048
    """Max tokens per sample, image tokens included."""
    max_select_rows: int | None = None
    """Cap on learnable (select) rows per sample (none: max_len)."""
    buckets: tuple[int, ...] | None = None
    """Pad each batch to the smallest of these lengths (none: always max_len)."""
    group_by_length: bool = True
    """Length-grouped batches (else plain shuffled ones)."""
    group_size: int = 16
    """Length grouping window, in global batches."""
    shuffle: bool = True
    """Shuffle the samples (else keep the file order)."""
    seed: int = 0
    """Shuffle seed."""
    workers: int = 0
    """Grain worker processes for loading (0: in-process threads)."""
    threads: int = 2
    """Grain read threads."""
    prefetch: int = 4
    """Grain prefetch buffer, in samples."""
    on_error: Literal["skip", "raise"] = "skip"
    """Bad samples: count and skip, or stop."""
    truncation: Literal["drop", "truncate"] = "drop"
    """Over-long samples: a bad sample, or cut to max_len."""
    add_image_tag: bool = False
    """Insert <image> into image samples whose text lacks it."""
    system_prompt: str = SYSTEM_PROMPT_VICUNA_V1
    """System text of the template; the CLI also takes 'vicuna_v1' (LLaVA's training template) and 'llava_v1'."""
    tokenizer: str | None = None
    """HF tokenizer directory (the CLI's default: --checkpoint's; the tiny test tokenizer with --init random)."""
    max_logged_errors: int = 20
    """Bad samples to warn about one by one."""

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
