"""Drawing a model's random parameters, the same on every mesh.

Every normally-distributed parameter is drawn from one threefry vector (in chunks of at most 2^27
values), in the sorted order of parameter paths, and each slice is scaled by the parameter's own
standard deviation (its `init` metadata, set by `layers.param`). One random call compiles in under
a second on XLA:CPU where one call per parameter took minutes, and threefry values do not depend on
how the outputs are sharded, so a model initialised on any mesh is the same model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_CHUNK = 1 << 27


def draw_params(model: nnx.Module, rngs: nnx.Rngs | int) -> nnx.State:
    """Sets every ("normal", std) parameter of `model` in place; returns the model's state.
    `rngs`: an int seed, or an `nnx.Rngs` whose `params` stream gives the key."""
    key = jax.random.key(rngs) if isinstance(rngs, int) else rngs.params()
    state = nnx.state(model)
    normals = []
    for _, var in nnx.to_flat_state(state):
        init = var.get_metadata().get("init")
        if init and init[0] == "normal":
            normals.append((var, init[1]))
    remaining = sum(var.get_value().size for var, _ in normals)
    chunk_id, used, flat = 0, 0, None
    for var, std in normals:
        size = var.get_value().size
        if flat is None or used + size > flat.size:
            # A parameter never straddles chunks; an oversized one gets its own draw.
            n = max(min(_CHUNK, remaining), size)
            flat = jax.random.normal(jax.random.fold_in(key, chunk_id), (n,), jnp.float32)
            chunk_id, used = chunk_id + 1, 0
        var.set_value((flat[used:used + size] * std).reshape(var.get_value().shape))
        used += size
        remaining -= size
    return state


def init_params(model: nnx.Module, seed: int) -> nnx.State:
    """The model's state with every ("normal", std) parameter drawn from `seed`."""
    return draw_params(model, seed)
