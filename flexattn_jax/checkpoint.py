"""The converted-checkpoint format: a model directory that ``generate``, ``eval``, ``serve`` and ``train`` load.

``OUT/params`` (orbax PyTree, no compression), ``OUT/metadata.json`` (:data:`FORMAT`, the format
version, the source, ``model_config``) and the tokenizer files. :func:`write_model` writes into a
temporary sibling directory and renames it at the end, so a failed write leaves no output directory;
:func:`load_converted` restores with an abstract target (shapes, dtype and shardings known up front).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.params import abstract_params, flatten, unflatten
from flexattn_jax.sharding import param_shardings

CONVERTER_VERSION = "1.0.0"
"""The format version written into ``metadata.json`` (named for the converter that wrote the first ones)."""
FORMAT = "flexattn-jax-params"


class CheckpointError(ValueError):
    """A model directory cannot be read or written; the message names the file, key or shape at fault."""


def _shardings_for(abstract: dict, sharding: Any) -> Any:
    """A pytree of shardings for ``abstract`` from None / one Sharding / a Mesh / a pytree of shardings."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, abstract)
    if isinstance(sharding, jax.sharding.Mesh):
        return param_shardings(abstract, sharding)
    return sharding


def place(params: dict, mesh: jax.sharding.Mesh) -> dict:
    """Move a numpy tree onto ``mesh`` (by :func:`flexattn_jax.sharding.param_shardings`), leaf by leaf.

    The leaves are popped from ``params`` as they are placed, so host copies are freed as they go.
    """
    flat = flatten(params)
    params.clear()
    shardings = flatten(param_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unflatten(flat)), mesh))
    out = {}
    for name in list(flat):
        out[name] = jax.device_put(flat.pop(name), shardings[name])
    return unflatten(out)


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous PyTree checkpointer that neither copies host arrays nor compresses.

    Orbax's default numpy handler deep-copies every array before writing and zstd keeps the
    compressed chunks of all arrays in flight: together about 2x the model on top of the output.
    Without both, peak host memory while saving stays at the output itself.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


def save_params(params: dict, path: str | Path) -> None:
    """Save a parameter tree (numpy or jax arrays) with orbax at ``path`` (which must not exist)."""
    with _checkpointer() as ckptr:
        ckptr.save(Path(path).resolve(), args=ocp.args.PyTreeSave(params))


def write_model(
    params: dict,
    cfg: ModelConfig,
    out: str | Path,
    source: dict[str, Any],
    write_tokenizer: Callable[[Path], list[str]],
    overwrite: bool = False,
) -> Path:
    """Write a model directory: orbax params, metadata.json, tokenizer files.

    ``source`` goes into the metadata; ``write_tokenizer(directory)`` writes the tokenizer files and
    returns their names. Written to a temporary sibling and renamed into place: a failure leaves no
    partial ``out``, an existing ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_params(params, tmp / "params")
        meta = {
            "format": FORMAT,
            "converter_version": CONVERTER_VERSION,
            **source,
            "param_dtype": cfg.param_dtype,
            "num_params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))),
            "model_config": cfg.to_dict(),
        }
        meta["tokenizer_files"] = list(write_tokenizer(tmp))
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """``metadata.json`` of a model directory (checked to be one); every failure names the file."""
    path = Path(directory) / "metadata.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected one written by the converter)")
    if not path.exists():
        raise CheckpointError(f"{directory}: no metadata.json (not a directory written by the converter)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read converter metadata ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path}: not converter metadata (format {meta.get('format')!r})")
    return meta


def read_config(directory: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a model directory (cheap: metadata.json only); errors name the file."""
    try:
        return ModelConfig.from_dict(read_metadata(directory)["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(directory) / 'metadata.json'}: model_config: {e}") from e


def load_converted(directory: str | Path, dtype: str | None = None, sharding: Any = None) -> tuple[dict, ModelConfig]:
    """Restore ``(params, cfg)`` from a model directory.

    ``dtype`` casts the parameters (and sets ``cfg.param_dtype``/``cfg.dtype``). ``sharding`` is None
    (first device), one ``jax.sharding.Sharding`` for every leaf, a ``Mesh`` (placed by
    :func:`flexattn_jax.sharding.param_shardings`) or a pytree of shardings matching the params.
    """
    cfg = read_config(directory)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    abstract = abstract_params(cfg)
    shardings = _shardings_for(abstract, sharding)
    dt = jnp.dtype(cfg.param_dtype)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dt, sharding=s), abstract, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    params_dir = (Path(directory) / "params").resolve()
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: no params directory (a converted checkpoint holds params/ and metadata.json)")
    try:
        with _checkpointer() as ckptr:
            args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
            params = ckptr.restore(params_dir, args=args)
    except Exception as e:  # orbax / tensorstore raise many kinds for a truncated or corrupt directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"{params_dir}: cannot restore the parameters (truncated or corrupt?): {type(e).__name__}: {first}") from e
    return params, cfg
