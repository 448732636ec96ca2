"""``flexattn-jax demo``: train a tiny LLaVA-FlexAttn on a synthetic task only high resolution answers.

No weights can be downloaded, so the demo makes everything itself (:mod:`flexattn_jax.app.demo_data`:
"what pattern is the small square?", four 1-px stripe patterns that blur to the same grey at the
low-resolution view) and retraces the paper's recipe at toy scale, with the project's own sharded
train step (:func:`train.loop.train`, all devices, orbax checkpoints):

1. **pretrain** a plain LLaVA (CLIP 56 px + 4-layer Llama, FlexAttention off) on 56 px close-ups,
   where the patterns are visible: the stand-in for a pretrained LLaVA-1.5 (:func:`pretrain_stage`);
2. **fine-tune** it as LLaVA-FlexAttn on 168 px images (a 56 px LR view in the sequence, 3 x 3 HR
   tiles on the side): ``k_hr``/``v_hr`` start from ``k``/``v`` with the input norm folded in
   (:func:`hr_projections`), the vision tower is frozen, and a grounding term trains the answer row's
   LR maps towards the square (:data:`FINETUNE_GROUNDING`; not in the release: see docs/demo.md);
3. **evaluate** held-out images with the batched jitted generation in three modes: FlexAttention,
   LR only (nothing selected) and random selection (the paper's ablation);
4. write ``attention.png`` (where the last token looked and which HR tokens it selected),
   ``report.json`` (accuracies, FLOPs per sample of each mode, training summaries, times) and
   ``model/`` (params + config + tokenizer: ``flexattn-jax generate --checkpoint demo_out/model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flexattn_jax import presets
from flexattn_jax.app.demo_data import CLASSES, build_demo_tokenizer, make_split
from flexattn_jax.app.inference import Request, answer
from flexattn_jax.app.visualize import answer_maps, mask_layer, save_grid
from flexattn_jax.config import ModelConfig
from flexattn_jax.flops import forward_flops
from flexattn_jax.model import hr_feature_rms
from flexattn_jax.params import add_hr_projections, init_params
from flexattn_jax.preprocess import SYSTEM_PROMPT, image_normalization, preprocess_image
from flexattn_jax.selection import box_cell_counts

_log = logging.getLogger(__name__)

OBJECT_PX = (18, 24)  # the patterned square's side at 168 px: one to four HR tokens, a blur at 56 px
MARKER = ".flexattn-jax-demo"  # written into --out: a directory the demo may rewrite (its stages, model/)


demo_model_config = presets.demo  # the demo's model (flexattn_jax.presets)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and sample counts of one demo run."""

    pretrain_steps: int = 400
    finetune_steps: int = 600
    pretrain_samples: int = 4096
    finetune_samples: int = 2048
    test_samples: int = 64
    batch_size: int = 32


FULL = Budget()
QUICK = Budget(pretrain_steps=150, finetune_steps=250, pretrain_samples=1024, finetune_samples=1024, test_samples=32)


def splits(cfg: ModelConfig, budget: Budget, seed: int) -> tuple[list, list, list]:
    """The demo's data: 56 px close-ups (pretraining), 168 px fine-tuning and held-out test items.

    A stage draws no more samples than its steps can show (``steps x batch``): a short run makes a short split."""
    pretrain_n = min(budget.pretrain_samples, budget.pretrain_steps * budget.batch_size)
    finetune_n = min(budget.finetune_samples, budget.finetune_steps * budget.batch_size)
    close_ups = make_split(1000 + seed, pretrain_n, hr_size=cfg.vision.image_size, obj_px=OBJECT_PX)
    train_items = make_split(2000 + seed, finetune_n, hr_size=cfg.image_size, obj_px=OBJECT_PX)
    test_items = make_split(3000 + seed, budget.test_samples, hr_size=cfg.image_size, obj_px=OBJECT_PX)
    return close_ups, train_items, test_items


def modes(cfg: ModelConfig) -> dict[str, ModelConfig]:
    """The three evaluated variants of one trained model."""
    flex = cfg.flex
    return {
        "flexattention": cfg,
        "lr-only": dataclasses.replace(cfg, flex=dataclasses.replace(flex, threshold=256.0)),  # nothing passes 255
        "random-selection": dataclasses.replace(cfg, flex=dataclasses.replace(flex, selection="random")),
    }


HR_INIT = "copy-normed"  # the fine-tune's k_hr/v_hr: copies of k/v with the input norm folded in (see hr_projections)


