"""Command line: ``python -m train`` (also ``flexattn-jax train``): fine-tune LLaVA-FlexAttn on LLaVA-format data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.overrides import release_recipe
from flexattn_jax.preprocess import SYSTEM_PROMPT, SYSTEM_PROMPT_VICUNA_V1

_DESCRIPTION = """\
Fine-tune LLaVA-1.5 with FlexAttention on LLaVA-format data with a sharded, jitted train step.

Defaults reproduce the FlexAttention release's recipe (scripts/train/llava-v1.5-7b-flexattn.sh):
1 epoch, AdamW lr 2e-5, cosine decay with 3% linear warm-up, no weight decay, gradient clipping
1.0, max length 2048, length-grouped batches, vision tower frozen, projector + LLM (with the new
*_hr kernels) trained; with --checkpoint the model gets FlexAttention at zoom 3 (1008 px images),
threshold 48 and alpha warm-up 10 (--recipe release; --recipe none keeps the checkpoint's config).
A plain LLaVA-1.5 checkpoint gets its *_hr kernels (k_proj_hd, v_proj_hd) as copies of k/v
(--hr-init copy, the default, as in the demo) or N(0, 0.02) (--hr-init random, the release's HF
loader init); bench/hr_init.py compares the two on the demo's task.

Data: a JSON list (or .jsonl) of {"id", "image" (relative to --images; omit for text-only),
"conversations": [{"from": "human"|"gpt", "value"}]} rendered with the Vicuna v1 template; only the
assistant answers (and their </s>) are learnt. Bad samples (missing image, <image> tag mismatch,
over-long, malformed) are counted and skipped (--on-error skip) or stop the run (--on-error raise).

Parallelism: --mesh data=D,fsdp=F,tensor=T (one may be -1; default fsdp over all devices); the
global batch (--batch-size) is split into --grad-accum microbatches inside the step. On several
hosts start one process per host; jax.distributed is initialised from the environment (TPU pods,
SLURM, Open MPI) or --coordinator/--num-processes/--process-id.

Training rows: every answer row is a FlexAttention select row (R = --max-len slots per sample);
at 7B scale cap them with --max-select-rows (the count beyond the cap is logged per step).

Outputs under --out: metrics.jsonl, tensorboard/, checkpoints/<step> (orbax: state, data iterator,
metadata). Re-running with the same --out resumes from the latest complete checkpoint (a damaged one is moved
to <step>.corrupt, with a warning, and the one before is used; metrics.jsonl is cut back to the
restored step, the cut lines kept in metrics.superseded.jsonl). --out may not be, contain or lie
inside an input (--data, --images, --checkpoint, --tokenizer, --config-json). Metrics per
step: loss (mean token cross-entropy over answer tokens), lr, grad norm, tokens/s (padded tokens),
TFLOP/s and MFU from an analytic model-FLOP count (see train/metrics.py; MFU needs a known device
or --peak-tflops).
Exit status: 0 done, 2 bad config/data/arguments (including data that gave no batch of good
samples, an unusable --out, a checkpoint that does not fit the model; a run that fails before its
first step leaves no run directory), 3 training diverged (NaN/inf; last good checkpoint kept)."""

_EXAMPLES = """\
examples:
  python -m train --checkpoint ckpt/llava-v1.5-7b-jax --data llava_v1_5_mix665k.json --images data/ \\
      --mesh data=1,fsdp=-1 --batch-size 128 --grad-accum 4 --out runs/flexattn --set dtype=bfloat16 \\
      --set remat_policy=full
  python -m train --init random --config-json tiny.json --data demo/data.json --images demo \\
      --max-len 64 --batch-size 8 --steps 50 --lr 1e-3 --out runs/tiny"""


def build_parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    """The ``train`` argument parser (every TrainConfig / DataConfig field has a flag; model fields via --set)."""
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="CONVERTED",
                     help="a directory written by `python -m convert` (params, config, tokenizer)")
    src.add_argument("--init", choices=("random",), help="random initialisation from --config-json")
    m.add_argument("--config-json", metavar="FILE",
                   help="ModelConfig JSON (ModelConfig.to_json) or a HF/LLaVA config.json, for --init random")
    m.add_argument("--recipe", choices=("auto", "release", "none"), default="auto",
                   help="'release': FlexAttention zoom 3, highres 3x lowres, threshold 48, warmup 10; 'none': config as is; "
                   "'auto' (default): release with --checkpoint, none with --init random")
    m.add_argument("--hr-init", choices=("copy", "copy-normed", "random"), default="copy",
                   help="a plain LLaVA checkpoint's new FlexAttention k_hr/v_hr kernels: copies of k/v (default), copies with "
                   "the input norm folded in at the HR features' RMS on the first 32 training images (copy-normed), or N(0, 0.02)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set dtype=bfloat16 --set remat_policy=full "
                   "--set flex.hr_budget=0.25 (repeatable; applied after --recipe)")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE", help="LLaVA-format JSON list or JSONL")
    d.add_argument("--images", metavar="DIR", default="", help="folder the samples' 'image' paths are relative to")
    d.add_argument("--tokenizer", metavar="DIR",
                   help="HF tokenizer directory (default: --checkpoint's; the tiny test tokenizer with --init random)")
    d.add_argument("--max-len", type=int, default=2048, help="max tokens per sample, image tokens included (default 2048)")
    d.add_argument("--max-select-rows", type=int, help="cap on learnable (select) rows per sample (default: --max-len)")
    d.add_argument("--buckets", metavar="L1,L2,...",
                   help="pad each batch to the smallest of these lengths (default: always --max-len)")
    d.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", help="plain shuffled batches")
    d.add_argument("--group-size", type=int, default=16, help="length grouping window, in global batches (default 16)")
    d.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the file order")
    d.add_argument("--data-seed", type=int, help="shuffle seed (default: --seed)")
    d.add_argument("--workers", type=int, default=0, help="grain worker processes for loading (default 0: in-process threads)")
    d.add_argument("--threads", type=int, default=2, help="grain read threads (default 2)")
    d.add_argument("--prefetch", type=int, default=4, help="grain prefetch buffer, in samples (default 4)")
    d.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad samples: count and skip (default) or stop")
    d.add_argument("--truncation", choices=("drop", "truncate"), default="drop",
                   help="over-long samples: a bad sample (default) or cut to --max-len")
    d.add_argument("--add-image-tag", action="store_true", help="insert <image> into image samples whose text lacks it")
    d.add_argument("--system-prompt", default="vicuna_v1",
                   help="'vicuna_v1' (LLaVA's training template, default), 'llava_v1', or a literal system text")
    d.add_argument("--max-logged-errors", type=int, default=20, help="bad samples to warn about individually (default 20)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help="optimizer steps (wins over --epochs)")
    o.add_argument("--stop-at", type=int, help="end this run at this step (the schedule still spans --steps/--epochs)")
    o.add_argument("--epochs", type=float, default=1.0, help="epochs over the data (default 1)")
    o.add_argument("--batch-size", type=int, default=128, help="global batch per optimizer step, all hosts (default 128)")
    o.add_argument("--grad-accum", type=int, default=1, help="microbatches per step (default 1)")
    o.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    o.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warm-up fraction of the steps (default 0.03)")
    o.add_argument("--warmup-steps", type=int, help="warm-up steps (overrides --warmup-ratio)")
    o.add_argument("--end-lr-ratio", type=float, default=0.0, help="final lr as a fraction of --lr (default 0)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    o.add_argument("--adam-b1", type=float, default=0.9)
    o.add_argument("--adam-b2", type=float, default=0.999)
    o.add_argument("--adam-eps", type=float, default=1e-8)
    o.add_argument("--clip-norm", type=float, default=1.0, help="global-norm gradient clipping; 0 disables (default 1.0)")
    o.add_argument("--trainable", default="projector,llm",
                   help="comma list of projector, llm (decoder incl. *_hr), hr (only *_hr kernels), vision, all "
                   "(default projector,llm)")
    o.add_argument("--grounding-weight", type=float, default=0.0,
                   help="weight of the grounding term: cross-entropy between the select rows' LR attention maps and each "
                   "record's 'box' [x0, y0, x1, y1] (pixels of its image); FlexAttention only, not in the release "
                   "(default 0: off)")
    o.add_argument("--seed", type=int, default=0, help="seed for random init, data order, random selection (default 0)")
    o.add_argument("--no-nan-check", dest="nan_check", action="store_false", help="do not stop on NaN/inf")
    par = p.add_argument_group("parallelism")
    par.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,fsdp=4,tensor=1 (default fsdp=-1: all devices)")
    par.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="jax.distributed.initialize (default auto)")
    par.add_argument("--coordinator", help="coordinator host:port for multi-host runs")
    par.add_argument("--num-processes", type=int)
    par.add_argument("--process-id", type=int)
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR",
                     help="run directory (metrics, TensorBoard, checkpoints); resumed when it has checkpoints")
    out.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    out.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    out.add_argument("--no-async-save", dest="async_save", action="store_false", help="blocking checkpoint writes")
    out.add_argument("--no-save-final", dest="save_final", action="store_false", help="no checkpoint at the last step")
    out.add_argument("--no-resume", dest="resume", action="store_false", help="ignore checkpoints already in --out/checkpoints")
    out.add_argument("--log-every", type=int, default=1, help="print a metrics line every N steps (default 1)")
    out.add_argument("--peak-tflops", type=float, help="per-device peak TFLOP/s for MFU (default: known GPUs/TPUs)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    out.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard event files")
    out.add_argument("--print-sharding", action="store_true", help="print the per-parameter sharding table")
    return p


# ---- pieces -------------------------------------------------------------------------------------------

def train_config_from_args(a: argparse.Namespace) -> Any:
    """TrainConfig from parsed arguments."""
    from train.config import TrainConfig

    return TrainConfig(
        steps=a.steps, stop_at=a.stop_at, epochs=a.epochs, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        warmup_ratio=a.warmup_ratio,
        warmup_steps=a.warmup_steps, end_lr_ratio=a.end_lr_ratio, weight_decay=a.weight_decay, adam_b1=a.adam_b1,
        adam_b2=a.adam_b2, adam_eps=a.adam_eps, clip_norm=a.clip_norm or None, trainable=a.trainable, seed=a.seed,
        log_every=a.log_every, save_every=a.save_every, keep=a.keep, async_save=a.async_save, save_final=a.save_final,
        peak_tflops=a.peak_tflops, progress=a.progress, tensorboard=a.tensorboard, nan_check=a.nan_check,
        grounding_weight=a.grounding_weight,
    )


def data_config_from_args(a: argparse.Namespace, tokenizer_dir: str | None) -> Any:
    """DataConfig from parsed arguments."""
    from train.config import DataConfig

    system = {"vicuna_v1": SYSTEM_PROMPT_VICUNA_V1, "llava_v1": SYSTEM_PROMPT}.get(a.system_prompt, a.system_prompt)
    buckets = tuple(int(x) for x in a.buckets.split(",")) if a.buckets else None
    return DataConfig(
        data=a.data, images=a.images, max_len=a.max_len, max_select_rows=a.max_select_rows, buckets=buckets,
        group_by_length=a.group_by_length, group_size=a.group_size, shuffle=a.shuffle,
        seed=a.seed if a.data_seed is None else a.data_seed, workers=a.workers, threads=a.threads, prefetch=a.prefetch,
        on_error=a.on_error, truncation=a.truncation, add_image_tag=a.add_image_tag, system_prompt=system,
        tokenizer=tokenizer_dir, max_logged_errors=a.max_logged_errors,
    )


def apply_recipe(cfg: ModelConfig, recipe: str, overrides: list[str] | None = None) -> ModelConfig:
    """The release's FlexAttention settings (zoom 3, threshold 48, warmup 10) for ``recipe='release'``, then ``overrides``."""
    if recipe == "release":
        return release_recipe(cfg, overrides)
    from flexattn_jax.overrides import apply_overrides

    return apply_overrides(cfg, overrides) if overrides else cfg


def read_model_config(path: str) -> ModelConfig:
    """A ModelConfig JSON (``to_json``) or a HF / original LLaVA ``config.json``."""
    from flexattn_jax.hf_config import from_hf_config

    d = json.loads(Path(path).read_text())
    if {"vision", "text"} & set(d):
        return ModelConfig.from_dict(d)
    return from_hf_config(d)


def add_missing_hr_kernels(params: dict, cfg: ModelConfig, init: str, seed: int,
                           shardings: Any = None, feature_rms: float | None = None) -> tuple[dict, list[str]]:
    """Give a plain LLaVA tree the FlexAttention ``k_hr``/``v_hr`` kernels, and biases where k/v have them
    (``params.add_hr_projections``: ``init`` 'copy' of k/v, 'copy-normed' at ``feature_rms`` or 'random' N(0, 0.02)),
    placed by ``shardings``; returns the tree and the added names."""
    import jax

    from flexattn_jax.params import abstract_params, add_hr_projections, flatten, unflatten

    want = flatten(abstract_params(cfg))
    have = flatten(params)
    missing = sorted(set(want) - set(have))
    if not missing:
        return params, []
    hr = [n for n in missing if "/k_hr/" in n or "/v_hr/" in n]
    if hr != missing or len(hr) not in (2, 4):
        other = next(n for n in missing if n not in hr) if hr != missing else missing[0]
        raise ConfigError(f"the checkpoint lacks {other}, which the model config needs")
    dtype = {n: want[n].dtype for n in hr}

    def grow(p: dict, key: jax.Array) -> dict:
        flat = flatten(add_hr_projections(p, init, key, feature_rms=feature_rms))
        return unflatten({n: x.astype(dtype[n]) if n in dtype else x for n, x in flat.items()})

    out = jax.jit(grow, out_shardings=shardings, donate_argnums=0)(params, jax.random.key(seed + 7919))
    return out, hr


def training_feature_rms(params: dict, cfg: ModelConfig, data: Any, tokenizer: Any, count: int = 32) -> float:
    """RMS of the HR features of the first ``count`` training images (``--hr-init copy-normed``'s scale)."""
    import numpy as np

    from flexattn_jax.model import hr_feature_rms
    from train.data import SampleLoader

    loader = SampleLoader(data.records, cfg, data.dcfg, tokenizer)
    pixels = []
    for record in data.records:
        if len(pixels) == count:
            break
        try:
            sample = loader.load(record)
        except ValueError:  # a bad sample: the data loader skips it too
            continue
        if sample["has_image"]:
            pixels.append(sample["pixel_values"])
    if not pixels:
        raise ConfigError("--hr-init copy-normed needs training images to measure the HR features' RMS; --data has none")
    return hr_feature_rms(params, cfg, np.stack(pixels))


def _say(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(msg, flush=True)


def run(a: argparse.Namespace, stop: Any = None) -> int:
    """Run training from parsed arguments; returns the exit status. ``stop``: a
    :class:`~flexattn_jax.interrupt.StopRequests` (SIGINT/SIGTERM end the run after the step in flight, with a
    checkpoint: 130/143)."""
    from flexattn_jax.interrupt import StopRequests

    if stop is None:
        with StopRequests("finishing the step in flight, then saving a checkpoint") as stop:
            return run(a, stop)
    from train.distributed import describe, maybe_initialize

    maybe_initialize(a.distributed, a.coordinator, a.num_processes, a.process_id)
    import jax

    from flexattn_jax import sharding as S
    from flexattn_jax.params import abstract_params, count_params, init_params
    from train.checkpoint import Checkpointer
    from train.data import TrainData
    from train.loop import summarize, train

    if not a.checkpoint and not a.init:
        raise ConfigError("give --checkpoint CONVERTED or --init random --config-json FILE")
    if not a.data:
        raise ConfigError("--data is required")
    if a.out:  # before any work: never write into an input, and fail now rather than after loading
        from flexattn_jax.paths import check_output_dir

        check_output_dir(a.out, sources=(a.checkpoint, a.images or None, a.tokenizer, a.config_json, a.data),
                         exist_ok=True, flag="--out")
    try:
        mesh = S.make_mesh(a.mesh)
    except ValueError as e:
        raise ConfigError(f"--mesh {a.mesh!r}: {e}") from e
    _say(f"{describe()}; mesh {S.mesh_summary(mesh)}")
    recipe = a.recipe if a.recipe != "auto" else ("release" if a.checkpoint else "none")
    if a.checkpoint:
        from flexattn_jax.checkpoint import load_converted, read_config

        base_cfg = read_config(a.checkpoint)
    else:
        if not a.config_json:
            raise ConfigError("--init random needs --config-json FILE")
        base_cfg = read_model_config(a.config_json)
    cfg = apply_recipe(base_cfg, recipe, a.overrides)
    cfg = dataclasses.replace(cfg, param_dtype="float32")
    tokenizer_dir = a.tokenizer or (a.checkpoint if a.checkpoint else None)
    tokenizer = _load_tokenizer(tokenizer_dir)
    tcfg = train_config_from_args(a)
    dcfg = data_config_from_args(a, tokenizer_dir)
    data = TrainData(cfg, dcfg, tokenizer, tcfg.batch_size, tcfg.grad_accum, num_steps=tcfg.steps, epochs=tcfg.epochs)
    _say(f"data: {data.num_samples:,} samples from {a.data}")
    resuming = False
    if a.out and a.resume and (Path(a.out) / "checkpoints").is_dir():
        with Checkpointer(Path(a.out) / "checkpoints") as ck:
            resuming = ck.latest_step() is not None
    params = None
    if not resuming:
        shardings = S.param_shardings(abstract_params(cfg), mesh)
        if a.checkpoint:
            params, _ = load_converted(a.checkpoint, sharding=S.param_shardings(abstract_params(base_cfg), mesh))
            rms = None
            if a.hr_init == "copy-normed" and cfg.flex.enabled and "k_hr" not in params["text"]["layers"]["attn"]:
                rms = training_feature_rms(params, cfg, data, tokenizer)
            params, added = add_missing_hr_kernels(params, cfg, a.hr_init, a.seed, shardings, feature_rms=rms)
            if added:
                how = {"copy": "as copies of k/v", "random": "N(0, 0.02)"}.get(
                    a.hr_init, f"as copies of k/v with the input norm folded in at the HR features' RMS {rms or 0:.4g}")
                _say(f"initialised {len(added)} FlexAttention kernels {how} (--hr-init {a.hr_init}): {', '.join(added)}")
        else:
            params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, jax.random.key(a.seed))
    abstract = abstract_params(cfg)
    if a.print_sharding and jax.process_index() == 0:
        S.print_sharding_table(abstract, mesh)
    else:
        _, frac = S.sharding_table(abstract, mesh)
        _say(f"model: {count_params(abstract):,} parameters, {frac:.3%} unsharded on this mesh; recipe {recipe}")
    extra = {"source_checkpoint": a.checkpoint, "recipe": recipe}
    from train.loop import TrainingDiverged, TrainingStopped

    try:
        _, records = train(cfg, params, data, tcfg, mesh, out_dir=a.out, resume=a.resume, data_config=dcfg, extra_meta=extra,
                           stop=lambda: stop.requested)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingStopped as e:
        again = "; run the same command again to continue" if e.saved is not None else ""
        print(f"interrupted: {e}{f' in {a.out}' if e.saved is not None else ''}{again}", file=sys.stderr)
        return stop.exit_code
    summary = summarize(records)
    summary["data"] = data.stats()
    _say("summary: " + json.dumps(summary, default=str))
    return 0


def _load_tokenizer(path: str | None) -> Any:
    if path is None:
        from flexattn_jax.tokenizer import build_tokenizer

        return build_tokenizer()
    from flexattn_jax.tokenizer import load_tokenizer

    return load_tokenizer(path)


def main(argv: Sequence[str] | None = None, prog: str = "python -m train") -> int:
    """Run the train CLI; returns the exit status (2 on a config/data error, with the message on stderr)."""
    from flexattn_jax.interrupt import early_signals, exit_code
    from train.data import DataError

    restore = early_signals()  # `python -m train` too: Ctrl-C / SIGTERM even when SIGINT was inherited as ignored
    try:
        a = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
        return run(a)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # before the run started (Terminated: SIGTERM)
        print("\ninterrupted", file=sys.stderr)
        return exit_code(e)
    finally:
        restore()
