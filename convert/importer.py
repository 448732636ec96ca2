"""PyTorch checkpoint directory -> our parameter tree (numpy), strictly checked, one tensor at a time;
:func:`convert_checkpoint` writes it as a model directory (:mod:`flexattn_jax.checkpoint`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.mapping import BY_OURS, Rule, Target, canonical, export_name, is_ignored, lookup, to_ours, torch_shape
from convert.reader import FLOATING_DTYPES, ConvertError, TensorInfo, checkpoint_files, open_file
from flexattn_jax.checkpoint import place, write_model
from flexattn_jax.config import ConfigError, ModelConfig
from flexattn_jax.hf_config import detect_layout, from_hf_config
from flexattn_jax.logs import progress as progress_bar
from flexattn_jax.params import abstract_params, add_hr_projections, flatten, unflatten
from flexattn_jax.paths import OutputPathError, check_output_dir
from flexattn_jax.presets import with_release_recipe
from flexattn_jax.sharding import make_mesh
from flexattn_jax.tokenizer import copy_tokenizer

IN_CHECKPOINT_VISION = "model.vision_tower.vision_tower.vision_model."
MAX_LISTED = 40  # per problem kind, in the error message


@dataclass
class Source:
    """The tensors of one checkpoint directory and how to read their names."""

    label: str
    directory: Path
    layouts: list[str]
    ignore: tuple[str, ...]
    keys: dict[Path, dict[str, TensorInfo]]


@dataclass
class Converted:
    """What :func:`read_checkpoint` returns: the numpy parameter tree and where it came from."""

    params: dict
    cfg: ModelConfig
    layout: str  # 'hf4' | 'hf5' | 'original' | 'flexattn'
    source: Path
    vision_source: Path | None


def _scan(label: str, directory: Path, layouts: list[str], ignore: tuple[str, ...], problems: list[str]) -> Source:
    files, weight_map = checkpoint_files(directory)
    keys: dict[Path, dict[str, TensorInfo]] = {}
    for path in files:
        with open_file(path) as f:
            keys[path] = f.keys()
    if weight_map is not None:
        for key, shard in weight_map.items():
            if key not in keys[directory / shard]:
                problems.append(f"index lists {key!r} in {directory / shard}, but that shard does not contain it")
    return Source(label, directory, layouts, ignore, keys)


def _vision_dir(src: Path, config: dict[str, Any], vision_tower: str | Path | None) -> Path | None:
    if vision_tower is not None:
        path = Path(vision_tower)
        if not (path / "config.json").exists():
            raise ConvertError(f"--vision-tower {path}: no config.json there (expected a CLIPVisionModel/CLIPModel directory)")
        return path
    tower = config.get("mm_vision_tower")
    if tower:
        for cand in (src / tower, Path(tower)):
            if (cand / "config.json").exists():
                return cand
    return None


def _listing(kind: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = items[:MAX_LISTED]
    more = [f"    ... and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else []
    return [f"  {kind} ({len(items)}):"] + [f"    {s}" for s in shown] + more


def plan(cfg: ModelConfig, sources: list[Source], export_layout: str) -> dict[tuple[str, int | None], tuple[Path, str, Rule]]:
    """Assign every target leaf (slice) one source tensor; raise one :class:`ConvertError` listing all problems."""
    abstract = flatten(abstract_params(cfg))
    found: dict[tuple[str, int | None], tuple[Path, str, Rule]] = {}
    unexpected: list[str] = []
    shapes: list[str] = []
    dupes: list[str] = []
    dtypes: list[str] = []
    misshaped: set[tuple[str, int | None]] = set()
    for source in sources:
        for path, infos in source.keys.items():
            for key, info in infos.items():
                if is_ignored(key, source.ignore):
                    continue
                name = canonical(key, source.layouts)
                target: Target | None = None if name is None else lookup(name)
                if target is not None and target.leaf == "text/lm_head/kernel" and cfg.text.tie_word_embeddings:
                    continue  # tied: lm_head is embed_tokens
                leaf = None if target is None else abstract.get(target.leaf)
                why = ""
                if target is not None and leaf is None and target.leaf.startswith("text/layers/attn/") and "_hr" in target.leaf:
                    why = " (FlexAttention weights, but config.json has no 'extra' with zoom_ratio)"
                if target is not None and leaf is not None and target.rule.stacked and target.index >= leaf.shape[0]:
                    why = f" (layer {target.index}, but the config has {leaf.shape[0]} layers)"
                    leaf = None
                if target is None or leaf is None:
                    unexpected.append(f"{path}: {key} {list(info.shape)}{why}")
                    continue
                want = torch_shape(target.rule.kind, leaf.shape[1:] if target.rule.stacked else leaf.shape)
                if tuple(info.shape) != want:
                    shapes.append(f"{path}: {key}: expected {list(want)}, found {list(info.shape)}")
                    misshaped.add((target.leaf, target.index))
                    continue
                slot = (target.leaf, target.index)
                if info.dtype not in FLOATING_DTYPES:
                    dtypes.append(f"{path}: {key}: {info.dtype}, but {target.leaf} is a floating-point parameter")
                    misshaped.add(slot)
                    continue
                if slot in found:
                    other_path, other_key, _ = found[slot]
                    dupes.append(f"{key} ({path}) and {other_key} ({other_path}) are both {target.leaf}[{target.index}]")
                    continue
                found[slot] = (path, key, target.rule)
    missing: list[str] = []
    for leaf, sds in abstract.items():
        rule = BY_OURS[leaf]
        for idx in range(sds.shape[0]) if rule.stacked else [None]:
            if (leaf, idx) not in found and (leaf, idx) not in misshaped:
                shape = torch_shape(rule.kind, sds.shape[1:] if rule.stacked else sds.shape)
                where = f"{leaf}[{idx}]" if rule.stacked else leaf
                missing.append(f"{export_name(rule, idx, export_layout, cfg)} {list(shape)} (-> {where})")
    lines = _listing("missing", missing) + _listing("unexpected", unexpected) + _listing("wrong shape", shapes)
    lines += _listing("not floating-point", dtypes) + _listing("duplicate", dupes)
    if lines:
        dirs = ", ".join(f"{s.label} {s.directory}" for s in sources)
        raise ConvertError(f"cannot convert {dirs}: the tensors do not match the config:\n" + "\n".join(lines))
    return found


def read_checkpoint(
    src: str | Path,
    vision_tower: str | Path | None = None,
    dtype: str = "float32",
    overrides: list[str] | dict[str, Any] | None = None,
    progress: bool = True,
    allow_nonfinite: bool = False,
    check: Callable[[ModelConfig], Any] | None = None,
) -> Converted:
    """Read a llava-hf (4.x/5.x), original LLaVA-1.5 or FlexAttention checkpoint into our numpy tree.

    ``vision_tower`` is the CLIP directory of the original layouts (default: ``mm_vision_tower`` when
    it is a local directory; unused for weights when the checkpoint holds the vision tower itself).
    ``check(cfg)`` runs once the config is known, before any tensor is read (e.g. an export's config
    checks). Tensors with NaN or infinite values (after the cast to ``dtype``) are refused, naming
    them, unless ``allow_nonfinite``.
    """
    src = Path(src)
    if not (src / "config.json").exists():
        raise ConvertError(f"{src}: no config.json (expected a checkpoint directory)")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ConfigError(f"expected a JSON object, got {type(config).__name__}")
        kind = detect_layout(config)
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from e
    problems: list[str] = []
    vision_dir = None
    if kind == "llava-hf":
        main = _scan("checkpoint", src, ["hf5", "hf4"], (), problems)
        hf5 = any(k.startswith("model.") for infos in main.keys.values() for k in infos)
        layout = "hf5" if hf5 else "hf4"
        sources = [main]
    else:
        layout = "original" if kind == "llava-original" else "flexattn"
        main = _scan("checkpoint", src, ["original"], (), problems)
        sources = [main]
        vision_dir = _vision_dir(src, config, vision_tower)
        inside = any(k.startswith(IN_CHECKPOINT_VISION) for infos in main.keys.values() for k in infos)
        if not inside:
            if vision_dir is None:
                raise ConvertError(
                    f"{src}: the vision tower is not inside this checkpoint and mm_vision_tower="
                    f"{config.get('mm_vision_tower')!r} is not a local directory; pass --vision-tower DIR "
                    "(a CLIPVisionModel or CLIPModel save_pretrained directory)"
                )
            sources.append(_scan("vision tower", vision_dir, ["clip"], ("clip",), problems))
    try:
        dtypes = {"dtype": dtype, "param_dtype": dtype}
        if isinstance(overrides, dict):
            every = {**dtypes, **overrides}
        else:
            every = [f"{k}={v}" for k, v in dtypes.items()] + list(overrides or [])
        cfg = from_hf_config(src / "config.json", vision_config=vision_dir, overrides=every)
    except ConfigError as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from e
    if problems:
        raise ConvertError(f"cannot convert {src}:\n" + "\n".join(f"  {p}" for p in problems))
    if check is not None:
        check(cfg)
    found = plan(cfg, sources, "original" if layout == "flexattn" else layout)
    params = fill(cfg, found, progress, allow_nonfinite=allow_nonfinite)
    used_vision = vision_dir if len(sources) > 1 else None
    return Converted(params=params, cfg=cfg, layout=layout, source=src, vision_source=used_vision)


def fill(
    cfg: ModelConfig, found: dict[tuple[str, int | None], tuple[Path, str, Rule]], progress: bool = True, allow_nonfinite: bool = False
) -> dict:
    """Preallocate every leaf and fill it, reading one tensor at a time, file by file.

    Unless ``allow_nonfinite``, every tensor is checked to be finite after the cast (a float32 weight
    beyond float16's range becomes inf); all offenders are listed in one :class:`ConvertError`.
    """
    abstract = flatten(abstract_params(cfg))
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    out = {leaf: np.empty(s.shape, dtype) for leaf, s in abstract.items()}
    nonfinite: list[str] = []
    by_file: dict[Path, list[tuple[str, str, int | None, Rule]]] = {}
    for (leaf, idx), (path, key, rule) in found.items():
        by_file.setdefault(path, []).append((key, leaf, idx, rule))
    with progress_bar(total=len(found), desc="converting", unit="tensor", disable=not progress) as bar:
        for path, items in by_file.items():
            with open_file(path) as f:
                for key, leaf, idx, rule in items:
                    x = to_ours(rule.kind)(f.read(key))
                    dst = out[leaf] if idx is None else out[leaf][idx]
                    with np.errstate(over="ignore", invalid="ignore"):  # overflow in the cast: reported just below
                        np.copyto(dst, x, casting="unsafe")
                    del x
                    if not allow_nonfinite and not np.isfinite(dst).all():
                        bad = int(np.size(dst) - np.count_nonzero(np.isfinite(dst)))
                        nonfinite.append(f"{path}: {key}: {bad} of {np.size(dst)} values are NaN or infinite (as {dtype})")
                    bar.update(1)
    if nonfinite:
        more = f"; and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else ""
        raise ConvertError(f"non-finite weights (pass --allow-nonfinite to convert anyway): {'; '.join(nonfinite[:3])}{more}")
    return unflatten(out)


def _mesh(spec: str) -> jax.sharding.Mesh:
    try:
        return make_mesh(spec)
    except ValueError as e:
        raise ConvertError(f"--mesh {spec}: {e}") from e


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
    quantize: str | None = None,
    add_flex: bool = False,
) -> Path:
    """Convert a PyTorch checkpoint directory into ``out`` (orbax params + metadata.json + tokenizer).

    ``add_flex`` turns FlexAttention on in a plain LLaVA of any supported base (the release's recipe,
    :func:`flexattn_jax.presets.with_release_recipe`) with ``k_hr``/``v_hr`` (and their biases) copied from ``k``/``v``
    (:func:`flexattn_jax.params.add_hr_projections`). The metadata's ``base`` records the decoder, the tower and
    how FlexAttention came in.

    Before anything is read: ``out`` is checked (:func:`flexattn_jax.paths.check_output_dir`: not the
    source, not containing or inside it, replaceable, writable) and ``mesh`` parsed. ``check(cfg)``
    runs once the config is known, before the tensors are read; ``allow_nonfinite`` skips the
    finiteness check of the weights. ``quantize`` (``int8`` / ``int4``) stores the decoder linears weight-only
    quantised (:func:`flexattn_jax.quant.quantize_params`).
    """
    try:
        out = check_output_dir(out, sources=[src, vision_tower], overwrite=overwrite, flag="OUT")
    except OutputPathError as e:
        raise ConvertError(str(e)) from None
    if isinstance(mesh, str):
        mesh = _mesh(mesh)
    def with_flex(cfg: ModelConfig) -> ModelConfig:
        if cfg.flex.enabled:
            raise ConvertError(f"--add-flex: {src} already has FlexAttention (k_proj_hd/v_proj_hd and extra in config.json)")
        try:
            return with_release_recipe(cfg, overrides)
        except ConfigError as e:
            raise ConvertError(f"--add-flex: {e} (fix it with --set)") from None

    def checks(cfg: ModelConfig) -> None:  # before any tensor is read
        if add_flex:
            with_flex(cfg)
        if check is not None:
            check(cfg)

    converted = read_checkpoint(src, vision_tower=vision_tower, dtype=dtype, overrides=overrides, progress=progress,
                                allow_nonfinite=allow_nonfinite, check=checks)
    params, converted.params = converted.params, {}
    flex_from = "checkpoint" if converted.cfg.flex.enabled else None
    if add_flex:
        converted.cfg = with_flex(converted.cfg)
        params = jax.tree.map(np.asarray, add_hr_projections(params, "copy"))
        flex_from = "added: k_hr/v_hr copied from k/v (convert --add-flex)"
    if quantize:
        from flexattn_jax.quant import quantize_params

        params = quantize_params(params, quantize)
    if mesh is not None:
        params = place(params, mesh)
    source = {
        "source_layout": converted.layout,
        "source": str(Path(src).resolve()),
        "vision_source": None if converted.vision_source is None else str(converted.vision_source.resolve()),
        "quantization": quantize,
        "base": {"decoder": converted.cfg.text.model_type, "tower": converted.cfg.vision.model_type, "flexattention": flex_from},
    }
    return write_model(params, converted.cfg, out, source, lambda d: copy_tokenizer(Path(src), d), overwrite=True)
