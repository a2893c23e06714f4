"""Training metrics: where they go, how a logging window is summarised, where the time went.

MetricWriter  WORKDIR/metrics.jsonl (one JSON object per line, always with `step`) and
              TensorBoard; only process 0 writes; appended to by resumed runs and flushed after
              every line, so a killed run loses nothing that was logged.
LogWindow     the steps since the last log line: their device metrics are fetched once per
              window (the host never waits on the device in between) and averaged; samples/s,
              TFLOP/s and MFU come from host wall time over the window.
Goodput       cumulative wall-clock accounting of a run across restarts: initialising,
              restoring, compiling, stepping, waiting for data, checkpointing, evaluating;
              `goodput/fraction` is the share of wall time spent stepping. Checkpoints carry it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np


def _plain(value):
    if isinstance(value, str | bool | int) or value is None:
        return value
    value = float(np.asarray(value))
    return value if math.isfinite(value) else str(value)


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (long-lived)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, metrics: Mapping) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class NonFiniteLossError(FloatingPointError):
    pass


class LogWindow:
    def __init__(self):
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.pending: list[tuple[int, dict]] = []  # still on device
        self.done: list[tuple[int, dict]] = []  # fetched and checked
        self.start = now
        self.steps = 0
        self.data_wait = 0.0
        self.skipped = 0

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))
        self.steps += 1

    def sync(self) -> list[tuple[int, dict]]:
        """Fetches pending metrics (waiting for their steps) and stops on a non-finite loss."""
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        self.pending = []
        for step, m in fetched:
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopping. Checkpoints written before this "
                    "step are intact (lower optim.lr, raise optim.warmup_steps, or check the "
                    "data).")
        self.done += fetched
        return self.done

    def summary(self, batch_size: int, n_devices: int, flops_per_sample: float,
                peak: float | None) -> dict:
        """The window's mean metrics plus throughput; resets the window."""
        fetched = self.sync()
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        row = {k: float(np.mean([f[k] for _, f in fetched])) for k in fetched[-1][1]}
        sps = self.steps * batch_size / elapsed
        row.update(samples_per_sec=sps, samples_per_sec_per_device=sps / n_devices,
                   step_time_s=elapsed / self.steps, data_wait_frac=self.data_wait / elapsed,
                   skipped_records=self.skipped,
                   tflops_per_device=sps * flops_per_sample / n_devices / 1e12)
        if peak:
            row["mfu"] = sps * flops_per_sample / (n_devices * peak)
        self.reset(now)
        return row


@dataclasses.dataclass
class Goodput:
    total_s: float = 0.0  # wall time of all invocations so far
    init_s: float = 0.0
    restore_s: float = 0.0
    compile_s: float = 0.0
    step_s: float = 0.0
    data_wait_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping | None) -> Goodput:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in (values or {}).items() if k in fields})

    def row(self) -> dict[str, float]:
        out = {f"goodput/{k}": v for k, v in dataclasses.asdict(self).items()}
        out["goodput/fraction"] = self.step_s / self.total_s if self.total_s > 0 else 0.0
        return out


@dataclasses.dataclass
class Span:
    seconds: float = 0.0  # set when the timed block ends


class GoodputClock:
    """Puts every second of a run into one Goodput bucket.

    `with clock.timed("checkpoint") as span:` adds the block's wall time (also left in
    `span.seconds`) to `goodput.checkpoint_s`; a
    timed block inside another is taken out of the outer one (a training iteration timed as
    "step" that saves a checkpoint counts the save once, as checkpoint time). `total_s` is the
    wall time since the first invocation: the earlier invocations' total plus this one's.
    """

    def __init__(self, goodput: Goodput, invocation_start: float):
        self.goodput = goodput
        self._prior_total = goodput.total_s
        self._invocation_start = invocation_start
        self._inner: list[float] = []  # per open block: seconds already given to inner blocks

    @contextlib.contextmanager
    def timed(self, bucket: str):
        attr = f"{bucket}_s"
        if not hasattr(self.goodput, attr):
            raise AttributeError(f"Goodput has no bucket {attr!r}")
        t0 = time.perf_counter()
        self._inner.append(0.0)
        span = Span()
        try:
            yield span
        finally:
            elapsed = span.seconds = time.perf_counter() - t0
            own = elapsed - self._inner.pop()
            setattr(self.goodput, attr, getattr(self.goodput, attr) + own)
            if self._inner:
                self._inner[-1] += elapsed

    def wall(self) -> Goodput:
        """The goodput with `total_s` brought up to now (for a log row or a checkpoint)."""
        self.goodput.total_s = self._prior_total + time.perf_counter() - self._invocation_start
        return self.goodput
