"""PyTorch <-> flexattn-jax checkpoint converter (llava-hf 4.x/5.x, original LLaVA-1.5, FlexAttention release).

The model directory it writes is :mod:`flexattn_jax.checkpoint`'s format (load it with
``flexattn_jax.load_checkpoint``).
"""

from convert.export import export_hf
from convert.importer import Converted, convert_checkpoint, read_checkpoint
from convert.reader import ConvertError

__all__ = ["ConvertError", "Converted", "convert_checkpoint", "export_hf", "read_checkpoint"]
