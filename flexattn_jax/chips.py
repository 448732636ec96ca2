"""The accelerators the project knows: memory per chip and dense bf16 peak FLOP/s, in one table.

Read by training's MFU (the peak of the device it runs on), ``flexattn-jax compile`` (the target's HBM and
peak) and the accelerator benchmark. Figures are the vendors' data sheets (docs/flops.md lists them):
Cloud TPU system architecture pages (v4 32 GiB / 275 TFLOP/s, v5e 16 GiB / 197, v5p 95 GiB / 459, v6e
32 GiB / 918); NVIDIA H100 SXM and H200 (989 TFLOP/s dense bf16; memory as their shipped device
descriptions report it), A100 SXM 80 GB (312), L4 (121), B200 (2250).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind: memory per chip, bf16 dense peak FLOP/s, and (TPU) the topology's geometry."""

    family: str  # v4, v5e, v5p, v6e, h100, h200, ...
    platform: str  # tpu or gpu
    hbm_bytes: int
    peak_flops: float  # bf16, dense, vendor sheet
    device_kinds: tuple[str, ...]  # jax's Device.device_kind spellings (matched as substrings, longest wins)
    cores_per_chip: int = 1  # the '-N' spelling counts TensorCores on v4 / v5p
    dims: int = 2  # TPU torus dimensions
    spec_file: str | None = None  # GPU: the device description shipped for deviceless compiles
    hbm_bytes_per_s: float | None = None  # HBM bandwidth, vendor sheet (rooflines); None where not listed


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * GiB, 275e12, ("TPU v4",), cores_per_chip=2, dims=3, hbm_bytes_per_s=1.2e12),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, ("TPU v5 lite", "TPU v5e"), hbm_bytes_per_s=0.82e12),
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, ("TPU v5p", "TPU v5"), cores_per_chip=2, dims=3, hbm_bytes_per_s=2.76e12),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12, ("TPU v6 lite", "TPU v6e"), hbm_bytes_per_s=1.64e12),
    "h100": Chip("h100", "gpu", 84942979072, 989e12, ("H100",), spec_file="h100_sxm.txtpb", hbm_bytes_per_s=3.35e12),
    "h200": Chip("h200", "gpu", 151397597184, 989e12, ("H200",), spec_file="h200.txtpb", hbm_bytes_per_s=4.8e12),
    "a100": Chip("a100", "gpu", 80 * 10**9, 312e12, ("A100",)),
    "l4": Chip("l4", "gpu", 24 * 10**9, 121e12, ("L4",)),
    "b200": Chip("b200", "gpu", 192 * 10**9, 2250e12, ("B200",)),
}


def chip_of(device_kind: str) -> Chip | None:
    """The :data:`CHIPS` entry whose device-kind spelling is the longest substring of ``device_kind``
    (``'NVIDIA H100 80GB HBM3'``, ``'TPU v5 lite'``); None when none is (a CPU)."""
    kind = device_kind.lower()
    hits = [(len(name), chip) for chip in CHIPS.values() for name in chip.device_kinds if name.lower() in kind]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device of ``device_kind``; None when unknown (a CPU has none)."""
    chip = chip_of(device_kind)
    return None if chip is None else chip.peak_flops


def device_peak_tflops(device=None) -> float | None:
    """Dense bf16 peak TFLOP/s of ``device`` (default: jax's first device), or None when unknown."""
    import jax

    device = device or jax.devices()[0]
    peak = peak_flops(getattr(device, "device_kind", ""))
    return None if peak is None else peak / 1e12
