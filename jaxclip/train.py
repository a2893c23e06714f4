"""The one trainer. Every objective, tower configuration and evaluator runs through this loop.

Shape of a run:
  1. mesh from config; the model is built abstractly (`nnx.eval_shape`) to read each parameter's
     logical axes, then initialised inside `jax.jit` with sharded outputs, so no unsharded copy
     ever exists; parameters are split into trainable and frozen (locked towers, `optim.frozen`);
  2. the train step is a pure function of (TrainState, batch): `nnx.merge` the graph definition
     with the parameters, encode, run the registered objective over the mesh, AdamW update, clamp
     the logit scale. It is `jax.jit`-ed with explicit shardings and the state donated, and
     compiled ahead of time, so compile time and compiled memory are logged before step 1;
  3. the loop feeds step-indexed host batches (`jaxclip.data.pipeline`), assembled into global
     arrays and placed on the devices `data.prefetch_to_device` steps ahead by a background
     thread (`jaxclip.data.prefetch`), logs window averages (loss, lr, logit scale, samples/s,
     MFU, data wait), runs evaluators on schedule, and checkpoints (params, optimizer, data
     position, config).
Resuming: the newest checkpoint in WORKDIR is restored onto the current mesh and the data stream
continues at the restored step, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxclip import (
    accumulate,
    checkpoint,
    config,
    flops,
    losses,
    optim,
    runlock,
    runtime,
    sharding,
    teacher,
    tree,
)
from jaxclip.data import prefetch, stream
from jaxclip.data.images import normalize_images
from jaxclip.losses.multi_positive import MULTI_CAPTION_OBJECTIVES
from jaxclip.losses.simclr import VIEW_OBJECTIVES
from jaxclip.metrics import Goodput, GoodputClock, LogWindow, MetricWriter, NonFiniteLossError
from jaxclip.preemption import Preempted, PreemptionWatcher
from jaxclip.tokenizer import from_config as tokenizer_from_config
from jaxclip.watchdog import Watchdog

__all__ = ["NonFiniteLossError", "Preempted", "TrainSetup", "TrainState", "build", "init_state",
           "make_train_step", "step_args", "train"]

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: dict  # trainable parameters
    frozen: dict  # parameters that are never updated (locked towers)
    opt_state: Any


@dataclasses.dataclass
class TrainSetup:
    """What training adds to a model's layout, built once per run: the optimizer and the
    shardings and shapes of the whole train state."""

    layout: runtime.Layout
    tx: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState
    # The frozen teacher of the distillation terms (jaxclip/teacher.py), or None: an argument of
    # the step of its own, outside the train state (no optimizer state, not checkpointed).
    teacher: teacher.Teacher | None = None

    # The layout's fields, which the step and the loop read all the time.
    cfg = property(lambda self: self.layout.cfg)
    mesh = property(lambda self: self.layout.mesh)
    graphdef = property(lambda self: self.layout.graphdef)
    param_shardings = property(lambda self: self.layout.param_shardings)


def _opt_state_shardings(abstract_opt_state, param_shardings: dict, mesh) -> Any:
    """Each optimizer leaf (Adam's mu and nu) is sharded like the parameter it mirrors."""
    flat = tree.flatten(param_shardings)

    def pick(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        name = "/".join(str(k) for k in keys if isinstance(k, str))
        sh = flat.get(name)
        if sh is not None and len(sh.spec) <= leaf.ndim:
            return sh
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def build(cfg, mesh=None) -> TrainSetup:
    lay = runtime.layout(cfg, mesh)
    mesh = lay.mesh
    trainable, frozen = optim.split_trainable(lay.abstract_params, cfg)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, trainable)
    abstract_opt = jax.eval_shape(tx.init, trainable)
    t_shard, f_shard = optim.split_trainable(lay.param_shardings, cfg)
    state_shardings = TrainState(
        step=sharding.replicated(mesh), params=t_shard, frozen=f_shard,
        opt_state=_opt_state_shardings(abstract_opt, t_shard, mesh))
    abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), trainable, frozen,
                                abstract_opt)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_shardings)
    return TrainSetup(lay, tx, state_shardings, abstract_state, teacher.load(cfg, mesh))


def init_state(m: TrainSetup) -> TrainState:
    cfg = m.cfg

    def init():
        params = runtime.fresh_params(cfg)
        trainable, frozen = optim.split_trainable(params, cfg)
        return TrainState(jnp.int32(0), trainable, frozen, m.tx.init(trainable))

    with jax.set_mesh(m.mesh):
        return jax.jit(init, out_shardings=m.state_shardings)()


