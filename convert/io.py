"""Converted checkpoints on disk: ``OUT/params`` (orbax), ``OUT/metadata.json`` and the tokenizer files.

:func:`convert_checkpoint` writes into a temporary sibling directory and renames it at the end, so a
failed conversion leaves no output directory. :func:`load_converted` restores with an abstract target.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from convert.importer import read_checkpoint
from convert.reader import ConvertError
from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.params import abstract_params, flatten, unflatten
from flexattn_jax.paths import OutputPathError, check_output_dir

CONVERTER_VERSION = "1.0.0"
FORMAT = "flexattn-jax-params"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def _shardings_for(abstract: dict, sharding: Any) -> Any:
    """A pytree of shardings for ``abstract`` from None / one Sharding / a Mesh / a pytree of shardings."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda _: sharding, abstract)
    if isinstance(sharding, jax.sharding.Mesh):
        return _param_shardings(abstract, sharding)
    return sharding


def _param_shardings(abstract: dict, mesh: jax.sharding.Mesh) -> Any:
    try:
        from flexattn_jax.sharding import param_shardings
    except ImportError as e:
        raise ConvertError("sharded placement needs flexattn_jax.sharding.param_shardings, which this install lacks") from e
    return param_shardings(abstract, mesh)


def _mesh(spec: str) -> jax.sharding.Mesh:
    try:
        from flexattn_jax.sharding import make_mesh
    except ImportError as e:
        raise ConvertError("--mesh needs flexattn_jax.sharding.make_mesh, which this install lacks") from e
    try:
        return make_mesh(spec)
    except ValueError as e:
        raise ConvertError(f"--mesh {spec}: {e}") from e


def place(params: dict, mesh: str | jax.sharding.Mesh) -> dict:
    """Move a numpy tree onto ``mesh`` (a Mesh or a spec like ``data=1,fsdp=8,tensor=1``), leaf by leaf.

    The leaves are popped from ``params`` as they are placed, so host copies are freed as they go.
    """
    mesh = _mesh(mesh) if isinstance(mesh, str) else mesh
    flat = flatten(params)
    params.clear()
    shardings = flatten(_param_shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), unflatten(flat)), mesh))
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


def save_params(params: dict, path: Path) -> None:
    """Save a parameter tree (numpy or jax arrays) with orbax at ``path`` (which must not exist)."""
    with _checkpointer() as ckptr:
        ckptr.save(Path(path).resolve(), args=ocp.args.PyTreeSave(params))


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / processor files present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    vision_tower: str | Path | None = None,
    dtype: str = "float32",
    mesh: str | jax.sharding.Mesh | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
    check: Any = None,
) -> Path:
    """Convert a PyTorch checkpoint directory into ``out`` (orbax params + metadata.json + tokenizer).

    Before anything is read: ``out`` is checked (:func:`flexattn_jax.paths.check_output_dir`: not the
    source, not containing or inside it, replaceable, writable) and ``mesh`` parsed. ``check(cfg)``
    runs once the config is known, before the tensors are read; ``allow_nonfinite`` skips the
    finiteness check of the weights.
    """
    try:
        out = check_output_dir(out, sources=[src, vision_tower], overwrite=overwrite, flag="OUT")
    except OutputPathError as e:
        raise ConvertError(str(e)) from None
    if isinstance(mesh, str):
        mesh = _mesh(mesh)
    converted = read_checkpoint(src, vision_tower=vision_tower, dtype=dtype, overrides=overrides, progress=progress,
                                allow_nonfinite=allow_nonfinite, check=check)
    params, converted.params = converted.params, {}
    if mesh is not None:
        params = place(params, mesh)
    source = {
        "source_layout": converted.layout,
        "source": str(Path(src).resolve()),
        "vision_source": None if converted.vision_source is None else str(converted.vision_source.resolve()),
    }
    return write_model(params, converted.cfg, out, source, lambda d: copy_tokenizer(Path(src), d), overwrite=True)


def write_model(
    params: dict, cfg: ModelConfig, out: str | Path, source: dict[str, Any], write_tokenizer: Any, overwrite: bool = False
) -> Path:
    """Write a model directory ``flexattn-jax generate`` loads: orbax params, metadata.json, tokenizer files.

    ``source`` goes into the metadata; ``write_tokenizer(directory)`` writes the tokenizer files and
    returns their names. Written to a temporary sibling and renamed into place: a failure leaves no
    partial ``out``, an existing ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")
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
    """``metadata.json`` of a converted directory (checked to be one); every failure names the file."""
    path = Path(directory) / "metadata.json"
    if not Path(directory).is_dir():
        raise ConvertError(f"{directory}: not a directory (expected one written by the converter)")
    if not path.exists():
        raise ConvertError(f"{directory}: no metadata.json (not a directory written by the converter)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read converter metadata ({e})") from e
    if not isinstance(meta, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise ConvertError(f"{path}: not converter metadata (format {meta.get('format')!r})")
    return meta


def load_converted(directory: str | Path, dtype: str | None = None, sharding: Any = None) -> tuple[dict, ModelConfig]:
    """Restore ``(params, cfg)`` from a converted directory.

    ``dtype`` casts the parameters (and sets ``cfg.param_dtype``/``cfg.dtype``). ``sharding`` is None
    (first device), one ``jax.sharding.Sharding`` for every leaf, a ``Mesh`` (placed by
    ``flexattn_jax.sharding.param_shardings``) or a pytree of shardings matching the params.
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
        raise ConvertError(f"{directory}: no params directory (a converted checkpoint holds params/ and metadata.json)")
    try:
        with _checkpointer() as ckptr:
            args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
            params = ckptr.restore(params_dir, args=args)
    except Exception as e:  # orbax / tensorstore raise many kinds for a truncated or corrupt directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConvertError(f"{params_dir}: cannot restore the parameters (truncated or corrupt?): {type(e).__name__}: {first}") from e
    return params, cfg


def read_config(directory: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of a converted directory (cheap: metadata.json only); errors name the file."""
    try:
        return ModelConfig.from_dict(read_metadata(directory)["model_config"])
    except ConfigError as e:
        raise ConvertError(f"{Path(directory) / 'metadata.json'}: model_config: {e}") from e
