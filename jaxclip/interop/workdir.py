"""Parameters of a training workdir's checkpoint, restored sharded, fetched one tensor at a time.

`restore` reads `WORKDIR/config.json`, builds the run's abstract state on an FSDP mesh over every
device (of every host, when jax.distributed is initialised) and restores only the `params` and
`frozen` entries of the checkpoint's `state` item (Orbax partial restore: the optimizer state,
twice the parameters' size for Adam, is never read). Each host then holds its shards only.
`fetch` brings one array to the host: a local copy when the array is fully addressable, else an
all-gather across processes of that one array, so the largest host allocation during export is
one tensor, not the model.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxclip import config, sharding, tree


def checkpoint_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    # Orbax renames a finished save to its step number; temporary names are not digits.
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def load_config(workdir: str) -> config.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: no config.json; not a jaxclip workdir")
    with open(path, encoding="utf-8") as f:
        return config.from_dict(json.load(f))


def restore(workdir: str, step: int | None = None, mesh=None
            ) -> tuple[config.ConfigDict, dict, int]:
    """(config, full parameter tree of sharded jax arrays, step) of a workdir checkpoint."""
    import orbax.checkpoint as ocp

    from jaxclip import train

    cfg = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint under checkpoints/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; available: {steps}")
    mesh = mesh or sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    m = train.build(cfg, mesh)
    abstract = {"params": m.abstract_state.params, "frozen": m.abstract_state.frozen}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True)
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=args)
    return cfg, tree.merge(restored["params"], restored["frozen"]), step


def fetch(x) -> np.ndarray:
    """One (possibly sharded, possibly multi-host) array as a host numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
