"""Command line: ``flexattn-jax convert SRC OUT ...`` (PyTorch -> ours) and ``flexattn-jax convert export CONVERTED OUT_HF``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flexattn_jax.checkpoint import CheckpointError
from flexattn_jax.config import ConfigError
from flexattn_jax.paths import OutputPathError, check_output_dir
from flexattn_jax.quant import MODES as QUANT_MODES

DTYPES = ("float32", "bfloat16", "float16")

_DESCRIPTION = """\
Convert a PyTorch LLaVA-1.5 / FlexAttention checkpoint directory into flexattn-jax parameters:
OUT/params (orbax), OUT/metadata.json (model config, converter version, source layout) and the
tokenizer files. Layouts, detected from config.json and the key names: llava-hf saved by
transformers 4.x or 5.x, the original LLaVA-1.5 (LlavaLlamaForCausalLM; the CLIP tower comes from
--vision-tower unless the checkpoint holds it) and the FlexAttention release (original + k/v_proj_hd
and config 'extra'). Weights: model.safetensors, sharded safetensors with an index, or
pytorch_model*.bin (loaded with torch.load(weights_only=True)). Every parameter is shape-checked;
any missing, unexpected or misshaped tensor aborts with one error listing them all, and no output
directory is left behind.

The reverse direction: `%(prog)s export CONVERTED OUT_HF [--layout hf5|hf4|original]`.
A release LoRA run: `%(prog)s LORA_DIR OUT --model-base BASE` (adapter_config.json, adapter_model.*,
non_lora_trainables.bin, applied as the release's builder.py does; merged, or kept with --keep-adapters).
LoRA runs: `%(prog)s merge-lora --base BASE --lora RUN OUT`, `%(prog)s export-lora RUN OUT_PEFT`.
--quantize int8|int4|nf4 writes the decoder linears weight-only quantised (docs/lora.md)."""


def build_parser(prog: str = "flexattn-jax convert") -> argparse.ArgumentParser:
    """The parser of the import command (``SRC OUT``)."""
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="PyTorch checkpoint directory (config.json + weights)")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--vision-tower", metavar="DIR", help="CLIP directory for the original/FlexAttention layouts; ignored for llava-hf "
                   "(default: mm_vision_tower when it is a local directory)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype of the output (default: float32)")
    p.add_argument("--mesh", metavar="SPEC", help="place the params sharded before saving, e.g. data=1,fsdp=8,tensor=1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set flex.hr_budget=0.25 (repeatable)")
    p.add_argument("--add-flex", action="store_true", help="turn FlexAttention on in a plain LLaVA (any supported base): the "
                   "release's recipe (zoom 3, threshold 48, warmup 10), k_hr/v_hr copied from k/v; a decoder shallower than 9 "
                   "layers needs --set flex.first_select_layer=N")
    p.add_argument("--to-hf", metavar="OUT_HF", help="also export the converted params to a HF directory")
    p.add_argument("--layout", choices=("hf5", "hf4", "original"), default="hf5", help="layout for --to-hf (default: hf5)")
    p.add_argument("--image-token-id", type=int, help="image token id for a llava-hf export of an original checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUT / OUT_HF if they exist (never when one is, contains or lies "
                   "inside SRC)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert weights with NaN or infinite values (refused by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--model-base", metavar="BASE", help="SRC is a release LoRA directory (adapter_config.json, adapter_model.*, "
                   "non_lora_trainables.bin); BASE is its base model: a converted directory or a PyTorch checkpoint")
    p.add_argument("--keep-adapters", action="store_true", help="with --model-base: keep the adapters beside the kernels "
                   "instead of merging them")
    p.add_argument("--quantize", choices=QUANT_MODES, help="store the decoder linears weight-only quantised")
    return p


def build_merge_parser(prog: str = "flexattn-jax convert merge-lora") -> argparse.ArgumentParser:
    """The parser of ``merge-lora`` (a LoRA run or PEFT directory + its base -> a full model directory)."""
    p = argparse.ArgumentParser(prog=prog, description="Merge a LoRA run (a `train --lora` run directory, or a PEFT "
                                "directory such as the release's) into its base: a full model directory every command loads.")
    p.add_argument("--base", required=True, metavar="BASE", help="the base model: a converted directory or a PyTorch checkpoint")
    p.add_argument("--lora", required=True, metavar="RUN", help="a train run directory (checkpoints/) or a PEFT directory")
    p.add_argument("out", metavar="OUT", help="output model directory")
    p.add_argument("--keep-adapters", action="store_true", help="keep the adapters beside the kernels instead of merging")
    p.add_argument("--quantize", choices=QUANT_MODES, help="store the decoder linears weight-only quantised")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def build_export_lora_parser(prog: str = "flexattn-jax convert export-lora") -> argparse.ArgumentParser:
    """The parser of ``export-lora`` (our LoRA run -> a PEFT directory)."""
    p = argparse.ArgumentParser(prog=prog, description="Write the adapters of a `train --lora` run (or of a model directory "
                                "written with --keep-adapters) as a PEFT directory that peft's PeftModel.from_pretrained loads.")
    p.add_argument("run", metavar="RUN", help="a train run directory (checkpoints/) or a model directory with kept adapters")
    p.add_argument("out", metavar="OUT_PEFT", help="output directory")
    p.add_argument("--layout", choices=("hf5", "hf4", "original"), default="hf5",
                   help="module names: hf5 (transformers' LlavaForConditionalGeneration, default), hf4, original (the release)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_PEFT if it exists")
    return p


def _load_base(base: str):
    """(numpy params, cfg, tokenizer directory) of a converted directory or a PyTorch checkpoint."""
    from pathlib import Path

    import numpy as np

    from flexattn_jax.checkpoint import load_converted
    from flexattn_jax.params import flatten, unflatten

    if (Path(base) / "metadata.json").is_file():
        params, cfg = load_converted(base)
        return unflatten({k: np.asarray(v) for k, v in flatten(params).items()}), cfg
    from convert.importer import read_checkpoint

    converted = read_checkpoint(base, progress=False)
    return converted.params, converted.cfg


def merge_lora(base: str, lora_dir: str, out: str, keep_adapters: bool = False, quantize: str | None = None,
               overwrite: bool = False) -> str:
    """Apply a LoRA run (ours or a PEFT directory) to ``base`` and write a model directory; every check before writing."""
    import dataclasses
    from pathlib import Path

    import numpy as np

    from convert.lora import apply_release_run, is_peft_dir, read_run
    from convert.reader import ConvertError
    from flexattn_jax import lora as L
    from flexattn_jax import quant as Q
    from flexattn_jax.checkpoint import write_model
    from flexattn_jax.params import abstract_params, flatten, unflatten
    from flexattn_jax.tokenizer import copy_tokenizer

    check_output_dir(out, sources=[base, lora_dir], overwrite=overwrite, flag="OUT")
    params, cfg = _load_base(base)
    if is_peft_dir(lora_dir):
        flat, lcfg = apply_release_run(lora_dir, params, cfg, merge=not keep_adapters)
    else:
        trained, lcfg, run_cfg, step = read_run(lora_dir)
        cfg = dataclasses.replace(run_cfg, dtype=cfg.dtype, param_dtype=cfg.param_dtype)  # the run's model, the base's dtypes
        flat = {k: np.array(v) for k, v in flatten(params).items()}
        lacking = sorted(set(flatten(abstract_params(cfg))) - set(flat) - set(trained))
        if lacking:
            raise ConvertError(f"{lora_dir}: the run's model_config needs {lacking[0]}, which neither the base {base} nor the "
                               "run's checkpoint holds (kernels added at training are saved only when they train: --trainable hr)")
        for name, x in trained.items():
            if not L.is_adapter(name) and (name not in flat or flat[name].shape != x.shape):
                raise ConvertError(f"{lora_dir}: step {step} trained {name} {list(x.shape)}, which the base {base} "
                                   f"{'lacks' if name not in flat else 'has as ' + str(list(flat[name].shape))}")
            flat[name] = x.astype(flat[name].dtype) if name in flat else x
        adapters = {k: flat.pop(k) for k in list(flat) if L.is_adapter(k)}
        L.with_adapters(unflatten(flat), adapters)  # every adapter has its kernel in the base
        flat = flatten(L.merge(unflatten({**flat, **adapters}), lcfg.scale)) if not keep_adapters else {**flat, **adapters}
        flat = {k: np.asarray(v) for k, v in flat.items()}
    tree = unflatten(flat)
    if quantize:
        if keep_adapters:
            raise ConvertError("--quantize with --keep-adapters: quantise the merged model (drop --keep-adapters)")
        tree = Q.quantize_params(tree, quantize)
    source = {"source_layout": "lora", "source": str(Path(lora_dir).resolve()), "base": str(Path(base).resolve()),
              "lora": lcfg.to_dict() if keep_adapters else None, "quantization": quantize}
    write_model(tree, cfg, out, source, lambda d: copy_tokenizer(Path(base), d), overwrite=overwrite)
    return out


def export_lora(run: str, out: str, layout: str, overwrite: bool) -> str:
    """Write a LoRA run's (or a kept-adapters model directory's) adapters as a PEFT directory."""
    from pathlib import Path

    from convert.lora import read_run, write_peft_dir
    from flexattn_jax import lora as L
    from flexattn_jax.checkpoint import load_converted, read_metadata
    from flexattn_jax.params import flatten

    check_output_dir(out, sources=[run], overwrite=overwrite, flag="OUT_PEFT")
    if (Path(run) / "metadata.json").is_file():
        meta = read_metadata(run)
        if not meta.get("lora"):
            raise CheckpointError(f"{Path(run) / 'metadata.json'}: no 'lora' field: the model directory holds no adapters")
        params, cfg = load_converted(run)
        lcfg = L.LoraConfig(**meta["lora"])
        adapters = {k: v for k, v in flatten(L.scaled(params, 1.0 / lcfg.scale)).items() if L.is_adapter(k)}
    else:
        trained, lcfg, cfg, _ = read_run(run)
        adapters = {k: v for k, v in trained.items() if L.is_adapter(k)}
    write_peft_dir(adapters, lcfg, cfg, out, layout=layout, base=None)
    return out


def build_export_parser(prog: str = "flexattn-jax convert export") -> argparse.ArgumentParser:
    """The parser of the export command (``CONVERTED OUT_HF``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a converted directory back to a HF checkpoint (config.json + model.safetensors) that "
        "transformers' LlavaForConditionalGeneration loads (hf5/hf4), or to the original LLaVA layout.",
    )
    p.add_argument("converted", metavar="CONVERTED", help="a directory written by the converter")
    p.add_argument("out", metavar="OUT_HF", help="output directory")
    p.add_argument("--layout", choices=("hf5", "hf4", "original"), default="hf5", help="key layout (default: hf5)")
    p.add_argument("--dtype", choices=DTYPES, help="cast the tensors (default: as stored)")
    p.add_argument("--image-token-id", type=int, help="image token id for a llava-hf export of an original checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_HF if it exists")
    return p