def hr_projections(plain: dict, cfg: ModelConfig, items, init: str = HR_INIT, seed: int = 0) -> tuple[dict, float | None]:
    """The pretrained plain LLaVA with FlexAttention's ``k_hr``/``v_hr`` added (:func:`params.add_hr_projections`).

    ``copy-normed`` (the demo's default; a departure from the release, which copies ``k``/``v`` as they are)
    measures the HR features' RMS on the first 32 fine-tuning images: in this tiny model the projector's output
    has RMS ~0.06 against ~1 for the normed rows that ``k``/``v`` were trained on, so plain copies start the HR
    path mute and seed 1 never left the LR-only plateau. Returns ``(params, feature_rms or None)``."""
    rms = None
    if init == "copy-normed":
        pixels = np.stack([preprocess_image(img, cfg.image_size, *image_normalization(cfg.vision))[0] for img, *_ in items[:32]])
        rms = hr_feature_rms(plain, cfg, pixels)
    return add_hr_projections(plain, init, key=jax.random.key(seed + 7919), feature_rms=rms), rms


def _records(items, boxes: bool = False) -> list[dict[str, Any]]:
    """LLaVA-format records; with ``boxes`` each carries the pattern square's ``box`` (for grounding)."""
    return [
        {"id": str(i), "image": img, "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
         **({"box": meta["bbox"]} if boxes else {})}
        for i, (img, q, a, meta) in enumerate(items)
    ]


