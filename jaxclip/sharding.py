"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes are ("data", "fsdp", "tensor"). Parameters name their dimensions logically ("embed",
"mlp", ...); `RULES` maps each name to mesh axes, and that one table decides every parameter's
sharding: FSDP is `mesh.fsdp > 1` (the "embed" dimension of every weight is split over it), tensor
parallelism is `mesh.tensor > 1`. Optimizer state mirrors its parameter. The batch is split over
("data", "fsdp").

A logical dimension is left unsharded on a mesh axis when its size is not divisible by that axis
(small models on big meshes), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import tree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "vocab": ("tensor",),
    "kv": (),
    "layers": (),
    "joint": (),
}


def mesh_shape(mesh_cfg: Mapping, n_devices: int) -> tuple[int, ...]:
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} "
                             "devices")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{n_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: GSPMD propagates shardings; explicit mode is opt-in per module (jax >= 0.9
    # defaults make_mesh to Explicit, so the axis types are always passed).
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        picked = []
        for mesh_axis in RULES.get(name, ()) if name else ():
            size = mesh.shape[mesh_axis]
            if size == 1 or mesh_axis in used:
                continue
            if dim % (math.prod(mesh.shape[a] for a in picked) * size) == 0:
                picked.append(mesh_axis)
        used.update(picked)
        spec.append(tuple(picked) if len(picked) > 1 else (picked[0] if picked else None))
    return P(*spec)


def param_axes(abstract_model: nnx.Module) -> dict:
    """Pure nested dict path -> logical axes, read from the parameters' `axes` metadata."""
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model)):
        axes = var.get_metadata().get("axes")
        if axes is None:
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical `axes`")
        flat["/".join(map(str, path))] = tuple(axes)
    return tree.unflatten(flat)


def param_shardings(params: dict, axes: dict, mesh: Mesh) -> dict:
    """NamedShardings for a pure param dict (arrays or ShapeDtypeStructs) given its axes tree."""
    flat_axes = tree.flatten(axes)
    return tree.map_with_path(
        lambda p, x: NamedSharding(mesh, logical_spec(flat_axes[p], x.shape, mesh)), params)


def unsharded_fraction(params: dict, shardings: dict) -> float:
    """Fraction of parameter elements replicated on every device (MaxText's sharding guard)."""
    sizes = tree.flatten(jax.tree.map(lambda x: math.prod(x.shape), params))
    specs = tree.flatten(shardings)
    total = sum(sizes.values())
    replicated = sum(n for p, n in sizes.items() if all(s is None for s in specs[p].spec))
    return replicated / max(total, 1)


def check_sharded(params: dict, shardings: dict, mesh: Mesh, tolerance: float = 0.02) -> float:
    frac = unsharded_fraction(params, shardings)
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1 and frac > tolerance:
        logging.warning("%.1f%% of parameters are replicated on every device despite fsdp/tensor "
                        "> 1 (dimensions not divisible by the mesh axes?)", 100 * frac)
    return frac


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice into one array sharded over the batch axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical, x.shape, mesh))
