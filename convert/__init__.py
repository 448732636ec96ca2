"""PyTorch <-> flexattn-jax checkpoint converter (llava-hf 4.x/5.x, original LLaVA-1.5, FlexAttention release)."""

from convert.export import export_hf
from convert.importer import Converted, read_checkpoint
from convert.io import CONVERTER_VERSION, convert_checkpoint, load_converted, read_config, read_metadata, write_model
from convert.reader import ConvertError

__all__ = [
    "CONVERTER_VERSION",
    "ConvertError",
    "Converted",
    "convert_checkpoint",
    "export_hf",
    "load_converted",
    "read_checkpoint",
    "read_config",
    "read_metadata",
    "write_model",
]