def train_stage(name, cfg, params, items, steps, lr, trainable, tokenizer, budget, out, progress, grounding_weight=0.0):
    """One stage with the project's train loop; checkpoints and metrics under ``out/name``.

    ``grounding_weight`` > 0 gives each record its square's box and trains the selection maps towards it
    (:class:`train.config.TrainConfig`). Returns ``(params, summary, records)`` (the per-step metric records of
    :func:`train.loop.train`)."""
    from train.config import DataConfig, TrainConfig
    from train.data import TrainData
    from train.loop import summarize, train

    stage_dir = out / name
    shutil.rmtree(stage_dir, ignore_errors=True)  # a fresh run, not a resume of an older demo
    dcfg = DataConfig(max_len=64, system_prompt=SYSTEM_PROMPT, threads=1)
    data = TrainData(cfg, dcfg, tokenizer, budget.batch_size, records=_records(items, grounding_weight > 0), num_steps=steps)
    tcfg = TrainConfig(
        steps=steps, batch_size=budget.batch_size, lr=lr, warmup_ratio=0.05, trainable=trainable, save_every=steps,
        log_every=max(1, steps // 4), tensorboard=False, progress=progress, grounding_weight=grounding_weight,
    )
    if progress:
        _log.info(f"[{name}] {steps} steps, batch {budget.batch_size}, {len(items)} samples, {cfg.image_size} px, "
                  f"training {trainable}, on {jax.device_count()} device(s)")
    t0 = time.perf_counter()
    params, records = train(cfg, params, data, tcfg, out_dir=stage_dir, resume=False, data_config=dcfg, log=progress)
    summary = {**summarize(records), "seconds": time.perf_counter() - t0, "checkpoint": str(stage_dir / "checkpoints")}
    return params, summary, records


PRETRAIN_LR, FINETUNE_LR = 1e-3, 2e-3
PRETRAIN_TRAINABLE, FINETUNE_TRAINABLE = "all", "projector,llm"  # the fine-tune freezes the vision tower, as the release
# The fine-tune's grounding term (a departure from the release; see docs/demo.md): the answer rows' LR maps in layers
# 0-2 are trained towards the square's cells, as the release's maps come localised from LLaVA-1.5's pretraining and
# this 45-second stand-in's do not (the selection passes no gradient, so nothing else trains them).
FINETUNE_GROUNDING = 0.5


def pretrain_stage(cfg: ModelConfig, close_ups, seed: int, tokenizer, budget: Budget, out: Path, progress: bool):
    """Stage 1, the stand-in for LLaVA-1.5: ``cfg`` with FlexAttention off (a plain LLaVA at 56 px), from
    ``init_params(seed)``, trained on the 56 px close-ups.

    The vision tower trains too: this stand-in has no pretrained CLIP to keep frozen (a tower frozen at its random
    init, as LLaVA-1.5 keeps CLIP, measured worse after the fine-tune: see docs/demo.md). Returns :func:`train_stage`'s."""
    lr_cfg = dataclasses.replace(cfg, flex=dataclasses.replace(cfg.flex, enabled=False))
    params = init_params(lr_cfg, jax.random.key(seed))
    return train_stage("pretrain", lr_cfg, params, close_ups, budget.pretrain_steps, PRETRAIN_LR, PRETRAIN_TRAINABLE,
                       tokenizer, budget, out, progress)


def _save_attention_png(path: Path, items, answers, cfg: ModelConfig, n: int = 6) -> None:
    """The first ``n`` test images: last-token map (top) and selected HR tokens (bottom)."""
    layer = mask_layer(cfg)
    n = min(n, len(items))
    maps = [answer_maps(a, cfg, layer) for a in answers[:n]]
    save_grid(
        path, [it[0] for it in items[:n]], [m[0] for m in maps], [m[1] for m in maps],
        map_titles=[f"map, layer {layer}\ntruth: {it[2]}" for it in items[:n]],
        selection_titles=[f"selected HR tokens\nanswer: {a.text!r}" for a in answers[:n]],
    )


COVERED = 0.5  # a test image's square counts as found when selected HR tokens cover at least this share of its pixels


def square_coverage(mask: np.ndarray, bbox: Sequence[int], size: Sequence[int]) -> float:
    """Share of the pattern square's pixels (``bbox`` x0, y0, x1, y1 in the original ``size`` = (w, h) image) that
    lie inside selected HR tokens; ``mask`` (M,) is row-major over the square HR grid of the image padded
    (centred, as LLaVA's ``expand2square``) and resized to the model's input."""
    grid = int(round(np.sqrt(mask.size)))
    counts = box_cell_counts(np.asarray(bbox), tuple(size), grid)
    return float((counts * mask.reshape(grid, grid)).sum() / counts.sum())


def environment() -> dict[str, Any]:
    """What the demo's figures depend on beyond the seed: float results (so the trained model and its
    accuracies) change with the device count and the CPU cores XLA may use (reduction order), and with
    the library versions; two runs agree bitwise when all of these agree."""
    import os
    import platform

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    return {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
            "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind, "cpu_cores_usable": cores,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(), "processor": platform.processor(),
            "transformers": _version("transformers"), "numpy": np.__version__}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_out_dir(out_dir: str | Path) -> Path:
    """``--out`` before any work: writable, not a file, and either new, empty or an earlier demo's output.

    The demo replaces ``pretrain/``, ``finetune/`` and ``model/`` inside it, so an existing directory
    with other contents (``--out ~``, a dataset) is refused rather than partly deleted.
    """
    from flexattn_jax.paths import OutputPathError, check_output_dir

    out = check_output_dir(out_dir, exist_ok=True, flag="--out")
    if out.is_dir() and any(out.iterdir()) and not ((out / MARKER).exists() or (out / "report.json").is_file()):
        raise OutputPathError(f"--out {out_dir} is a non-empty directory that is not a demo output; the demo replaces "
                              "pretrain/, finetune/ and model/ in it: choose a new or empty directory")
    return out


def run(
    out_dir: str | Path = "demo_out", seed: int = 0, quick: bool = False, budget: Budget | None = None, progress: bool = True
) -> dict[str, Any]:
    """Pretrain, fine-tune, evaluate in three modes, write ``attention.png`` and ``report.json``; return the report."""
    t_start = time.perf_counter()
    budget = budget or (QUICK if quick else FULL)
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by flexattn-jax demo; it may replace pretrain/, finetune/ and model/ here\n")
    tokenizer = build_demo_tokenizer()
    cfg = demo_model_config(len(tokenizer))

    t0 = time.perf_counter()
    close_ups, train_items, test_items = splits(cfg, budget, seed)
    data_seconds = time.perf_counter() - t0

    params, pretrain, _ = pretrain_stage(cfg, close_ups, seed, tokenizer, budget, out, progress)
    params, feature_rms = hr_projections(jax.device_get(params), cfg, train_items, seed=seed)
    params, finetune, _ = train_stage("finetune", cfg, params, train_items, budget.finetune_steps, FINETUNE_LR,
                                      FINETUNE_TRAINABLE, tokenizer, budget, out, progress, FINETUNE_GROUNDING)

    from flexattn_jax.checkpoint import write_model

    model_dir = write_model(
        jax.device_get(params), cfg, out / "model", {"source": "flexattn-jax demo", "source_layout": "demo", "seed": seed},
        lambda d: [Path(f).name for f in tokenizer.save_pretrained(str(d))], overwrite=True,
    )
    requests = [Request(img, question) for img, question, _, _ in test_items]
    ids_len = 64  # the prompt bucket of every demo question
    report: dict[str, Any] = {
        "trained": True, "classes": list(CLASSES), "chance": 1 / len(CLASSES), "n_test": len(test_items),
        "devices": jax.device_count(), "environment": environment(), "budget": dataclasses.asdict(budget),
        "data_seconds": data_seconds,
        "stages": {"pretrain": pretrain, "finetune": finetune}, "hr_init": {"init": HR_INIT, "feature_rms": feature_rms},
        "model": str(model_dir), "modes": {},
    }
    flex_answers = None
    layer = mask_layer(cfg)
    for name, mode_cfg in modes(cfg).items():
        stats: dict = {}
        answers = answer(params, mode_cfg, tokenizer, requests, batch_size=8, max_new_tokens=3, progress=False, stats=stats)
        correct = sum(a.text is not None and a.text.split()[:1] == [truth] for a, (_, _, truth, _) in zip(answers, test_items, strict=True))
        cover = {j: [square_coverage(np.asarray(a.hr_masks[j]), meta["bbox"], meta["size"]) if a.hr_masks is not None else 0.0
                     for a, (_, _, _, meta) in zip(answers, test_items, strict=True)]
                 for j in cfg.mask_layers}  # the masks the hierarchical layers attend with
        report["modes"][name] = {
            "accuracy": correct / len(test_items), "seconds": stats["seconds"], "tokens_per_s": stats["tokens_per_s"],
            "flops_per_sample_prefill": forward_flops(params, mode_cfg, 1, ids_len),
            # share of test images whose square is at least half covered by the answer's selected HR tokens (layer L-2)
            "square_found": float(np.mean([c >= COVERED for c in cover[layer]])), "square_covered_mean": float(np.mean(cover[layer])),
            "square_found_by_layer": {str(j): float(np.mean([c >= COVERED for c in cj])) for j, cj in cover.items()},
        }
        if name == "flexattention":
            flex_answers = answers
            report["selected_hr_fraction"] = float(np.mean([a.hr_masks[layer].mean() for a in answers if a.hr_masks is not None]))
    _save_attention_png(out / "attention.png", test_items, flex_answers, cfg)
    report["seconds_total"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'mode':<18} {'accuracy':>8} {'square found':>12} {'GFLOPs/sample':>14} {'tokens/s':>9}")
    for name, row in report["modes"].items():
        print(f"{name:<18} {row['accuracy']:>8.3f} {row['square_found']:>12.3f} {row['flops_per_sample_prefill'] / 1e9:>14.3f} "
              f"{row['tokens_per_s']:>9.1f}")
    print(f"(chance {report['chance']:.2f}; {len(test_items)} held-out images; square found: >= {COVERED:.0%} of its pixels "
          f"under selected HR tokens at layer {layer}; total {report['seconds_total']:.0f} s)")
    print(f"wrote {out / 'attention.png'}, {out / 'report.json'}, the model in {model_dir} "
          f"(try: flexattn-jax generate --checkpoint {model_dir} --image IMAGE --prompt '...'), "
          f"training checkpoints under {out / 'finetune' / 'checkpoints'}")
    return report


def build_parser(prog: str = "flexattn-jax demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory: new, empty or an earlier demo's (it replaces pretrain/, "
                   "finetune/ and model/ there; default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller budget, under 3 minutes on 2 cores ({QUICK.pretrain_steps} + {QUICK.finetune_steps} steps, "
                        f"{QUICK.test_samples} test images); default {FULL.pretrain_steps} + {FULL.finetune_steps} steps, "
                        f"{FULL.test_samples} test images, under 10 minutes")
    p.add_argument("--pretrain-steps", type=int, help="steps of stage 1 (plain LLaVA on 56 px close-ups)")
    p.add_argument("--steps", type=int, help="steps of stage 2 (FlexAttention fine-tuning at 168 px)")
    p.add_argument("--n-test", type=int, help="held-out images to answer")
    p.add_argument("--batch-size", type=int, help="global batch (a multiple of the device count; default 32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = QUICK if args.quick else FULL
    given = (("--pretrain-steps", "pretrain_steps", args.pretrain_steps), ("--steps", "finetune_steps", args.steps),
             ("--n-test", "test_samples", args.n_test), ("--batch-size", "batch_size", args.batch_size))
    overrides = {}
    for flag, key, value in given:
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} must be >= 1, got {value}")
        if value is not None:
            overrides[key] = value
    batch = overrides.get("batch_size", budget.batch_size)
    if batch % jax.device_count():
        raise SystemExit(f"error: --batch-size {batch} is not a multiple of the {jax.device_count()} devices")
    from flexattn_jax.paths import OutputPathError

    try:
        check_out_dir(args.out)
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(args.out, seed=args.seed, budget=dataclasses.replace(budget, **overrides))
    return 0
