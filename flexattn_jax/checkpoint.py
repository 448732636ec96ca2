"""The converted-checkpoint format: a model directory that ``generate``, ``eval``, ``serve`` and ``train`` load.

``OUT/params`` (orbax PyTree, no compression), ``OUT/metadata.json`` (:data:`FORMAT`, the format
version, the source, ``model_config``) and the tokenizer files. :func:`write_model` writes into a
temporary sibling directory and renames it at the end, so a failed write leaves no output directory;
:func:`load_converted` restores with an abstract target (shapes, dtype and shardings known up front).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.lora import LoraConfig, init_adapters, scaled, with_adapters
from flexattn_jax.params import abstract_params, flatten, unflatten
from flexattn_jax.quant import MODES as QUANT_MODES
from flexattn_jax.quant import from_stored, is_scale, quantized_abstract, storable, stored_dtype
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
        ckptr.save(Path(path).resolve(), args=ocp.args.PyTreeSave(storable(params)))


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
    abstract, lcfg = stored_abstract(directory, cfg)
    shardings = _shardings_for(abstract, sharding)
    dt = jnp.dtype(cfg.param_dtype)

    def leaf(path: tuple, a: jax.ShapeDtypeStruct, s: Any) -> jax.ShapeDtypeStruct:
        """Quantised kernels stay ints and their scales as stored (NF4's fp32 absmax and offset are part of its format)."""
        keep = not jnp.issubdtype(a.dtype, jnp.floating) or is_scale("/".join(str(getattr(k, "key", k)) for k in path))
        return jax.ShapeDtypeStruct(a.shape, stored_dtype(a.dtype) if keep else dt, sharding=s)

    target = jax.tree_util.tree_map_with_path(leaf, abstract, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    params_dir = (Path(directory) / "params").resolve()
    if not params_dir.is_dir():
        raise CheckpointError(f"{directory}: no params directory (a converted checkpoint holds params/ and metadata.json)")
    failure = None
    try:
        with _checkpointer() as ckptr:
            stored = _stored_shapes(ckptr, params_dir)
            if stored is not None:  # before restoring: a mismatch is named, and no restore is left half done
                _check_shapes(directory, cfg, stored, {"/".join(k): tuple(v.shape) for k, v in _flat_paths(abstract)})
            args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
            params = ckptr.restore(params_dir, args=args)
    except CheckpointError:
        raise
    except Exception as e:  # orbax / tensorstore raise many kinds for a truncated or corrupt directory
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        failure = f"{params_dir}: cannot restore the parameters (truncated or corrupt?): {type(e).__name__}: {first}"
    if failure is not None:  # outside the handler: the traceback, and the read tasks it holds, are gone
        _silence_orphaned_reads()
        raise CheckpointError(failure)
    params = from_stored(params, abstract)
    if lcfg is not None:  # adapters kept beside the kernels: the forward takes B scaled by alpha / r
        params = scaled(params, lcfg.scale)
    return params, cfg


def _from_orbax(tb: Any, code: Any = None) -> bool:
    """Whether a traceback (or a coroutine's code) runs in orbax."""
    files = [code.co_filename] if code is not None else []
    while tb is not None:
        files, tb = [*files, tb.tb_frame.f_code.co_filename], tb.tb_next
    return any("orbax" in f for f in files)


def _is_read_echo(record: logging.LogRecord) -> bool:
    """An asyncio "... exception was never retrieved" record of a TensorStore read (a task in orbax, or its future)."""
    message = record.getMessage()
    return "never retrieved" in message and (_from_orbax(record.exc_info and record.exc_info[2]) or "TensorStore" in message
                                             or "OCDBT" in message)


def _silence_orphaned_reads() -> None:
    """From the first failed restore on, drop the echoes of its sibling reads; then collect what can be collected now.

    Orbax reads every array in an asyncio ``gather``; when one read fails, the other reads' errors are never retrieved
    and their suspended coroutines raise again when finalised. asyncio logs each (a page of TensorStore specs) and
    Python reports each "Exception ignored" whenever the garbage collector reaches them: at a time no one controls,
    into whatever the process prints next. The one failure is already named in the :class:`CheckpointError`, so these
    echoes are dropped for the rest of the process (only those of orbax's and TensorStore's reads).
    """
    global _SILENCED
    if not _SILENCED:
        _SILENCED = True
        logging.getLogger("asyncio").addFilter(lambda r: not _is_read_echo(r))  # a callable is a filter
        hook = sys.unraisablehook
        sys.unraisablehook = lambda u: None if _from_orbax(u.exc_traceback, getattr(u.object, "cr_code", None)) else hook(u)
    gc.collect()


_SILENCED = False


def stored_abstract(directory: str | Path, cfg: ModelConfig) -> tuple[dict, LoraConfig | None]:
    """The abstract tree a model directory stores for ``cfg``: :func:`abstract_params`, quantised when its metadata names a
    ``quantization`` (:mod:`flexattn_jax.quant`), with adapters when it holds a ``lora`` config (kept unmerged)."""
    meta = read_metadata(directory)
    abstract = abstract_params(cfg)
    lcfg = None
    if meta.get("lora"):
        try:
            lcfg = LoraConfig(**meta["lora"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{Path(directory) / 'metadata.json'}: lora: {e}") from None
        adapters = jax.eval_shape(lambda: init_adapters(abstract, lcfg, jax.random.key(0)))
        abstract = with_adapters(abstract, adapters)
    if meta.get("quantization"):
        mode = meta["quantization"]
        if mode not in QUANT_MODES:
            raise CheckpointError(f"{Path(directory) / 'metadata.json'}: quantization={mode!r}; known: {', '.join(QUANT_MODES)}")
        abstract = quantized_abstract(abstract, mode)
    return abstract, lcfg


def _flat_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(tuple(str(getattr(k, "key", k)) for k in p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _stored_shapes(ckptr: Any, params_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """``{'text/embed/embedding': shape}`` from the orbax metadata of ``params_dir`` (None when unreadable: the
    restore then reports the damage)."""
    try:
        meta = ckptr.metadata(params_dir)
    except Exception:  # noqa: BLE001 - a damaged directory: left to the restore's error
        return None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {"/".join(k): tuple(x.shape) for k, x in _flat_paths(tree) if hasattr(x, "shape")}


def _check_shapes(directory: str | Path, cfg: ModelConfig, stored: dict[str, tuple], wanted: dict[str, tuple]) -> None:
    """Raise :class:`CheckpointError` naming the first parameter whose stored shape differs from ``model_config``'s,
    both shapes and the config settings that give the differing dimension."""
    where = Path(directory) / "metadata.json"
    wrong = [(k, stored[k], v) for k, v in wanted.items() if k in stored and stored[k] != v]
    missing = [k for k in wanted if k not in stored]
    extra = [k for k in stored if k not in wanted]
    if wrong:
        name, there, here = wrong[0]
        settings = _settings_for(cfg, there, here)
        why = f"; {where} sets {', '.join(settings)}" if settings else ""
        more = f" (and {len(wrong) - 1} more parameters)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{directory}/params: parameter {name} is stored as {list(there)} but the model_config in "
                              f"{where} makes it {list(here)}{more}{why}: metadata.json does not match the parameters")
    if missing or extra:
        what = (f"lacks {', '.join(missing[:3])}" if missing else "") + (" and " if missing and extra else "") + \
            (f"has {', '.join(extra[:3])} that the model_config does not" if extra else "")
        raise CheckpointError(f"{directory}/params {what} (model_config in {where}: flex.enabled={cfg.flex.enabled}, "
                              f"text.num_layers={cfg.text.num_layers}): metadata.json does not match the parameters")


def _settings_for(cfg: ModelConfig, there: tuple, here: tuple) -> list[str]:
    """The model_config fields whose value is a dimension in which the two shapes differ, e.g. ``text.vocab_size=1000
    (the stored array has 512)``."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fields = {k: v for k, v in flat(cfg.to_dict()).items() if isinstance(v, int) and not isinstance(v, bool)}
    if len(there) != len(here):
        return []
    out = []
    for a, b in zip(there, here, strict=True):
        if a != b:
            out += [f"{k}={v} (the stored array has {a})" for k, v in fields.items() if v == b]
    return out[:4]
