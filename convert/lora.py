"""LoRA runs in and out: the release's PEFT output (``adapter_config.json``, ``adapter_model.{safetensors,bin}``,
``non_lora_trainables.bin``), our own LoRA training runs, and PEFT directories written back.

Reading a release run follows LLaVA's ``builder.py``: the base weights, then ``non_lora_trainables.bin`` (a leading
``base_model.`` stripped, then one leading ``model.`` when any key starts with ``model.model.``) loaded over them,
then the adapters, merged as ``merge_and_unload`` does (``W += (alpha / r) B A``) or kept beside the kernels.
Every check runs before anything is written; a bad directory is one error naming the file and the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from convert.mapping import BY_OURS, canonical, export_name, lookup, to_ours, to_torch
from convert.reader import ConvertError, open_file
from flexattn_jax import lora as L
from flexattn_jax.config import ModelConfig
from flexattn_jax.params import flatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA = "non_lora_trainables.bin"
_LAYOUTS = ["hf5", "hf4", "original"]
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _module_target(module: str):
    """Our kernel leaf and layer index of a PEFT module path (any of our key layouts), or None."""
    can = canonical(module + ".weight", _LAYOUTS)
    target = None if can is None else lookup(can)
    if target is None or not target.leaf.endswith("/kernel"):
        return None
    return target


def read_peft_config(directory: str | Path) -> L.LoraConfig:
    """``adapter_config.json`` -> :class:`flexattn_jax.lora.LoraConfig` (rank, alpha, dropout, targets as our regex)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not Path(directory).is_dir():
        raise ConvertError(f"{directory}: not a directory (a PEFT LoRA directory holds {ADAPTER_CONFIG})")
    if not path.is_file():
        raise ConvertError(f"{path}: missing (not a PEFT LoRA directory: expected {ADAPTER_CONFIG} + adapter_model.*)")
    try:
        conf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None
    if not isinstance(conf, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{path}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(conf.get(field), (int, float)) or isinstance(conf.get(field), bool) or conf[field] <= 0:
            raise ConvertError(f"{path}: field {field!r} must be a positive number, got {conf.get(field)!r}")
    if conf.get("use_rslora") or conf.get("use_dora"):
        raise ConvertError(f"{path}: use_rslora / use_dora are not supported (plain LoRA: scaling alpha / r)")
    if conf.get("bias", "none") != "none":
        raise ConvertError(f"{path}: field 'bias'={conf.get('bias')!r}; only 'none' is supported (the release's lora_bias)")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ConvertError(f"{path}: rank_pattern / alpha_pattern are not supported (one rank and alpha for every target)")
    names = conf.get("target_modules")
    if isinstance(names, str):
        targets = names
    elif isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        known = set(L.MODULE_NAMES.values())
        unknown = sorted(set(names) - known)
        if unknown:
            raise ConvertError(f"{path}: target_modules names {unknown}, which are not linears of the language model "
                               f"(known: {sorted(known)})")
        ours = [k for k, v in L.MODULE_NAMES.items() if v in names]
        targets = "^text/layers/(" + "|".join(ours) + ")$"
    else:
        raise ConvertError(f"{path}: field 'target_modules' must be a list of module names or a regex, got {names!r}")
    dropout = conf.get("lora_dropout", 0.0)
    return L.LoraConfig(enabled=True, rank=int(conf["r"]), alpha=float(conf["lora_alpha"]),
                        dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0, targets=targets)


def read_peft_adapters(directory: str | Path, params: dict, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], L.LoraConfig]:
    """The adapters of a PEFT directory as our flat leaves (``module/lora_a`` ``(L, in, r)``, ``module/lora_b``
    ``(L, r, out)``, unscaled), checked against ``params``: every key maps to a kernel the model has, ranks equal
    ``r``, shapes fit the kernel, every layer of a module is present."""
    directory = Path(directory)
    lcfg = read_peft_config(directory)
    files = [directory / n for n in ADAPTER_FILES if (directory / n).is_file()]
    if not files:
        raise ConvertError(f"{directory}: no adapter weights (looked for {', '.join(ADAPTER_FILES)})")
    path = files[0]
    flat = flatten(params)
    n_layers = cfg.text.num_layers
    slices: dict[str, dict[int, np.ndarray]] = {}
    with open_file(path) as f:
        keys = f.keys()
        for key, info in keys.items():
            m = _KEY.match(key)
            if m is None:
                raise ConvertError(f"{path}: key {key} is not a LoRA weight (.lora_A/.lora_B.weight)")
            target = _module_target(m["module"])
            if target is None or target.leaf not in flat or target.index is None:
                raise ConvertError(f"{path}: key {key}: module {m['module']} is not a decoder linear of this model "
                                   f"(flex.enabled={cfg.flex.enabled}); target_modules in {directory / ADAPTER_CONFIG} "
                                   "does not fit the base")
            d_in, d_out = flat[target.leaf].shape[-2:]
            want = (lcfg.rank, d_in) if m["ab"] == "A" else (d_out, lcfg.rank)
            rank = info.shape[0] if m["ab"] == "A" else info.shape[-1]
            if len(info.shape) == 2 and rank != lcfg.rank:
                raise ConvertError(f"{path}: {key} has rank {rank} (shape {list(info.shape)}) but {directory / ADAPTER_CONFIG} "
                                   f"field 'r' is {lcfg.rank}")
            if tuple(info.shape) != want:
                raise ConvertError(f"{path}: {key} has shape {list(info.shape)} but the base's {target.leaf} ({d_in} -> {d_out}) "
                                   f"needs {list(want)}: the adapters belong to another base model")
            if target.index >= n_layers:
                raise ConvertError(f"{path}: {key}: layer {target.index} but the base has {n_layers} layers")
            leaf = target.leaf[: -len("kernel")] + ("lora_a" if m["ab"] == "A" else "lora_b")
            slices.setdefault(leaf, {})[target.index] = np.asarray(f.read(key), np.float32).T
    out = {}
    for leaf, by_layer in sorted(slices.items()):
        missing = sorted(set(range(n_layers)) - set(by_layer))
        if missing:
            raise ConvertError(f"{path}: {leaf} lacks layers {missing[:8]} (a LoRA module is adapted in every layer)")
        out[leaf] = np.stack([by_layer[i] for i in range(n_layers)])
    halves = {k.rsplit("/", 1)[0] for k in out}
    for mod in halves:
        if f"{mod}/lora_a" not in out or f"{mod}/lora_b" not in out:
            raise ConvertError(f"{path}: {mod} has only one of lora_A / lora_B")
    if not out:
        raise ConvertError(f"{path}: no LoRA weights")
    return out, lcfg


