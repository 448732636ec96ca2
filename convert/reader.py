"""Streaming readers for PyTorch checkpoint files: safetensors (single or sharded) and ``pytorch_model*.bin``.

Safetensors files are parsed directly (header + one ``readinto`` per tensor), so bf16 needs no
torch and a tensor is in memory only while it is converted. ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``: plain tensors only, never arbitrary pickled code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from flexattn_jax.checkpoint import CheckpointError
from flexattn_jax.paths import is_within


class ConvertError(CheckpointError):
    """A checkpoint cannot be converted; the message names every file / key / shape at fault."""


SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16"})  # safetensors / torch names


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


class TensorFile:
    """One checkpoint file: ``keys()`` (shapes, no data) and ``read(key)`` (one tensor as numpy)."""

    path: Path

    def keys(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    """A ``.safetensors`` file read by its header; every tensor's byte range is checked against the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        self._f = open(self.path, "rb")  # noqa: SIM115
        try:
            head = self._f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConvertError(f"{self.path}: truncated or corrupt safetensors file (header {n} bytes, file {size} bytes)")
            try:
                header = json.loads(self._f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConvertError(f"{self.path}: corrupt safetensors header ({e})") from e
            self._start = 8 + n
            self._info: dict[str, tuple[TensorInfo, int, int]] = {}
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                try:
                    dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
                    begin, end = int(begin), int(end)
                except (KeyError, TypeError, ValueError) as e:
                    what = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else "dtype, shape or data_offsets malformed"
                    raise ConvertError(f"{self.path}: corrupt safetensors header: tensor {key!r}: {what} ({meta!r:.120})") from None
                if dtype not in SAFETENSORS_DTYPES:
                    raise ConvertError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype}")
                nbytes = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
                if end - begin != nbytes:
                    msg = f"tensor {key!r} {dtype}{list(shape)} is {nbytes} bytes, the header says {end - begin}"
                    raise ConvertError(f"{self.path}: {msg}")
                if self._start + end > size:
                    raise ConvertError(
                        f"{self.path}: truncated safetensors file: tensor {key!r} ends at byte {self._start + end} of {size}"
                    )
                self._info[key] = (TensorInfo(shape, dtype), begin, end)
        except BaseException:
            self._f.close()
            raise

    def keys(self) -> dict[str, TensorInfo]:
        return {k: v[0] for k, v in self._info.items()}

    def read(self, key: str) -> np.ndarray:
        info, begin, end = self._info[key]
        buf = np.empty(end - begin, np.uint8)
        self._f.seek(self._start + begin)
        if self._f.readinto(memoryview(buf)) != end - begin:
            raise ConvertError(f"{self.path}: short read for tensor {key!r}")
        return buf.view(SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        self._f.close()


class TorchBinFile(TensorFile):
    """A ``pytorch_model*.bin`` state dict, loaded with ``weights_only=True`` (memory-mapped when possible)."""

    def __init__(self, path: Path) -> None:
        import pickle

        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a test dependency
            raise ConvertError(f"{path}: reading .bin checkpoints needs torch (pip install torch); safetensors do not") from e
        self.path = Path(path)
        errors = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError)
        try:
            try:
                sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except errors as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{self.path}: cannot load with torch.load(weights_only=True): {first}") from e
        if not isinstance(sd, dict):
            raise ConvertError(f"{self.path}: expected a state dict (dict of tensors), found {type(sd).__name__}")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ConvertError(f"{self.path}: entries that are not tensors: {bad[:10]}")
        self._sd = sd
        self._torch = torch

    def keys(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in self._sd.items()}

    def read(self, key: str) -> np.ndarray:
        t = self._sd[key].detach()
        if t.dtype == self._torch.bfloat16:
            return t.float().numpy()  # exact: bf16 is a prefix of f32
        return t.numpy()

    def close(self) -> None:
        self._sd = {}


def open_file(path: Path) -> TensorFile:
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: file not found")
    return SafetensorsFile(path) if path.suffix == ".safetensors" else TorchBinFile(path)


_CANDIDATES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def _inside(directory: Path, name: str) -> bool:
    """Whether the shard file ``name`` of an index lies strictly inside ``directory`` (no ``..``, no absolute path)."""
    return not Path(name).is_absolute() and is_within(directory / name, directory) and not is_within(directory, directory / name)


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint directory, and the index's ``weight_map`` when sharded.

    Preference: sharded safetensors, single safetensors, sharded ``.bin``, single ``.bin``. A shard
    named by the index but absent is an error naming it.
    """
    directory = Path(directory)
    for name in _CANDIDATES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return [path], None
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{path}: not a valid checkpoint index (needs a 'weight_map'): {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConvertError(f"{path}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if not _inside(directory, s)]
        if outside:
            raise ConvertError(f"{path} names shard(s) outside {directory}, refused: {outside[:5]}")
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            n = {s: sum(1 for v in weight_map.values() if v == s) for s in missing}
            raise ConvertError(
                f"{path} names shard(s) that do not exist: " + ", ".join(f"{directory / s} ({n[s]} tensors)" for s in missing)
            )
        return [directory / s for s in shards], weight_map
    raise ConvertError(f"{directory}: no checkpoint weights found (looked for {', '.join(_CANDIDATES)})")
