"""Orbax checkpoints: the train state, the data-stream position and the resolved config, as one.

A checkpoint at step s is one Orbax step directory holding three items, committed together:
  state   params, frozen params, optimizer state and the step counter (sharded arrays; each host
          writes its own shards, nothing is gathered);
  data    JSON: where the input stream resumes (the next step) and the invariants it needs;
  config  JSON: the resolved experiment config.
Saves are asynchronous; Orbax writes to a temporary directory and renames it when complete, so a
step directory that exists is a finished checkpoint. Policy: every `train.ckpt_every` steps, keep
the latest `train.keep_ckpts` plus every `train.keep_every`-th step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, keep_every: int = 0):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every, 1) if every > 0 else 1 << 62,
            max_to_keep=max(keep, 1),
            keep_period=keep_every or None,
            enable_async_checkpointing=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data: dict, config: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStruct leaves)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.data, restored.config

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a tree of (sharded) arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
