"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes are ("data", "fsdp", "tensor"). Parameters name their dimensions logically ("embed",
"mlp", ...); `RULES` maps each name to mesh axes, and that one table decides every parameter's
sharding: FSDP is `mesh.fsdp > 1` (the "embed" dimension of every weight is split over it), tensor
parallelism is `mesh.tensor > 1`. Optimizer state mirrors its parameter. The batch is split over
("data", "fsdp").

Activations have their own logical names in the same table ("act_batch", "act_length",
"act_embed", "act_heads", "act_mlp", "act_kv"): their batch dimension is split over
("data", "fsdp") and their embed dimension over nothing, so under FSDP each layer's weights are
gathered just in time and activations stay split by batch. Without these constraints the
partitioner sees "batch" and a weight's "embed" both on `fsdp`, and picks layouts that hold the
global batch's activations on every device and all-reduce them inside the layer loop (ViT-B/16,
8 devices: 5.4x the temp memory of pure data parallelism). The models apply them with
`constrain`, which reads the mesh from the trace (`activation_mesh`), so no mesh is threaded
through the modules and single-device calls are untouched.

A logical dimension is left unsharded on a mesh axis when its size is not divisible by that axis
(small models on big meshes), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping

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
    # Activations (MaxText's "activation_*" rules).
    "act_batch": BATCH_AXES,
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_kv": (),
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


def _trace_mesh(x) -> jax.sharding.AbstractMesh | None:
    """The jaxclip mesh a traced array is laid out on, or None.

    Inside `jax.jit(..., in_shardings=NamedSharding(mesh, ...))` every traced input's aval
    carries that mesh (as an AbstractMesh, Auto axes included), even when the caller set no mesh
    context; the trainer compiles its step that way, so the models can find the mesh here.
    """
    if not isinstance(x, jax.core.Tracer):
        return None  # eager calls: single-device model code, nothing to constrain
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    mesh = getattr(mesh, "abstract_mesh", mesh)  # a concrete Mesh -> its AbstractMesh
    if mesh is None or mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
        return None
    return mesh


@contextlib.contextmanager
def activation_mesh(x) -> Iterator[None]:
    """Makes the mesh of traced array `x` (a parameter) the context mesh, so `constrain` applies.

    A no-op when a mesh context is already set, when `x` is not traced, or when it carries no
    mesh with jaxclip's axis names (e.g. a plain `jax.jit` of a single-device model).
    """
    mesh = None if not jax.sharding.get_abstract_mesh().empty else _trace_mesh(x)
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`,
    `activation_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical, x.shape, mesh))


def gather_weight(w: jax.Array, axes: tuple, dtype=None) -> jax.Array:
    """Weight `w` cast to `dtype` and in its compute layout: its parameter layout without the
    `fsdp` axis, tensor-parallel splits kept. The cast is pinned to the parameter layout first, so
    the FSDP all-gather moves compute-dtype values (bf16: half the bytes of the float32 master);
    constraining only the gathered result let the partitioner gather float32 and cast after."""
    dtype = w.dtype if dtype is None else dtype
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape["fsdp"] == 1:
        return w.astype(dtype)
    stored = logical_spec(axes, w.shape, mesh)
    spec = []
    for entry in stored:
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                     if a != "fsdp")
        spec.append(kept if len(kept) > 1 else (kept[0] if kept else None))
    w = jax.lax.with_sharding_constraint(w.astype(dtype), stored)
    return jax.lax.with_sharding_constraint(w, P(*spec))


def remat_block(block, policy_name: str, policies: Mapping, prevent_cse: bool):
    """`block(x, layer_params)` under `jax.checkpoint` with the named policy.

    With remat "none" under FSDP the block is still wrapped: it saves everything except its
    weights in compute layout (the casts and gathers of arrays shaped like its parameters), which
    the backward gathers again. Otherwise the scan stacks every layer's gathered weights as
    residuals and the backward holds the whole gathered model on each device (seen in the HLO: a
    full-width copy of every layer's kernels). The other policies save dot outputs or nothing, so
    never the gathered weights.
    """
    if policy_name != "none":
        return jax.checkpoint(block, policy=policies[policy_name], prevent_cse=prevent_cse)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape["fsdp"] == 1:
        return block

    def run(x, p):
        weights = {a.shape for a in jax.tree.leaves(p)}

        def policy(prim, *avals, **_):
            # An activation shaped exactly like a weight would be recomputed too (cheap casts).
            regather = prim.name in ("convert_element_type", "sharding_constraint")
            return not (regather and avals[0].shape in weights)

        return jax.checkpoint(block, policy=policy, prevent_cse=prevent_cse)(x, p)

    return run
