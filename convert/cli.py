"""Command line: ``flexattn-jax convert SRC OUT ...`` (PyTorch -> ours) and ``flexattn-jax convert export CONVERTED OUT_HF``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flexattn_jax.checkpoint import CheckpointError
from flexattn_jax.config import ConfigError
from flexattn_jax.paths import OutputPathError, check_output_dir

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

The reverse direction: `%(prog)s export CONVERTED OUT_HF [--layout hf5|hf4|original]`."""


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
    return p


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
        if argv[:1] == ["export"]:
            a = build_export_parser(prog + " export").parse_args(argv[1:])
            _export(a.converted, a.out, a.layout, a.dtype, a.image_token_id, a.overwrite)
            return 0
        a = build_parser(prog).parse_args(argv)
        from convert.export import hf_config
        from convert.importer import convert_checkpoint
        from flexattn_jax.checkpoint import read_metadata

        check_output_dir(a.out, sources=[a.src, a.vision_tower], overwrite=a.overwrite, flag="OUT")
        check = None
        if a.to_hf:  # every check of the export runs before OUT is written
            check_output_dir(a.to_hf, sources=[a.src, a.vision_tower, a.out], overwrite=a.overwrite, flag="--to-hf")

            def check(cfg):
                return hf_config(cfg, a.layout, a.image_token_id)

        out = convert_checkpoint(a.src, a.out, vision_tower=a.vision_tower, dtype=a.dtype, mesh=a.mesh,
                                 overrides=a.overrides, overwrite=a.overwrite, progress=not a.no_progress,
                                 allow_nonfinite=a.allow_nonfinite, check=check, add_flex=a.add_flex)
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