def _export(converted: str, out: str, layout: str, dtype: str | None, image_token_id: int | None, overwrite: bool) -> None:
    from convert.export import export_hf, hf_config
    from flexattn_jax.checkpoint import load_converted, read_config

    check_output_dir(out, sources=[converted], overwrite=overwrite, flag="OUT_HF")
    hf_config(read_config(converted), layout, image_token_id)  # the export's config checks, before restoring
    params, cfg = load_converted(converted, dtype=dtype)
    export_hf(params, cfg, out, layout=layout, image_token_id=image_token_id, tokenizer_dir=converted, overwrite=overwrite)
    print(f"wrote {out} (layout {layout}, {cfg.param_dtype})")


def main(argv: Sequence[str] | None = None, prog: str = "flexattn-jax convert") -> int:
    """Run the converter CLI; returns the exit status (2 on a conversion error, with the message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge-lora"]:
            a = build_merge_parser(prog + " merge-lora").parse_args(argv[1:])
            merge_lora(a.base, a.lora, a.out, a.keep_adapters, a.quantize, a.overwrite)
            print(f"wrote {a.out} ({'adapters kept' if a.keep_adapters else 'merged'}{', ' + a.quantize if a.quantize else ''})")
            return 0
        if argv[:1] == ["export-lora"]:
            a = build_export_lora_parser(prog + " export-lora").parse_args(argv[1:])
            export_lora(a.run, a.out, a.layout, a.overwrite)
            print(f"wrote {a.out} (PEFT, layout {a.layout})")
            return 0
        if argv[:1] == ["export"]:
            a = build_export_parser(prog + " export").parse_args(argv[1:])
            _export(a.converted, a.out, a.layout, a.dtype, a.image_token_id, a.overwrite)
            return 0
        a = build_parser(prog).parse_args(argv)
        if a.model_base:
            from convert.lora import read_peft_config

            read_peft_config(a.src)  # SRC must be a PEFT directory (the release's LoRA output)
            merge_lora(a.model_base, a.src, a.out, a.keep_adapters, a.quantize, a.overwrite)
            print(f"wrote {a.out} (release LoRA run {'kept' if a.keep_adapters else 'merged'} over {a.model_base})")
            return 0
        from convert.export import hf_config
        from convert.importer import convert_checkpoint
        from flexattn_jax.checkpoint import read_metadata

        check_output_dir(a.out, sources=[a.src, a.vision_tower], overwrite=a.overwrite, flag="OUT")
        check = None
        if a.quantize and a.to_hf:
            raise CheckpointError("--quantize with --to-hf: the HF export takes the unquantised weights (drop one)")
        if a.to_hf:  # every check of the export runs before OUT is written
            check_output_dir(a.to_hf, sources=[a.src, a.vision_tower, a.out], overwrite=a.overwrite, flag="--to-hf")

            def check(cfg):
                return hf_config(cfg, a.layout, a.image_token_id)

        out = convert_checkpoint(a.src, a.out, vision_tower=a.vision_tower, dtype=a.dtype, mesh=a.mesh,
                                 overrides=a.overrides, overwrite=a.overwrite, progress=not a.no_progress,
                                 allow_nonfinite=a.allow_nonfinite, check=check, quantize=a.quantize,
                                 add_flex=a.add_flex)
        meta = read_metadata(out)
        print(f"wrote {out} (source layout {meta['source_layout']}, {meta['num_params']:,} params, {meta['param_dtype']})")
        if a.to_hf:
            _export(str(out), a.to_hf, a.layout, None, a.image_token_id, a.overwrite)
        return 0
    except (CheckpointError, ConfigError, OutputPathError) as e:  # ConvertError is a CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
