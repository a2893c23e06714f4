"""Orbax checkpoints: train state, data-stream position, config and run counters, as one.

A checkpoint at step s is one Orbax step directory holding four items, committed together:
  state      params, frozen params, optimizer state and the step counter (sharded arrays; each
             host writes its own shards, nothing is gathered onto one host);
  data       JSON: where the input stream resumes (the next step) and the invariants it needs;
  config     JSON: the resolved experiment config the state was trained with;
  progress   JSON: counters that logging continues from (goodput seconds);
and, added once the step is committed, `integrity.json`: a 64-bit content fingerprint of every
array of `state` (jaxclip.integrity: computed on the devices, independent of the mesh).
Saves are asynchronous. Orbax writes into a temporary directory and renames it when complete, so
a directory killed mid-write is never listed as a checkpoint. The fingerprints are dispatched to
the devices before the save and written by a background thread after the commit, so training
does not wait for them; a checkpoint whose process died in between has no fingerprints and is
restored unverified, with a warning. A state with a non-finite value is never saved
(`NonFiniteStateError`, decided by a fast device pass before the save): the newest checkpoint is
always the last finite one.

Policy: every `train.ckpt_every` steps, at the end, and on preemption; keep the latest
`train.keep_ckpts` plus every step that is a multiple of `train.keep_every`.

Restore takes the newest checkpoint and tells two failures apart:
  mismatch  it reads, but its tree (names, shapes, dtypes) is not what the current config builds:
            a `CheckpointMismatchError` naming the differing arrays and config keys. Nothing is
            moved: the user changed the config, the checkpoints are fine.
  damage    it does not read back (I/O error, missing or invalid metadata, truncated data), or
            what it reads differs from its recorded fingerprints or is not finite. It is reported,
            moved aside to `<step>.unreadable-<time>` (never deleted; the warning says how to put
            it back) and the previous checkpoint is tried.
Read-only readers (evaluation, export) fall back past damage the same way but move nothing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxclip import config as config_lib
from jaxclip import integrity

ITEMS = ("state", "data", "config", "progress")
INTEGRITY_FILE = "integrity.json"


class CheckpointMismatchError(config_lib.ConfigError):
    """The checkpoint is intact but the config builds a different state tree."""


class CheckpointDamagedError(RuntimeError):
    pass


class NonFiniteStateError(FloatingPointError):
    pass


@dataclasses.dataclass
class _Verdict:
    ok: bool
    items: dict | None = None
    mismatch: str = ""  # non-empty: the tree differs from the config's
    damage: str = ""  # non-empty: the files are unreadable or inconsistent
    recorded: dict | None = None  # the fingerprints written with it, if any


def _handlers(state_handler) -> dict:
    # Registered up front: a manager that has not saved in this process otherwise knows no
    # handler for the items and reports no metadata for them.
    json_items = {k: ocp.JsonCheckpointHandler() for k in ITEMS[1:]}
    return dict(json_items, state=state_handler)


def _read_manager(directory: str) -> ocp.CheckpointManager:
    # read_only: readers must never create, prune or clean up anything in a run's directory
    # (a training job may be writing its next checkpoint there right now). The state handler
    # is the PyTree one: readers restore a part of the state (parameters, not the optimizer).
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
        item_handlers=_handlers(ocp.PyTreeCheckpointHandler()))


def _tree_differences(saved_meta: Any, target: Any, *, partial: bool = False) -> list[str]:
    """What differs between a checkpoint's array metadata and a target tree of
    ShapeDtypeStructs: missing/unexpected arrays and shape or dtype changes, by name."""
    saved_leaves = jax.tree.leaves(saved_meta)
    saved = dict(zip(integrity.leaf_paths(saved_meta), saved_leaves, strict=True))
    wanted = dict(zip(integrity.leaf_paths(target), jax.tree.leaves(target), strict=True))
    out = []
    for path in sorted(wanted):
        if path not in saved:
            out.append(f"{path} is not in the checkpoint")
            continue
        s, w = saved[path], wanted[path]
        s_shape, s_dtype = tuple(getattr(s, "shape", ())), getattr(s, "dtype", None)
        if s_shape != tuple(w.shape) or (s_dtype is not None and np.dtype(s_dtype) != w.dtype):
            out.append(f"{path}: checkpoint {s_dtype}{list(s_shape)}, config "
                       f"{w.dtype}{list(w.shape)}")
    if not partial:
        out += [f"{path} is in the checkpoint but not built by the config"
                for path in sorted(set(saved) - set(wanted))]
    return out


def config_differences(saved: dict | None, current: dict) -> list[str]:
    """Dotted config keys whose values differ between a checkpoint's config and `current`."""
    if not saved:
        return []
    # Keys an older version stored under another name are compared at their new place.
    flat_saved, flat_now = _flatten(config_lib.upgrade(saved)), _flatten(current)
    return [f"{k}={flat_saved.get(k)!r} (checkpoint) vs {flat_now.get(k)!r}"
            for k in sorted(set(flat_saved) | set(flat_now))
            if flat_saved.get(k) != flat_now.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _some(items: list[str], n: int) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _agree(verdict: _Verdict) -> _Verdict:
    """Every host must take the same decision about a step: the worst verdict of any host."""
    if jax.process_count() == 1:
        return verdict
    from jax.experimental import multihost_utils

    code = 2 if verdict.damage else 1 if verdict.mismatch else 0
    worst = int(np.max(multihost_utils.process_allgather(np.asarray(code))))
    if worst == code:
        return verdict
    if worst == 2:
        return _Verdict(False, damage="unreadable on another host")
    return _Verdict(False, mismatch="differs from the config on another host")


def _recorded_digests(step_dir: str) -> dict[str, str] | None:
    """The fingerprints written after the commit, or None when there are none (an older
    jaxclip, or a process that died between commit and writing them). Raises if unreadable."""
    path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["digests"]


def _verify(summary: dict, recorded: dict) -> str:
    """Damage found by recomputing fingerprints of what was read ('' when intact)."""
    bad = integrity.digest_mismatches(recorded, summary)
    if bad:
        return (f"content differs from its recorded fingerprint in {len(bad)} array(s), e.g. "
                f"{', '.join(bad[:3])}")
    bad = integrity.non_finite(summary)
    if bad:
        return f"non-finite values in {len(bad)} array(s), e.g. {', '.join(bad[:3])}"
    return ""


def _examine(manager: ocp.CheckpointManager, step: int, target: Any, *, partial: bool,
             current_config: dict | None) -> _Verdict:
    """Reads checkpoint `step` into the shardings of `target` and classifies the outcome."""
    step_dir = os.path.join(str(manager.directory), str(step))
    try:
        recorded = _recorded_digests(step_dir)
        meta = manager.item_metadata(step)
        present = set(meta.keys())
        state_meta = meta["state"]
        state_meta = getattr(state_meta, "tree", state_meta)
        if state_meta is None:
            raise ValueError("the state item has no metadata")
        json_items = {k: ocp.args.JsonRestore() for k in ITEMS[1:] if k in present}
        side = manager.restore(step, args=ocp.args.Composite(**json_items)) if json_items \
            else {}
        side = {k: side[k] for k in json_items}
    except Exception as e:  # unreadable in any way (I/O, missing or invalid metadata)
        return _Verdict(False, damage=f"{type(e).__name__}: {e}")
    diffs = _tree_differences(state_meta, target, partial=partial)
    if diffs:
        # Parameters first: they say what changed; optimizer moments only mirror them.
        diffs.sort(key=lambda d: (not d.startswith(("params/", "frozen/")), d))
        keys = config_differences(side.get("config"), current_config) if current_config else []
        shown = (f"config keys that differ: {_some(keys, 6)}; " if keys else "") + \
            f"{len(diffs)} arrays differ: {_some(diffs, 3)}"
        return _Verdict(False, mismatch=shown)
    try:
        if partial:
            state_args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(target)
        state = manager.restore(step, args=ocp.args.Composite(state=state_args)).state
    except Exception as e:  # the metadata promised these arrays and they do not read back
        return _Verdict(False, damage=f"{type(e).__name__}: {e}")
    return _Verdict(True, items=dict(side, state=state), recorded=recorded)


def _verified(verdict: _Verdict, step: int) -> _Verdict:
    """Recomputes the fingerprints of what was read and compares them with the recorded ones.
    Runs on every host after they agreed the read succeeded: the fingerprint is one program
    over the global arrays, so every host must enter it (and gets the same answer)."""
    if not verdict.ok:
        return verdict
    damage = _verify(integrity.summarize(verdict.items["state"]), verdict.recorded or {})
    if damage:
        return _Verdict(False, damage=damage)
    if verdict.recorded is None:
        logging.warning("checkpoint %d has no %s (written by an older jaxclip, or its writer "
                        "stopped right after the commit): restored unverified", step,
                        INTEGRITY_FILE)
    return verdict


def _mismatch_error(directory: str, step: int, detail: str) -> CheckpointMismatchError:
    workdir = os.path.dirname(directory)
    return CheckpointMismatchError(
        f"checkpoint {step} in {directory} does not match this config: {detail}. Every "
        f"checkpoint is left as it is. To resume, run with the config the checkpoint was "
        f"trained with ({os.path.join(directory, str(step), 'config', 'metadata')}); to start "
        f"a new run from its weights, pass --config.init.path={workdir} with another --workdir")


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
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=_handlers(ocp.StandardCheckpointHandler()))
        self.every = every
        # One background worker writes each save's fingerprints once Orbax has committed it.
        self._fingerprints = concurrent.futures.ThreadPoolExecutor(1, "jaxclip-fingerprints")
        self._pending: list[concurrent.futures.Future] = []

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        # Our own rule: Orbax's also saves the first step of a run that has no checkpoint yet.
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, *, data: dict, config: dict, progress: dict,
             force: bool = False) -> bool:
        """Saves `state` asynchronously after checking on the devices that it is finite (raises
        NonFiniteStateError and saves nothing otherwise); its fingerprints follow in the
        background."""
        bad = [path for path, ok in integrity.finite(state).items() if not ok]
        if bad:
            raise NonFiniteStateError(
                f"non-finite values in the train state at step {step} ({len(bad)} arrays, e.g. "
                f"{', '.join(bad[:3])}); not checkpointed, the newest checkpoint "
                f"({self.latest_step()}) is the last finite one. Lower optim.lr or set "
                "optim.grad_clip, then rerun to resume from it")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
            progress=ocp.args.JsonSave(progress),
        )
        digests = integrity.digests_later(state)  # on the devices, ahead of the next step
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._fingerprints.submit(self._write_digests, step, digests))
        return saved

    def _write_digests(self, step: int, digests) -> None:
        values = digests()  # every process joins the computation; process 0 writes
        if jax.process_index() != 0:
            return
        step_dir = os.path.join(self.directory, str(step))
        while not os.path.isdir(step_dir):  # Orbax renames the finished save into place
            if not self._manager.is_saving_in_progress() and not os.path.isdir(step_dir):
                logging.warning("checkpoint %d was not committed; no fingerprints written", step)
                return
            time.sleep(0.02)
        tmp = os.path.join(step_dir, f".{INTEGRITY_FILE}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": "jaxclip.integrity/1", "digests": values}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))
        except OSError as e:  # e.g. already pruned by the retention policy
            logging.warning("fingerprints of checkpoint %d not written: %s", step, e)

    def _finish_fingerprints(self) -> None:
        for future in self._pending:
            future.result()
        self._pending = []

    def restore(self, step: int, abstract_state: Any, current_config: dict | None = None
                ) -> dict[str, Any]:
        """Items of checkpoint `step`, the state placed on the shardings of `abstract_state`
        (ShapeDtypeStruct leaves): restoring onto another mesh reshards. Raises
        CheckpointMismatchError or CheckpointDamagedError."""
        verdict = _verified(_agree(_examine(self._manager, step, abstract_state, partial=False,
                                            current_config=current_config)), step)
        if verdict.mismatch:
            raise _mismatch_error(self.directory, step, verdict.mismatch)
        if verdict.damage:
            raise CheckpointDamagedError(f"checkpoint {step} is damaged: {verdict.damage}")
        return verdict.items

    def restore_newest(self, abstract_state: Any, current_config: dict | None = None
                       ) -> tuple[int, dict[str, Any]] | None:
        """(step, items) of the newest intact checkpoint, or None when there is none.

        Raises CheckpointMismatchError, moving nothing, when the newest intact checkpoint does
        not fit `abstract_state`."""
        steps = self.all_steps()
        for step in reversed(steps):
            verdict = _verified(_agree(_examine(self._manager, step, abstract_state,
                                                partial=False, current_config=current_config)),
                                step)
            if verdict.ok:
                return step, verdict.items
            if verdict.mismatch:
                raise _mismatch_error(self.directory, step, verdict.mismatch)
            moved = self._quarantine(step)
            logging.warning("checkpoint %d in %s is unreadable (%s); moved aside to %s and "
                            "falling back to the previous one (to put it back: mv %s %s)",
                            step, self.directory, verdict.damage, moved, moved,
                            os.path.join(self.directory, str(step)))
        if steps:
            raise CheckpointDamagedError(
                f"none of the checkpoints {steps} in {self.directory} can be read; they were "
                "moved aside as *.unreadable-* (nothing was deleted)")
        return None

    def _quarantine(self, step: int) -> str:
        path = os.path.join(self.directory, str(step))
        moved = f"{path}.unreadable-{int(time.time())}"
        if jax.process_index() == 0 and os.path.isdir(path):
            os.replace(path, moved)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxclip-quarantine-{step}")
        self._manager.reload()
        return moved

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._finish_fingerprints()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._finish_fingerprints()
        self._fingerprints.shutdown()
        self._manager.close()