def _clamp_logit_scale(params: dict, loss_cfg) -> dict:
    if "logit_scale" not in params or loss_cfg.scale_param != "logit_scale" or \
            loss_cfg.scale_max is None:
        return params
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, loss_cfg.scale_max)
    return params


def step_args(m: TrainSetup) -> tuple:
    """The train step's arguments after (state, batch): the teacher's parameters, if any."""
    return () if m.teacher is None else (m.teacher.params,)


def make_train_step(m: TrainSetup):
    """The jitted step: (state, batch) -> (state, metrics), or (state, batch, teacher params)
    when the objective distils from a teacher (`step_args`)."""
    cfg = m.cfg
    objective = losses.objective_over_mesh(cfg.loss, m.mesh)
    tokens = losses.needs_tokens(cfg.loss)
    lr = optim.learning_rate(cfg.optim, cfg.train.steps)
    microbatches = cfg.train.microbatches

    def step(state: TrainState, batch: dict, teacher_params=None):
        images = normalize_images(batch["image"], cfg.data.mean, cfg.data.std)
        # One key per step, from the seed and the step alone, so a resumed run draws the same.
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        # The teacher's encoding of the batch, once per step (in micro-batches like pass 1 of
        # accumulation, so its activations do not undo its memory saving).
        taught = None if m.teacher is None else teacher.encode(
            m.teacher, teacher_params, batch["image"], batch["text"], microbatches, m.mesh)

        def objective_of_batch(enc):
            # Constants of the step, attached here so that accumulation's passes see them too:
            # the step's key, and with K captions per image (data.caption = "all") which exist.
            enc = dataclasses.replace(enc, key=step_key, teacher=taught)
            if "text_mask" in batch:
                enc = dataclasses.replace(enc, present={"text": batch["text_mask"]})
            return objective(enc)

        def loss_fn(params):
            model = nnx.merge(m.graphdef, tree.merge(params, state.frozen))
            enc = model(images, batch["text"], return_tokens=tokens)
            loss, metrics = objective_of_batch(enc)
            return loss, (metrics, enc.logit_scale, enc.logit_bias)

        if microbatches > 1:  # the full batch's gradient with 1/k of the activations
            (loss, (metrics, scale, bias)), grads = accumulate.loss_and_grads(
                m.graphdef, state.params, state.frozen, images, batch["text"], objective_of_batch,
                microbatches, return_tokens=tokens, mesh=m.mesh,
                grad_shardings=m.state_shardings.params)
        else:
            (loss, (metrics, scale, bias)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params)
        updates, opt_state = m.tx.update(grads, state.opt_state, state.params)
        params = _clamp_logit_scale(optax.apply_updates(state.params, updates), cfg.loss)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       lr=lr(state.step), logit_scale=scale)
        if cfg.loss.scale_param == "logit_scale":
            metrics["temperature_inv"] = jnp.exp(scale)
        if bias is not None:
            metrics["logit_bias"] = bias
        return TrainState(state.step + 1, params, state.frozen, opt_state), metrics

    batch_sh = sharding.batch_sharding(m.mesh)
    extra = () if m.teacher is None else (m.teacher.layout.param_shardings,)
    return jax.jit(step, in_shardings=(m.state_shardings, batch_sh, *extra),
                   out_shardings=(m.state_shardings, sharding.replicated(m.mesh)),
                   donate_argnums=0)


def batch_specs(cfg, mesh) -> dict:
    """Shapes, dtypes and shardings of a global training batch."""
    B, size = cfg.train.batch_size, cfg.model.image.image_size
    sh = sharding.batch_sharding(mesh)
    captions = (cfg.data.captions_per_image,) if cfg.data.caption == "all" else ()
    views = (cfg.data.views,) if cfg.data.views > 1 else ()  # (B, V, H, W, 3): V crops each
    specs = {"image": jax.ShapeDtypeStruct((B, *views, size, size, 3), jnp.uint8, sharding=sh),
             "text": jax.ShapeDtypeStruct((B, *captions, cfg.model.text.context_length),
                                          jnp.int32, sharding=sh)}
    if captions:
        specs["text_mask"] = jax.ShapeDtypeStruct((B, *captions), jnp.bool_, sharding=sh)
    return specs


