"""Command line: ``python -m train`` (also ``flexattn-jax train``): fine-tune LLaVA-FlexAttn on LLaVA-format data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.overrides import replace_settings, split_override
from flexattn_jax.preprocess import SYSTEM_PROMPT, SYSTEM_PROMPT_VICUNA_V1
from flexattn_jax.presets import with_release_recipe
from flexattn_jax.settings import SettingsArgs
from train.config import DataConfig, TrainConfig

_log = logging.getLogger(__name__)

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

LoRA (--lora, the release's lora_enable): rank --lora-rank adapters (default 64, alpha 16, dropout 0.05)
on every decoder linear train instead of the decoder; --trainable then names the other groups
(default projector). The frozen base stays in the compute dtype (--base-quant int8|int4|nf4: QLoRA),
checkpoints hold the adapters and the trained groups only (the base is loaded again on resume), and
`flexattn-jax convert merge-lora --base CKPT --lora OUT MERGED` writes the merged model (docs/lora.md).

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
      --max-len 64 --batch-size 8 --steps 50 --lr 1e-3 --out runs/tiny
  python -m train --checkpoint ckpt/llava-v1.5-7b-jax --data mix665k.json --images data/ --lora \
      --lr 2e-4 --base-quant int4 --out runs/qlora"""


TRAIN_ARGS = SettingsArgs(TrainConfig, flags={"lora.enabled": "--lora", "lora.base_quant": "--base-quant"},
                          defaults={"trainable": (None, "projector,llm; with --lora: projector")})
"""The TrainConfig flags, one per field (``--lr``, ``--no-nan-check``, ``--lora-rank``, ...); ``--trainable``'s default
depends on ``--lora``."""
DATA_ARGS = SettingsArgs(DataConfig, flags={"seed": "--data-seed"},
                         defaults={"seed": (None, "--seed"), "system_prompt": ("vicuna_v1", "vicuna_v1")})
"""The DataConfig flags; its shuffle seed is ``--data-seed`` (default: ``--seed``)."""
SETTINGS = {"train": TRAIN_ARGS, "data": DATA_ARGS}
"""``--set train.KEY=VALUE`` / ``--set data.KEY=VALUE``: the prefixes of the settings that ``--set`` reaches besides the model's."""
SYSTEM_PROMPTS = {"vicuna_v1": SYSTEM_PROMPT_VICUNA_V1, "llava_v1": SYSTEM_PROMPT}


def build_parser(prog: str = "flexattn-jax train") -> argparse.ArgumentParser:
    """The ``train`` argument parser: a flag per TrainConfig / DataConfig field (generated, see
    :mod:`flexattn_jax.settings`), the model's source and ``--set``, parallelism and output options."""
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
                   "--set flex.hr_budget=0.25 (applied after --recipe), or a training / data setting: --set train.lr=1e-4 "
                   "--set data.max_len=1024 (applied after the flags); repeatable")
    DATA_ARGS.add(p.add_argument_group("data (DataConfig)"))
    TRAIN_ARGS.add(p.add_argument_group("optimisation and loop (TrainConfig)"))
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
    out.add_argument("--no-resume", dest="resume", action="store_false", help="ignore checkpoints already in --out/checkpoints")
    out.add_argument("--print-sharding", action="store_true", help="print the per-parameter sharding table")
    return p


# ---- pieces -------------------------------------------------------------------------------------------

def settings_overrides(a: argparse.Namespace) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Split ``--set`` into the model's overrides and those of each settings prefix (``train.``, ``data.``)."""
    model: list[str] = []
    settings: dict[str, list[tuple[str, str]]] = {k: [] for k in SETTINGS}
    for text in a.overrides:
        key, value = split_override(text)
        head, _, rest = key.partition(".")
        if head in SETTINGS and rest:
            settings[head].append((rest, value))
        else:
            model.append(text)
    return model, settings