# --- read-only access for evaluation, export and jaxclip.load -----------------------------------

def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoints of a workdir (Orbax renames a finished save to its step number;
    temporary and set-aside names are not digits)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def saved_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """(config dict, step) stored in the newest readable checkpoint (or `step`): the config
    its weights were trained with, whatever WORKDIR/config.json says now."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {checkpoint_dir(workdir)}")
    candidates = [step] if step is not None else list(reversed(steps))
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                                f"steps: {steps}")
    manager = _read_manager(checkpoint_dir(workdir))
    try:
        for s in candidates:
            try:
                if "config" not in manager.item_metadata(s):
                    break  # an older checkpoint without a config: the caller falls back
                cfg = manager.restore(s, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore())).config
                return cfg, s
            except Exception as e:  # damaged: try the previous one, as restore does
                if step is not None:
                    raise CheckpointDamagedError(f"checkpoint {s} in {checkpoint_dir(workdir)} "
                                                 f"is damaged: {type(e).__name__}: {e}") from e
                logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying the "
                                "previous one", s, checkpoint_dir(workdir), type(e).__name__, e)
    finally:
        manager.close()
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)} records its config")


def load_config(workdir: str, step: int | None = None) -> config_lib.ConfigDict:
    """The config stored in the workdir's newest readable checkpoint (or `step`): what its
    weights were trained with. WORKDIR/config.json only for checkpoints older than that record
    (a failed later start or an edit may have changed the file since)."""
    try:
        values, _ = saved_config(workdir, step)
    except FileNotFoundError:
        path = os.path.join(workdir, "config.json")
        if checkpoint_steps(workdir) and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        elif os.path.exists(path):
            raise FileNotFoundError(f"{workdir}: no finished checkpoint under checkpoints/") \
                from None
        else:
            raise FileNotFoundError(f"{workdir}: no checkpoint and no config.json; not a jaxclip "
                                    "workdir") from None
    return config_lib.from_dict(values)


def read_params(workdir: str, target: dict, step: int | None = None) -> tuple[dict, int]:
    """(params restored into `target`'s shardings, step) from a workdir's newest intact
    checkpoint (or exactly `step`), for readers that need no optimizer state.

    `target` is a subtree of the saved TrainState's top level (e.g. {"params": ..., "frozen":
    ...} of ShapeDtypeStructs): Orbax's partial restore reads only those arrays, so the optimizer
    state costs neither I/O nor memory. Fingerprints are verified; a damaged newest checkpoint is
    skipped with a warning (nothing is moved), a mismatch is a CheckpointMismatchError."""
    steps = checkpoint_steps(workdir)
    directory = checkpoint_dir(workdir)
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; steps: {steps}")
    manager = _read_manager(directory)
    try:
        for s in ([step] if step is not None else list(reversed(steps))):
            verdict = _verified(_agree(_examine(manager, s, target, partial=True,
                                                current_config=None)), s)
            if verdict.ok:
                return verdict.items["state"], s
            if verdict.mismatch:
                raise _mismatch_error(directory, s, verdict.mismatch)
            if step is not None:
                raise CheckpointDamagedError(f"checkpoint {s} in {directory} is damaged: "
                                             f"{verdict.damage}")
            logging.warning("checkpoint %d in %s is unreadable (%s); using the previous one",
                            s, directory, verdict.damage)
    finally:
        manager.close()
    raise CheckpointDamagedError(f"none of the checkpoints {steps} in {directory} can be read")