def strip_release_prefixes(keys: list[str]) -> dict[str, str]:
    """``builder.py``'s renaming of ``non_lora_trainables.bin``: original key -> key for ``load_state_dict``."""
    renamed = {k: (k[len("base_model."):] if k.startswith("base_model.") else k) for k in keys}
    if any(v.startswith("model.model.") for v in renamed.values()):
        renamed = {k: (v[len("model."):] if v.startswith("model.") else v) for k, v in renamed.items()}
    return renamed


def read_non_lora_trainables(path: str | Path, params: dict) -> dict[str, list[tuple[int | None, np.ndarray]]]:
    """``{our leaf: (layer index or None, value in our layout)}`` from a release ``non_lora_trainables.bin``."""
    path = Path(path)
    flat = flatten(params)
    out: dict[str, list[tuple[int | None, np.ndarray]]] = {}
    with open_file(path) as f:
        keys = f.keys()
        for original, key in strip_release_prefixes(list(keys)).items():
            can = canonical(key, ["original", "hf5", "hf4"])
            target = None if can is None else lookup(can)
            if target is None or target.leaf not in flat:
                raise ConvertError(f"{path}: key {original} ({key} after builder.py's prefix handling) is no parameter of "
                                   "this model")
            value = to_ours(target.rule.kind)(np.asarray(f.read(original), np.float32))
            want = flat[target.leaf].shape[1:] if target.index is not None else flat[target.leaf].shape
            if tuple(value.shape) != tuple(want):
                raise ConvertError(f"{path}: {original} has shape {list(value.shape)} (ours), the base's {target.leaf} "
                                   f"needs {list(want)}")
            out.setdefault(target.leaf, []).append((target.index, value))
    return out


