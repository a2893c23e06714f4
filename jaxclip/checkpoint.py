"""Orbax checkpoints: train state, data-stream position, config and run counters, as one.

A checkpoint at step s is one Orbax step directory holding four items, committed together:
  state     params, frozen params, optimizer state and the step counter (sharded arrays; each host
            writes its own shards, nothing is gathered onto one host);
  data      JSON: where the input stream resumes (the next step) and the invariants it needs;
  config    JSON: the resolved experiment config;
  progress  JSON: counters that logging continues from (goodput seconds).
Saves are asynchronous. Orbax writes into a temporary directory and renames it when complete, so
a directory killed mid-write is never listed as a checkpoint.

Policy: every `train.ckpt_every` steps, at the end, and on preemption; keep the latest
`train.keep_ckpts` plus every step that is a multiple of `train.keep_every`.

Restore takes the newest checkpoint that reads back. One that does not (a truncated or otherwise
damaged file) is reported, moved aside to `<step>.unreadable-<time>` for inspection, and the
previous one is tried: a damaged checkpoint is never used, and training can write that step again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config", "progress")


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
        self.every = every

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        # Our own rule: Orbax's also saves the first step of a run that has no checkpoint yet.
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, *, data: dict, config: dict, progress: dict,
             force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
            progress=ocp.args.JsonSave(progress),
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> dict[str, Any]:
        """Items of checkpoint `step`, the state placed on the shardings of `abstract_state`
        (ShapeDtypeStruct leaves): restoring onto another mesh reshards."""
        present = set(self._manager.item_metadata(step).keys())
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        args.update({k: ocp.args.JsonRestore() for k in ITEMS[1:] if k in present})
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return {k: restored[k] for k in args}

    def restore_newest(self, abstract_state: Any) -> tuple[int, dict[str, Any]] | None:
        """(step, items) of the newest readable checkpoint, or None when there is none."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                ok, items = True, self.restore(step, abstract_state)
            except Exception as e:  # failing to read it in any way means: do not use it
                ok, items, error = False, None, e
            if jax.process_count() > 1:  # every host must fall back to the same step
                from jax.experimental import multihost_utils

                ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
            if ok:
                return step, items
            logging.warning("checkpoint %d in %s is unreadable (%s); falling back to the "
                            "previous one", step, self.directory,
                            f"{type(error).__name__}: {error}" if items is None else
                            "failed on another host")
            self._quarantine(step)
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} can be "
                               "read; they were moved aside as *.unreadable-*")
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            path = os.path.join(self.directory, str(step))
            if os.path.isdir(path):
                os.replace(path, f"{path}.unreadable-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxclip-quarantine-{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