def _check_caption_sets(cfg) -> None:
    """data.caption = "all" gives K captions per image, which only some objectives read."""
    if cfg.data.caption != "all":
        return
    if cfg.data.captions_per_image < 1:
        raise config.ConfigError("data.caption='all' needs data.captions_per_image >= 1 (K, the "
                                 "captions kept per image)")
    if cfg.loss.name not in MULTI_CAPTION_OBJECTIVES:
        raise config.ConfigError(
            f"data.caption='all' gives K captions per image, which loss.name={cfg.loss.name!r} "
            f"does not read; use one of {MULTI_CAPTION_OBJECTIVES} or data.caption=random|first")
    if terms := [n for n, w in cfg.loss.aux.items() if float(w) != 0.0]:
        raise config.ConfigError(
            f"data.caption='all': the auxiliary terms {terms} (loss.aux) read one caption per "
            "image and are not supported with K captions yet")




def _check_views(cfg) -> None:
    """data.views > 1 gives extra crops that only an image-image term reads (that term checks
    the views and the view head it needs itself: losses/simclr.py)."""
    reads_views = cfg.loss.name in VIEW_OBJECTIVES or any(
        float(w) != 0.0 and n in VIEW_OBJECTIVES for n, w in cfg.loss.aux.items())
    if cfg.data.views > 1 and not reads_views:
        raise config.ConfigError(f"data.views={cfg.data.views} gives extra crops of each image "
                                 f"that only an image-image term reads ({VIEW_OBJECTIVES}, "
                                 "loss.aux); set one or data.views=1")


def _setup_metrics(compiled, cfg, n_dev: int, flops_per_sample: float, peak: float | None,
                   peak_source: str) -> dict:
    out = {"devices": n_dev, "hosts": jax.process_count(), "flops_per_sample": flops_per_sample,
           "peak_flops_per_device": peak or 0.0}
    mem = compiled.memory_analysis()
    if mem is not None:  # what XLA plans to allocate for one step, per device
        out["step_temp_mb"] = mem.temp_size_in_bytes / 2**20
        out["step_args_mb"] = mem.argument_size_in_bytes / 2**20
        out["step_output_mb"] = mem.output_size_in_bytes / 2**20
    logging.info("train step: %s; MFU peak per device: %s", ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()),
        peak_source)
    return {f"setup/{k}": v for k, v in out.items()}


def preflight(cfg) -> dict:
    """Checks everything about `cfg` that can fail before anything is written or built: the
    objective and its implementation, the mesh against the devices and the batch, the datasets
    (present and non-empty), the tokenizer and the evaluators. Raises ConfigError naming the key.
    Returns what it built on the way (mesh, tokenizer, stream invariants) for the run to reuse."""
    from jaxclip import evals

    try:
        losses.total_objective(cfg.loss)
        losses.check_config(cfg)
    except (KeyError, ValueError) as e:
        raise config.ConfigError(f"loss: {e.args[0] if e.args else e}") from None
    _check_caption_sets(cfg)
    _check_views(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
        raise config.ConfigError(f"mesh: {e}") from None
    divisor = sharding.batch_divisor(mesh)
    if cfg.train.batch_size % divisor or cfg.train.batch_size % jax.process_count():
        raise config.ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {divisor} devices "
            f"of the mesh's batch axes (data x fsdp) and the {jax.process_count()} processes")
    per_device = cfg.train.batch_size // divisor
    accumulate.check_microbatches(cfg.train.batch_size, divisor, cfg.train.microbatches)
    if cfg.loss.impl == "ring" and cfg.loss.tile and per_device % cfg.loss.tile:
        raise config.ConfigError(f"loss.tile={cfg.loss.tile} does not divide the per-device batch "
                                 f"{per_device} (train.batch_size / data x fsdp)")
    for name, e in cfg.evals.items():
        try:
            evals.resolve(name, e)
        except ValueError as err:
            raise config.ConfigError(str(err)) from None
    stream.check_sources(cfg)  # datasets exist, are built and hold usable records
    # The stream's invariants, resolved once (checked on resume, recorded by every save).
    return {"mesh": mesh, "tokenizer": tokenizer_from_config(cfg),
            "stream": stream.invariants(cfg)}


