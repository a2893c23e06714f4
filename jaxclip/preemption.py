"""Stopping cleanly on a preemption notice (SIGTERM) or Ctrl-C (SIGINT).

The trainer asks `watcher.should_stop(step)` after every step. When it says yes, the trainer
writes a checkpoint of that step, waits until it is committed, and raises `Preempted`; the CLI
exits with status EXIT_PREEMPTED = 143 (128 + SIGTERM, what a process killed by SIGTERM reports),
which schedulers treat as retriable (xpk/Kubernetes pod failure policies restart on >= 127), and
rerunning the same command resumes from that checkpoint. A finished run exits 0, a failed one 1.

Single process: Python handlers for SIGTERM and SIGINT set a flag (a second SIGINT aborts at once).
Several processes: every process must stop after the *same* step, so the decision goes through
JAX's preemption sync point, which catches SIGTERM in each process and agrees on the step via the
coordination service (it must be asked at every step). SIGINT is turned into SIGTERM there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

EXIT_PREEMPTED = 143


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint written at step {step}; rerun the same command "
                         "to resume")
        self.step = step


class PreemptionWatcher:
    def __init__(self):
        self.multiprocess = jax.process_count() > 1
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        if self.multiprocess:
            self._install(signal.SIGINT, self._forward_to_sigterm)
        else:
            self._install(signal.SIGTERM, self._flag)
            self._install(signal.SIGINT, self._flag)

    def _install(self, signum: int, handler) -> None:
        self._previous[signum] = signal.signal(signum, handler)

    def _flag(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: stopping after this step with a checkpoint",
                        self.signal_name)

    def _forward_to_sigterm(self, signum, frame) -> None:
        self.signal_name = "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        if self.multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal_name is not None

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
