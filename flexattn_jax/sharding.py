"""Device mesh, logical axis names and the one rules table that places every parameter.

Parameters are placed in two steps, MaxText style:

1. :data:`PARAM_RULES` maps a parameter path (regex over ``flatten``'s slash-joined names) to one
   *logical* axis name per dimension, e.g. ``text/layers/attn/q/kernel -> ('layers', 'embed', 'heads')``.
2. :data:`LOGICAL_RULES` maps each logical name to mesh axes of the mesh ``('data', 'fsdp', 'tensor')``:
   ``embed -> fsdp``, ``heads|kv_heads|mlp|vocab -> tensor``, ``batch -> (data, fsdp)``.

A mesh axis that does not divide its dimension (or that an earlier dimension of the same tensor
already uses) is dropped for that tensor, never an error. :func:`format_sharding_table` shows the
result per parameter and the fraction of parameters left replicated.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# logical name -> mesh axes (tried in order; each kept only if it divides what is left of the dimension)
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    "norm": (),
    "patch": (),
    "positions": (),
}

_LAYER = ("layers",)
# (path regex, logical axes); first match wins. Stacked layers carry a leading 'layers' axis.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # CLIP vision tower
    (r"^vision/patch_embed/kernel$", ("patch", "patch", None, "embed")),
    (r"^vision/patch_embed/bias$", ("norm",)),  # SigLIP
    (r"^vision/class_embed$", ("embed",)),
    (r"^vision/pos_embed/embedding$", ("positions", "embed")),
    (r"^vision/(pre_norm|post_norm)/(scale|bias)$", ("norm",)),
    (r"^vision/layers/norm[12]/(scale|bias)$", (*_LAYER, "norm")),
    (r"^vision/layers/attn/[qkv]/kernel$", (*_LAYER, "embed", "heads")),
    (r"^vision/layers/attn/[qkv]/bias$", (*_LAYER, "heads")),
    (r"^vision/layers/attn/o/kernel$", (*_LAYER, "heads", "embed")),
    (r"^vision/layers/attn/o/bias$", (*_LAYER, "norm")),
    (r"^vision/layers/mlp/fc1/kernel$", (*_LAYER, "embed", "mlp")),
    (r"^vision/layers/mlp/fc1/bias$", (*_LAYER, "mlp")),
    (r"^vision/layers/mlp/fc2/kernel$", (*_LAYER, "mlp", "embed")),
    (r"^vision/layers/mlp/fc2/bias$", (*_LAYER, "norm")),
    # projector (vision features -> LLM embedding)
    (r"^projector/linear_1/kernel$", ("embed", "mlp")),
    (r"^projector/linear_1/bias$", ("mlp",)),
    (r"^projector/linear_2/kernel$", ("mlp", "embed")),
    (r"^projector/linear_2/bias$", ("norm",)),
    # Llama decoder
    (r"^text/embed/embedding$", ("vocab", "embed")),
    (r"^text/lm_head/kernel$", ("embed", "vocab")),
    (r"^text/final_norm/scale$", ("norm",)),
    (r"^text/layers/(input_norm|post_norm)/scale$", (*_LAYER, "norm")),
    (r"^text/layers/attn/q/kernel$", (*_LAYER, "embed", "heads")),
    (r"^text/layers/attn/(k|v|k_hr|v_hr)/kernel$", (*_LAYER, "embed", "kv_heads")),
    (r"^text/layers/attn/q/bias$", (*_LAYER, "heads")),  # Qwen2's q/k/v biases
    (r"^text/layers/attn/(k|v|k_hr|v_hr)/bias$", (*_LAYER, "kv_heads")),
    (r"^text/layers/attn/o/kernel$", (*_LAYER, "heads", "embed")),
    (r"^text/layers/mlp/(gate|up)/kernel$", (*_LAYER, "embed", "mlp")),
    (r"^text/layers/mlp/down/kernel$", (*_LAYER, "mlp", "embed")),
    # LoRA adapters (flexattn_jax.lora: A (L, in, r), B (L, r, out)) and quantisation scales (flexattn_jax.quant:
    # (L, groups, out)): sharded along the kernel's in / out axis, the rank and group axes replicated
    (r"^text/layers/attn/q/(lora_b|kernel_scale)$", (*_LAYER, None, "heads")),
    (r"^text/layers/attn/(k|v|k_hr|v_hr)/(lora_b|kernel_scale)$", (*_LAYER, None, "kv_heads")),
    (r"^text/layers/attn/o/(lora_b|kernel_scale)$", (*_LAYER, None, "embed")),
    (r"^text/layers/mlp/(gate|up)/(lora_b|kernel_scale)$", (*_LAYER, None, "mlp")),
    (r"^text/layers/mlp/down/(lora_b|kernel_scale)$", (*_LAYER, None, "embed")),
    # NF4's double quantisation: the absmax of each run of 256 scales (in the torch weight's order) and a mean a matrix
    (r"^text/layers/(attn|mlp)/\w+/kernel_scale_absmax$", (*_LAYER, None)),
    (r"^text/layers/(attn|mlp)/\w+/kernel_scale_offset$", _LAYER),
    (r"^text/layers/(attn/(q|k|v|k_hr|v_hr)|mlp/(gate|up))/lora_a$", (*_LAYER, "embed", None)),
    (r"^text/layers/attn/o/lora_a$", (*_LAYER, "heads", None)),
    (r"^text/layers/mlp/down/lora_a$", (*_LAYER, "mlp", None)),
)
_COMPILED = tuple((re.compile(rx), axes) for rx, axes in PARAM_RULES)


class ShardingError(ValueError):
    """A mesh spec or a rule is malformed."""


# ---- mesh ------------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str | Mapping[str, int] | Sequence[int] | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` (or ``"2,4,1"``, a dict, a sequence) -> ``{axis: size}`` for all three axes.

    Missing axes are 1; one axis may be ``-1`` (fill with the remaining devices); ``None`` means
    ``fsdp=-1``. The product must divide ``num_devices`` (a smaller mesh uses the first devices).
    """
    if spec is None or spec == "":
        sizes: dict[str, int] = {"fsdp": -1}
    elif isinstance(spec, Mapping):
        sizes = {str(k): int(v) for k, v in spec.items()}
    elif isinstance(spec, str) and "=" in spec:
        sizes = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ShardingError(f"mesh spec item {item!r} is not axis=size (spec {spec!r})")
            k, v = item.split("=", 1)
            try:
                sizes[k.strip()] = int(v)
            except ValueError as e:
                raise ShardingError(f"mesh spec {spec!r}: size of {k.strip()!r} is not an integer") from e
    else:
        try:
            values = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
        except (TypeError, ValueError) as e:
            raise ShardingError(f"mesh spec {spec!r} is not axis=size pairs (e.g. data=2,fsdp=4) nor sizes (e.g. 2,4,1)") from e
        if len(values) > len(MESH_AXES):
            raise ShardingError(f"mesh spec {spec!r} has more than {len(MESH_AXES)} sizes")
        sizes = dict(zip(MESH_AXES, values, strict=False))
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    out = {a: sizes.get(a, 1) for a in MESH_AXES}
    fills = [a for a, v in out.items() if v == -1]
    if len(fills) > 1:
        raise ShardingError(f"mesh spec {spec!r}: at most one axis may be -1")
    if any(v == 0 or v < -1 for v in out.values()):
        raise ShardingError(f"mesh spec {spec!r}: sizes must be positive (or one -1)")
    known = math.prod(v for v in out.values() if v != -1)
    if fills:
        if num_devices % known:
            raise ShardingError(f"mesh spec {spec!r}: {num_devices} devices are not a multiple of {known}")
        out[fills[0]] = num_devices // known
    total = math.prod(out.values())
    if total > num_devices:
        raise ShardingError(f"mesh {out} needs {total} devices; only {num_devices} are available")
    if num_devices % total:
        raise ShardingError(f"mesh {out} uses {total} devices, which does not divide the {num_devices} available; "
                            f"make the product of the sizes divide {num_devices}")
    return out


