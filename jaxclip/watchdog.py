"""A hung step ends the process instead of holding the job forever.

A collective that never completes (a peer that died or deadlocked, a wedged interconnect) blocks
every process in C code: no exception is raised, no log line is written, and a scheduler sees a
healthy process. The watchdog turns that into a failure it can act on:

    wd = Watchdog(multiple=10, floor_s=600, first_floor_s=1800)  # starts a daemon thread
    with wd.phase("step", step):        # or "checkpoint", "restore", "eval", "compile"
        ...
    wd.close()

A phase that runs longer than its limit makes the watchdog thread write the stacks of all threads
(faulthandler, straight to stderr, then through `logging`), log

    watchdog: <phase> at step <n> has run <t> s (limit <l> s); exiting

and end the process with `os._exit(EXIT_HUNG)`: a process stuck in a collective can be ended in
no other way (it never returns to Python to raise or unwind), and the scheduler then restarts the
job from its last checkpoint (launch/README.md). On a multi-host job the other processes are
stopped by the launcher (launch/local.sh, srun --kill-on-bad-exit, the JobSet) or time out in
their own watchdog.

The limit of a phase is `multiple` x the median duration of the completed "step" phases (the
last `window` of them), and never less than `floor_s`; before any step has completed (compiling,
restoring, the first step, a first evaluation) it is `first_floor_s`. `phase(..., limit_s=X)`
gives one phase a fixed limit (an evaluation that is known to take long). The median, not the
mean, so that a few slow steps (a log step that waits for the device, a checkpoint step) do not
loosen the limit; the floor, so that fast steps do not make an ordinary hiccup fatal.

Cost per phase: a few attribute stores and, for a step, one deque append. The thread is not woken
by phases; it sleeps until the earliest moment the current phase could run out (at most
min(floor_s, first_floor_s) ahead, since no phase started later can run out sooner), checks,
and sleeps again: a run of N seconds wakes it about N / floor_s times.

Limitation: the thread needs the GIL. JAX releases it while waiting for devices and collectives,
so a hang there is caught; C code that hangs while holding the GIL is not.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
import traceback

# The process's exit status when the watchdog ends it; jaxclip/cli.py lists all exit statuses.
EXIT_HUNG = 3

PHASES = ("step", "checkpoint", "restore", "eval", "compile")
_OFF = contextlib.nullcontext()  # what `phase` returns when the watchdog is off


class _Phase:
    """One entered phase; also its own context manager (a class, not a generator: it is
    entered once per step and must cost next to nothing)."""

    __slots__ = ("_dog", "_outer", "limit_s", "name", "start", "step")

    def __init__(self, dog: Watchdog, name: str, step: int, limit_s: float | None):
        self._dog = dog
        self.name = name
        self.step = step
        self.limit_s = limit_s
        self.start = 0.0
        self._outer: _Phase | None = None

    def __enter__(self) -> _Phase:
        dog = self._dog
        self._outer = dog._current
        self.start = time.monotonic()
        dog._current = self  # one reference store: the thread reads it when it next wakes
        if self.limit_s is not None and self.limit_s < dog._sleep_cap:
            dog._poke()  # the thread may be asleep past this phase's (short) deadline
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        dog = self._dog
        if exc_type is None and self.name == "step":
            dog._steps.append(time.monotonic() - self.start)  # deque.append is thread-safe
        dog._current = self._outer  # a nested phase hands back to the one around it


class Watchdog:
    """See the module docstring. `floor_s=0` turns it off: no thread, and `phase` returns a
    context manager that does nothing (one config value switches it)."""

    def __init__(self, multiple: float = 10.0, floor_s: float = 600.0,
                 first_floor_s: float | None = None, *, window: int = 101,
                 exit_code: int = EXIT_HUNG):
        if multiple <= 0 or floor_s < 0 or (first_floor_s is not None and first_floor_s <= 0):
            raise ValueError(f"watchdog: multiple and first_floor_s must be positive and floor_s "
                             f"positive or 0 (off); got {multiple}, {floor_s}, {first_floor_s}")
        self.enabled = floor_s > 0
        self.multiple = float(multiple)
        self.floor_s = float(floor_s)
        self.first_floor_s = float(first_floor_s if first_floor_s is not None else floor_s)
        self.exit_code = exit_code
        self.wakeups = 0  # how often the thread woke (the tests check it stays small)
        self._steps: collections.deque[float] = collections.deque(maxlen=window)
        self._current: _Phase | None = None
        self._sleep_cap = min(self.floor_s, self.first_floor_s)
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="jaxclip-watchdog",
                                            daemon=True)
            self._thread.start()

    def phase(self, name: str, step: int, *,
              limit_s: float | None = None) -> _Phase | contextlib.nullcontext:
        """Context manager marking `name` (one of PHASES, or any label) at `step` as running."""
        if not self.enabled:
            return _OFF
        return _Phase(self, name, int(step), limit_s)

    def limit(self) -> float:
        """The limit, in seconds, of a phase entered now (without a limit of its own)."""
        if not self.enabled:
            return float("inf")
        steps = list(self._steps)  # a copy: the main thread appends meanwhile
        if not steps:
            return self.first_floor_s
        return max(self.floor_s, self.multiple * statistics.median(steps))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _poke(self) -> None:
        with self._cond:
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                current = self._current
                now = time.monotonic()
                sleep = self._sleep_cap
                if current is not None:
                    limit = current.limit_s if current.limit_s is not None else self.limit()
                    ran = now - current.start
                    if ran >= limit:
                        self._fire(current, ran, limit)
                        return
                    sleep = min(sleep, limit - ran)
                self._cond.wait(sleep)
                self.wakeups += 1

    def _fire(self, phase: _Phase, ran: float, limit: float) -> None:
        line = (f"watchdog: {phase.name} at step {phase.step} has run {ran:.1f} s "
                f"(limit {limit:.1f} s); exiting")
        report_stuck(f"watchdog: {phase.name} at step {phase.step} is stuck", line)
        os._exit(self.exit_code)


def report_stuck(header: str, line: str) -> None:
    """Writes `header`, the stacks of all threads and `line` to stderr, then the same to the log.
    For a process about to `os._exit` because it is stuck (also used by jaxclip.preemption)."""
    # To stderr first, with faulthandler: it writes to the file descriptor directly and takes no
    # lock that the stuck thread could be holding (a logging handler's, sys.stderr's).
    fd = _stderr_fd()
    say(f"{header}; stacks of all threads follow")
    faulthandler.dump_traceback(file=fd, all_threads=True)
    say(line)
    # Then to the log (its file handlers), from a helper thread that may block on a handler lock
    # without holding up the exit: the caller exits after at most 10 s either way.
    helper = threading.Thread(target=_log_stacks, args=(line,), daemon=True)
    helper.start()
    helper.join(timeout=10)


def say(line: str) -> None:
    """One line straight to stderr's file descriptor (no Python-level lock involved)."""
    with contextlib.suppress(OSError):  # nowhere left to report to: exiting matters more
        os.write(_stderr_fd(), (line + "\n").encode("utf-8", "replace"))


def _stderr_fd() -> int:
    try:
        return sys.__stderr__.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _log_stacks(line: str) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = [f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
              for ident, frame in sys._current_frames().items()]
    logging.error("%s\n%s", line, "\n".join(stacks))
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # a broken handler must not hold up the exit
            handler.flush()