def _lock_workdir(workdir: str) -> runlock.WorkdirLock | None:
    """The workdir's lock, taken by process 0; every process raises if it is held elsewhere."""
    lock, error = None, ""
    if jax.process_index() == 0:
        try:
            lock = runlock.WorkdirLock(workdir).acquire()
        except runlock.WorkdirLockedError as e:
            error = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not bool(multihost_utils.broadcast_one_to_all(np.int32(not error))):
            error = error or f"workdir {workdir} is in use by another trainer (see process 0)"
    if error:
        raise runlock.WorkdirLockedError(error)
    return lock


def _write_config(workdir: str, cfg) -> None:
    """WORKDIR/config.json: the config being trained (written atomically, process 0 only)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json(cfg))
    os.replace(path + ".tmp", path)


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the last metrics.

    `stop_at` ends this invocation early at that step with a checkpoint (for time-limited jobs);
    the schedule still spans `train.steps`, and a later invocation continues from there.
    Raises `Preempted` after checkpointing when SIGTERM/SIGINT arrives (see jaxclip.preemption).

    Order: the whole config is checked first (`preflight`), then the workdir is locked against a
    second trainer, then the state is restored or initialised; only then is WORKDIR/config.json
    written. A failed start leaves the workdir as it was.
    """
    invocation_start = time.perf_counter()
    checked = preflight(cfg)
    lock = _lock_workdir(workdir)
    try:
        return _train_locked(cfg, workdir, stop_at, checked, invocation_start)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg, workdir: str, stop_at: int | None, checked: dict,
                  invocation_start: float) -> dict:
    m = build(cfg, checked["mesh"])
    ckpt = checkpoint.Checkpointer(workdir, every=cfg.train.ckpt_every, keep=cfg.train.keep_ckpts,
                                   keep_every=cfg.train.keep_every)
    watchdog = make_watchdog(cfg.train)
    try:
        return _run(cfg, workdir, stop_at, m, ckpt, checked["tokenizer"], checked["stream"],
                    invocation_start, watchdog)
    finally:
        with watchdog.phase("checkpoint", -1):  # the last save's commit can hang too
            ckpt.close()
        watchdog.close()


class _NoWatchdog:
    first_floor_s = None

    def phase(self, *args, **kwargs):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def make_watchdog(train_cfg):
    """The hang watchdog of `train.watchdog_*` (jaxclip.watchdog), or a stand-in when off."""
    if not train_cfg.watchdog_multiple:
        return _NoWatchdog()
    return Watchdog(multiple=train_cfg.watchdog_multiple, floor_s=train_cfg.watchdog_floor_s,
                    first_floor_s=train_cfg.watchdog_first_floor_s)