def train_config_from_args(a: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments: the flags, then ``--set train.KEY=VALUE``."""
    trainable = a.trainable or ("projector" if a.lora else TrainConfig.trainable)
    return replace_settings(TRAIN_ARGS.build(a, trainable=trainable), settings_overrides(a)[1]["train"], "train")


def data_config_from_args(a: argparse.Namespace, tokenizer_dir: str | None) -> DataConfig:
    """DataConfig from parsed arguments (shuffle seed: ``--data-seed``, else ``--seed``), then ``--set data.KEY=VALUE``;
    ``system_prompt`` may name a template (``vicuna_v1``, ``llava_v1``)."""
    seed = train_config_from_args(a).seed if a.data_seed is None else a.data_seed
    dcfg = replace_settings(DATA_ARGS.build(a, seed=seed, tokenizer=tokenizer_dir), settings_overrides(a)[1]["data"], "data")
    return dataclasses.replace(dcfg, system_prompt=SYSTEM_PROMPTS.get(dcfg.system_prompt, dcfg.system_prompt))


def apply_recipe(cfg: ModelConfig, recipe: str, overrides: list[str] | None = None) -> ModelConfig:
    """``recipe`` 'release': :func:`flexattn_jax.presets.with_release_recipe` with ``overrides`` (validated together, so
    ``flex.first_select_layer`` can fit a shallow decoder); otherwise ``cfg`` with ``overrides``."""
    if recipe == "release":
        return with_release_recipe(cfg, overrides)
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
    """Log ``msg`` (info) on the first process only."""
    import jax

    if jax.process_index() == 0:
        _log.info(msg)


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
    tokenizer_dir = a.tokenizer or (a.checkpoint if a.checkpoint else None)
    tcfg = train_config_from_args(a)
    dcfg = data_config_from_args(a, tokenizer_dir)
    if not dcfg.data:
        raise ConfigError("--data is required")
    if a.out:  # before any work: never write into an input, and fail now rather than after loading
        from flexattn_jax.paths import check_output_dir

        check_output_dir(a.out, sources=(a.checkpoint, dcfg.images or None, a.tokenizer, a.config_json, dcfg.data),
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
    cfg = apply_recipe(base_cfg, recipe, settings_overrides(a)[0])
    cfg = dataclasses.replace(cfg, param_dtype="float32")
    tokenizer = _load_tokenizer(tokenizer_dir)
    data = TrainData(cfg, dcfg, tokenizer, tcfg.batch_size, tcfg.grad_accum, num_steps=tcfg.steps, epochs=tcfg.epochs)
    _say(f"data: {data.num_samples:,} samples from {dcfg.data}")
    resuming = False
    if a.out and a.resume and (Path(a.out) / "checkpoints").is_dir():
        with Checkpointer(Path(a.out) / "checkpoints") as ck:
            resuming = ck.latest_step() is not None
    params = None
    if not resuming or tcfg.lora.enabled:  # a LoRA run's checkpoints hold the adapters only: the base is loaded every time
        shardings = S.param_shardings(abstract_params(cfg), mesh)
        if a.checkpoint:
            params, _ = load_converted(a.checkpoint, sharding=S.param_shardings(abstract_params(base_cfg), mesh))
            rms = None
            if a.hr_init == "copy-normed" and cfg.flex.enabled and "k_hr" not in params["text"]["layers"]["attn"]:
                rms = training_feature_rms(params, cfg, data, tokenizer)
            params, added = add_missing_hr_kernels(params, cfg, a.hr_init, tcfg.seed, shardings, feature_rms=rms)
            if added:
                how = {"copy": "as copies of k/v", "random": "N(0, 0.02)"}.get(
                    a.hr_init, f"as copies of k/v with the input norm folded in at the HR features' RMS {rms or 0:.4g}")
                _say(f"initialised {len(added)} FlexAttention kernels {how} (--hr-init {a.hr_init}): {', '.join(added)}")
        else:
            params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, jax.random.key(tcfg.seed))
    abstract = abstract_params(cfg)
    if a.print_sharding and jax.process_index() == 0:
        print(S.format_sharding_table(abstract, mesh)[0], flush=True)
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
    if jax.process_index() == 0:  # the command's result: stdout
        print("summary: " + json.dumps(summary, default=str), flush=True)
    return 0


def _load_tokenizer(path: str | None) -> Any:
    if path is None:
        from flexattn_jax.tokenizer import build_tokenizer

        return build_tokenizer()
    from flexattn_jax.tokenizer import load_tokenizer

    return load_tokenizer(path)


def main(argv: Sequence[str] | None = None, prog: str = "flexattn-jax train") -> int:
    """Run the train CLI; returns the exit status (2 on a config/data error, with the message on stderr)."""
    from flexattn_jax.interrupt import early_signals, exit_code
    from train.data import DataError
    from train.distributed import HostLost

    restore = early_signals()  # `python -m train` too: Ctrl-C / SIGTERM even when SIGINT was inherited as ignored
    try:
        a = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
        return run(a)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HostLost as e:  # another process of a multi-host run failed or went silent
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # before the run started (Terminated: SIGTERM)
        print("\ninterrupted", file=sys.stderr)
        return exit_code(e)
    finally:
        restore()
