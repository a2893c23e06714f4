"""Parameters of a training workdir's checkpoint, restored sharded, fetched one tensor at a time.

`restore` reads the config stored in the checkpoint (the one its weights were trained with),
builds the run's abstract state on an FSDP mesh over every device (of every host, when
jax.distributed is initialised) and restores only the `params` and `frozen` entries of the
checkpoint's `state` item (Orbax partial restore: the optimizer state,
twice the parameters' size for Adam, is never read). Each host then holds its shards only.
`fetch` brings one array to the host: a local copy when the array is fully addressable, else an
all-gather across processes of that one array, so the largest host allocation during export is
one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import jax
import numpy as np

from jaxclip import checkpoint, config, sharding, tree


def checkpoint_steps(workdir: str) -> list[int]:
    return checkpoint.checkpoint_steps(workdir)


def load_config(workdir: str, step: int | None = None) -> config.ConfigDict:
    """The config stored in the workdir's newest readable checkpoint (or `step`): what its
    weights were trained with. WORKDIR/config.json only for checkpoints older than that record
    (a failed later start or an edit may have changed the file since)."""
    try:
        values, _ = checkpoint.saved_config(workdir, step)
    except FileNotFoundError:
        path = os.path.join(workdir, "config.json")
        if checkpoint.checkpoint_steps(workdir) and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        elif os.path.exists(path):
            raise FileNotFoundError(f"{workdir}: no finished checkpoint under checkpoints/") \
                from None
        else:
            raise FileNotFoundError(f"{workdir}: no checkpoint and no config.json; not a jaxclip "
                                    "workdir") from None
    return config.from_dict(values)


def restore(workdir: str, step: int | None = None, mesh=None, *,
            make_config: Callable[[config.ConfigDict], config.ConfigDict] | None = None,
            mesh_from_config: bool = False) -> tuple[config.ConfigDict, dict, int]:
    """(config, full parameter tree of sharded jax arrays, step) of a workdir checkpoint: the
    newest intact one, or exactly `step`.

    The config is the one stored in that checkpoint, passed through `make_config` when given
    (evaluation swaps in its own evaluators and mesh there). The parameters are placed on `mesh`,
    the config's mesh with `mesh_from_config`, else FSDP over every device. A damaged newest
    checkpoint is skipped with a warning, as the trainer does, but nothing in the workdir is
    moved or written.
    """
    from jaxclip import train

    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint under checkpoints/")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; available: {steps}")
    for s in [step] if step is not None else list(reversed(steps)):
        try:
            cfg = load_config(workdir, s)
        except checkpoint.CheckpointDamagedError as e:
            if step is not None or s == steps[0]:
                raise
            logging.warning("%s; trying the previous checkpoint", e)
            continue
        cfg = make_config(cfg) if make_config is not None else cfg
        if mesh_from_config:
            mesh = sharding.make_mesh(cfg.mesh)
        m = train.build(cfg, mesh or sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
        target = {"params": m.abstract_state.params, "frozen": m.abstract_state.frozen}
        try:
            restored, s = checkpoint.read_params(workdir, target, s)
        except checkpoint.CheckpointDamagedError as e:
            if step is not None or s == steps[0]:
                raise
            logging.warning("%s; trying the previous checkpoint", e)
            continue
        return cfg, tree.merge(restored["params"], restored["frozen"]), s
    raise checkpoint.CheckpointDamagedError(f"{workdir}: none of the checkpoints {steps} can "
                                            "be read")


def fetch(x) -> np.ndarray:
    """One (possibly sharded, possibly multi-host) array as a host numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