def _run(cfg, workdir, stop_at, m, ckpt, tokenizer, invariants, invocation_start,
         watchdog) -> dict:
    from jaxclip.evals import Evaluators

    n_dev = m.mesh.size
    t0 = time.perf_counter()
    with watchdog.phase("restore", 0):
        restored = ckpt.restore_newest(m.abstract_state, current_config=cfg.to_dict())
    if restored is not None:
        start, items = restored
        state = items["state"]
        stream.check_stream_state(invariants, items["data"])
        if changed := checkpoint.config_differences(items.get("config"), cfg.to_dict()):
            logging.warning("resuming step %d with config keys that differ from the "
                            "checkpoint's (the state fits, so this is allowed): %s", start,
                            "; ".join(changed[:10]))
        goodput = Goodput.from_dict(items.get("progress", {}).get("goodput"))
        goodput.restore_s += time.perf_counter() - t0
        logging.info("resumed from step %d in %s", start, workdir)
    else:
        start, goodput = 0, Goodput()
        state = init_state(m)
        if cfg.init.path:  # pretrained weights for a fresh run (jaxclip/interop/init.py)
            from jaxclip.interop import init as pretrained

            state = pretrained.apply(m, state)
            logging.info("initialised %s from %s", cfg.init.select or "all parameters",
                         cfg.init.path)
        goodput.init_s += time.perf_counter() - t0
    clock = GoodputClock(goodput, invocation_start)  # from here on, every second in a bucket
    _write_config(workdir, cfg)  # only now: the run has started from a state that fits it
    writer = MetricWriter(workdir)
    evaluators = Evaluators(cfg, m.layout, tokenizer)

    with clock.timed("compile"), watchdog.phase("compile", start):
        compiled = make_train_step(m).lower(m.abstract_state, batch_specs(cfg, m.mesh),
                                            *step_args(m)).compile()
    flops_per_sample = flops.train_flops_per_sample(
        cfg, cfg.train.batch_size, None if m.teacher is None else m.teacher.cfg.model)
    peak, peak_source = flops.device_peak(cfg.model.dtype, cfg.train.peak_tflops)
    writer.write(start, _setup_metrics(compiled, cfg, n_dev, flops_per_sample, peak, peak_source))

    data = stream.train_stream(cfg, start, tokenizer)
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    if start == 0:
        with clock.timed("eval"), watchdog.phase("eval", 0, limit_s=watchdog.first_floor_s):
            first = evaluators.run(state, 0, at_start=True)
        if first:
            writer.write(0, first)

    progress = None
    if cfg.train.progress and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step",
                        dynamic_ncols=True)
    profile_from, profile_to = (int(x) for x in cfg.train.profile_steps)
    watcher = PreemptionWatcher(grace_s=cfg.train.stop_grace_s or None)
    window = LogWindow()
    last_logged: dict = {}
    step, in_flight = start, None
    # Batches are placed on the devices ahead of their step by a background thread
    # (jaxclip.data.prefetch), so the wait for `next(data)` is only real starvation. It yields
    # exactly the batches of steps start+1..end, in order; the finally below joins it.
    data = prefetch.DeviceBatches(data, lambda host: sharding.global_batch(host, m.mesh),
                                  depth=cfg.data.prefetch_to_device, count=max(0, end - start),
                                  first_step=start + 1)
    try:
        while step < end:
            # One iteration: the step, then whichever periodic actions are due (checkpoint, log
            # line, preemption, evaluation). Goodput: the iteration is "step" time except what
            # its timed parts (data wait, checkpoint, evaluation) take. Watched phases run one
            # after another (never nested), each with its own limit: the step itself (input,
            # dispatch and, on log/save steps, waiting for the device, where a hung collective
            # shows), then the save, then evaluation.
            with clock.timed("step"):
                with watchdog.phase("step", step + 1):
                    if step + 1 == profile_from:  # trace steps profile_from..profile_to
                        jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    with clock.timed("data_wait") as wait:
                        batch, skipped = next(data)  # on the devices already (or placed now)
                    window.data_wait += wait.seconds
                    window.skipped += skipped
                    state, metrics = compiled(state, batch, *step_args(m))
                    # Run at most one step ahead of the device: the host then waits here for the
                    # previous step, so a phase lasts as long as a device step (the watchdog's
                    # median means something) and a hung collective shows at the next step, not
                    # at the next log line. One queued step keeps the device busy.
                    if in_flight is not None:
                        in_flight.block_until_ready()
                    in_flight = metrics["loss"]
                    step += 1
                    window.add(step, metrics)
                    if step == profile_to:
                        jax.block_until_ready(metrics)
                        jax.profiler.stop_trace()
                    preempted = watcher.should_stop(step)
                    saving = ckpt.should_save(step) or step == end or preempted
                    logging_now = step % cfg.train.log_every == 0 or step == end or preempted
                    if saving or logging_now:
                        window.sync()  # waits for the step; never save past a non-finite loss
                    if saving:
                        jax.block_until_ready(state)  # the save's time is the save's own
                if progress is not None:
                    progress.update(1)

                if saving:
                    with clock.timed("checkpoint"), \
                            watchdog.phase("checkpoint", step, limit_s=watchdog.first_floor_s):
                        ckpt.save(step, state, data=stream.stream_state(invariants, step),
                                  config=cfg.to_dict(),
                                  progress={"goodput": dataclasses.asdict(clock.wall())},
                                  force=True)
                        if preempted:
                            ckpt.wait()
                if logging_now:
                    row = window.summary(cfg.train.batch_size, n_dev, flops_per_sample, peak)
                    row.update(clock.wall().row())
                    writer.write(step, row)
                    last_logged = row
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss']:.3f}",
                                             sps=f"{row['samples_per_sec']:.0f}")
                if preempted:
                    raise Preempted(step)
                with clock.timed("eval") as evaluation, \
                        watchdog.phase("eval", step, limit_s=watchdog.first_floor_s):
                    eval_metrics = evaluators.run(state, step, final=step == cfg.train.steps)
                if eval_metrics:
                    writer.write(step, eval_metrics)
                    last_logged.update(eval_metrics)
                    window.start += evaluation.seconds  # evaluation is not training throughput
    finally:
        data.close()  # no input thread outlives the run: ended, preempted or raised
        watcher.close()
        if progress is not None:
            progress.close()
        writer.close()
    return last_logged