def apply_release_run(lora_dir: str | Path, params: dict, cfg: ModelConfig, merge: bool = True) -> tuple[dict, L.LoraConfig]:
    """The base ``params`` (numpy or jax) with a release LoRA directory applied as ``builder.py`` does.

    Returns ``(flat params, lora config)``: merged kernels, or (``merge=False``) the adapters kept as leaves.
    """
    lora_dir = Path(lora_dir)
    adapters, lcfg = read_peft_adapters(lora_dir, params, cfg)
    flat = {k: np.array(v) for k, v in flatten(params).items()}
    if (lora_dir / NON_LORA).is_file():
        for leaf, items in read_non_lora_trainables(lora_dir / NON_LORA, params).items():
            for index, value in items:
                if index is None:
                    flat[leaf] = value.astype(flat[leaf].dtype)
                else:
                    flat[leaf][index] = value.astype(flat[leaf].dtype)
    for name, x in adapters.items():
        if name.endswith("/lora_a"):
            mod = name[: -len("/lora_a")]
            if merge:
                w = flat[f"{mod}/kernel"]
                flat[f"{mod}/kernel"] = (w.astype(np.float64) + lcfg.scale * (x.astype(np.float64) @ adapters[f"{mod}/lora_b"]
                                                                             .astype(np.float64))).astype(w.dtype)
    if not merge:
        flat.update(adapters)
    return flat, lcfg


def read_run(run_dir: str | Path) -> tuple[dict[str, np.ndarray], L.LoraConfig, ModelConfig, int]:
    """``(trainable leaves, lora config, model config, step)`` of the newest checkpoint of a LoRA training run."""
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpointer

    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        raise ConvertError(f"{run_dir}: no checkpoints/ directory (neither a LoRA training run nor a PEFT directory with "
                           f"{ADAPTER_CONFIG})")
    with Checkpointer(ckdir) as ck:
        step = ck.latest_step()
        if step is None:
            raise ConvertError(f"{ckdir}: no complete checkpoint")
        meta = ck.read_meta(step)
        lora = (meta.get("train_config") or {}).get("lora") or {}
        if not lora.get("enabled"):
            raise ConvertError(f"{ckdir / str(step)}: train_config.lora.enabled is not true in its metadata: not a LoRA run")
        state = ck.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    params = state["params"] if isinstance(state, dict) else state[1]
    cfg = ModelConfig.from_dict(meta["model_config"])
    return {k: np.asarray(v) for k, v in flatten(params).items()}, L.LoraConfig(**lora), cfg, int(step)


def peft_config(lcfg: L.LoraConfig, modules: list[str], base: str | None = None) -> dict[str, Any]:
    """An ``adapter_config.json`` that ``peft`` loads: our modules by their release names."""
    names = sorted({L.MODULE_NAMES[m.split("/", 2)[2]] for m in modules})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
        "target_modules": names, "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def write_peft_dir(adapters: dict[str, Any], lcfg: L.LoraConfig, cfg: ModelConfig, out: str | Path, layout: str = "hf5",
                   base: str | None = None) -> Path:
    """Write our (unscaled) adapters as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) for
    ``layout``'s module names (``hf5``: transformers' LlavaForConditionalGeneration; ``original``: the release's)."""
    from safetensors.numpy import save_file

    out = Path(out)
    tensors = {}
    modules = sorted({k.rsplit("/", 1)[0] for k in adapters})
    for mod in modules:
        rule = BY_OURS[f"{mod}/kernel"]
        for i in range(cfg.text.num_layers):
            name = export_name(rule, i, layout, cfg)[: -len(".weight")]
            a = np.asarray(adapters[f"{mod}/lora_a"][i], np.float32)
            b = np.asarray(adapters[f"{mod}/lora_b"][i], np.float32)
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(to_torch("linear")(a))
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(to_torch("linear")(b))
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lcfg, modules, base), indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = [
    "ADAPTER_CONFIG", "NON_LORA", "apply_release_run", "is_peft_dir", "peft_config", "read_non_lora_trainables",
    "read_peft_adapters", "read_peft_config", "read_run", "strip_release_prefixes", "write_peft_dir",
]