def make_mesh(
    spec: str | Mapping[str, int] | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh with ``AxisType.Auto`` axes (compiler-propagated shardings).

    ``spec`` as in :func:`parse_mesh_spec`; ``devices`` default to all devices (a smaller mesh
    takes the first ones, e.g. ``make_mesh("fsdp=4")`` on 8 devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = devices[: math.prod(shape)]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_summary(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,tensor=1 (8 devices)"``."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.size} devices)"


# ---- logical -> physical -------------------------------------------------------------------------

def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at ``path`` (all ``None``: replicated, when no rule matches)."""
    for rx, axes in _COMPILED:
        if rx.search(path):
            if len(axes) != ndim:
                raise ShardingError(f"rule for {path!r} names {len(axes)} axes but the parameter has {ndim} dimensions")
            return axes
    return (None,) * ndim


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = LOGICAL_RULES,
) -> P:
    """PartitionSpec for one tensor: each logical name -> its mesh axes, dropping those that don't divide.

    A mesh axis is also dropped when an earlier dimension of the same tensor already uses it, and
    axes of size 1 are left out (so specs read as what really shards).
    """
    used: set[str] = set()
    parts: list[Any] = []
    for name, dim in zip(logical, shape, strict=True):
        if name is None:
            parts.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        kept: list[str] = []
        left = int(dim)
        for axis in rules[name]:
            if axis not in mesh.shape or axis in used:
                continue
            size = mesh.shape[axis]
            if size == 1 or left % size:
                continue
            kept.append(axis)
            used.add(axis)
            left //= size
        parts.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def _flat_with_paths(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), x) for p, x in flat], treedef


def param_specs(params: PyTree, mesh: Mesh) -> PyTree:
    """PartitionSpec per parameter (arrays or ``ShapeDtypeStruct`` leaves)."""
    flat, treedef = _flat_with_paths(params)
    specs = [logical_to_spec(logical_axes(path, len(x.shape)), x.shape, mesh) for path, x in flat]
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding`` per parameter, from :data:`PARAM_RULES` and :data:`LOGICAL_RULES`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh))


def batch_spec(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0) -> P:
    """Spec of a batch array: ``batch`` on ``batch_dim`` (data x fsdp, dropping what doesn't divide)."""
    logical = [None] * len(shape)
    logical[batch_dim] = "batch"
    return logical_to_spec(logical, shape, mesh)


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_dim: int = 0) -> NamedSharding:
    """``NamedSharding`` for a batch array (see :func:`batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, shape, batch_dim))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """``ShapeDtypeStruct`` leaves carrying the target shardings (restore / AOT targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---- tracing for a mesh ---------------------------------------------------------------------------------

def target_mesh(mesh: Mesh | None):
    """Context in which programs for ``mesh`` are traced and lowered (none: a no-op, the default backend).

    Makes ``mesh``'s abstract mesh (axis sizes and its devices' platform) ambient, so that kernel
    choices follow the mesh's devices (:func:`flexattn_jax.attention.target_platform`) and Mosaic
    kernels run under ``shard_map``. Only the abstract mesh: trace-time constants stay on the host,
    which compile-only devices (a TPU topology, a deviceless GPU) need.
    """
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
    """Pin ``x``'s batch dimension over (data, fsdp) when a mesh is ambient (:func:`target_mesh`); else ``x``.

    Without it, XLA's propagation may resolve the fsdp conflict (activations want the batch on fsdp,
    weights their embed dim) by replicating the activations: every chip then computes the whole
    global batch, and memory grows with the slice (a 7B FlexAttention train step needed 110 GB of
    temporaries per v5e chip at one sample per chip on 256 chips). MaxText pins activations the same way.
    """
    logical: list[str | None] = [None] * x.ndim
    logical[batch_dim] = "batch"
    return constrain_logical(x, logical, keep_unsharded=False)


def constrain_logical(x: jax.Array, logical: Sequence[str | None], keep_unsharded: bool = True) -> jax.Array:
    """Pin ``x`` to the mesh axes of its ``logical`` axis names (:data:`LOGICAL_RULES`; ``None``: not sharded) when
    a mesh is ambient (:func:`target_mesh`); else ``x``. ``keep_unsharded=False`` leaves ``x`` to propagation
    when the names shard nothing on this mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(LOGICAL_RULES["batch"]) <= set(mesh.axis_names):
        return x  # no mesh, or a foreign one
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return x  # inside shard_map: per-shard values
    spec = logical_to_spec(logical, x.shape, mesh)
    if not keep_unsharded and all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class OnMesh:
    """A jitted function whose calls and ``lower`` trace under :func:`target_mesh` of ``mesh``."""

    def __init__(self, jitted: Any, mesh: Mesh) -> None:
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with target_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with target_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


# ---- reporting ---------------------------------------------------------------------------------------

def _shard_factor(spec: P, mesh: Mesh) -> int:
    n = 1
    for part in spec:
        for axis in (part,) if isinstance(part, str) else (part or ()):
            n *= mesh.shape[axis]
    return n


def sharding_table(params: PyTree, mesh: Mesh) -> tuple[list[dict[str, Any]], float]:
    """Rows ``{path, shape, logical, spec, shards, size}`` per parameter, and the unsharded fraction.

    The fraction counts parameter elements whose tensor is replicated on every device (split 1 way).
    """
    rows = []
    total = unsharded = 0
    for path, x in _flat_with_paths(params)[0]:
        logical = logical_axes(path, len(x.shape))
        spec = logical_to_spec(logical, x.shape, mesh)
        size = int(np.prod(x.shape))
        shards = _shard_factor(spec, mesh)
        total += size
        if shards == 1:
            unsharded += size
        rows.append({"path": path, "shape": tuple(x.shape), "logical": logical, "spec": spec, "shards": shards, "size": size})
    return rows, (unsharded / total if total else 0.0)


def format_sharding_table(params: PyTree, mesh: Mesh) -> tuple[str, float]:
    """Logical -> physical axes per parameter and the fraction left unsharded, as text (the caller prints it); and that fraction."""
    rows, frac = sharding_table(params, mesh)
    w = max([len(r["path"]) for r in rows] + [9])
    lines = [f"mesh {mesh_summary(mesh)}", f"{'parameter':<{w}}  {'shape':<22} {'logical':<34} {'mesh':<28} shards"]
    for r in rows:
        logical = "(" + ", ".join("-" if a is None else a for a in r["logical"]) + ")"
        spec = "(" + ", ".join("-" if p is None else p if isinstance(p, str) else "+".join(p) for p in r["spec"]) + ")"
        lines.append(f"{r['path']:<{w}}  {str(r['shape']):<22} {logical:<34} {spec:<28} {r['shards']}")
    total = sum(r["size"] for r in rows)
    lines.append(f"{len(rows)} tensors, {total:,} parameters; unsharded (replicated on every device): {frac:.4%}")
    return "\n".join(lines), frac
