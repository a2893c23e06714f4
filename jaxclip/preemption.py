"""Stopping cleanly on a preemption notice (SIGTERM) or Ctrl-C (SIGINT), and at once when that
cannot work.

The trainer asks `watcher.should_stop(step)` after every step. When it says yes, the trainer
writes a checkpoint of that step, waits until it is committed, and raises `Preempted`; the CLI
exits with status EXIT_PREEMPTED = 143 (128 + SIGTERM, what a process killed by SIGTERM reports),
which schedulers treat as retriable (xpk/Kubernetes pod failure policies restart on >= 127), and
rerunning the same command resumes from that checkpoint. A finished run exits 0, a failed one 1.

Single process: the first SIGTERM or SIGINT sets a flag that `should_stop` reports.
Several processes: every process must stop after the *same* step, so the decision goes through
JAX's preemption sync point, which learns of SIGTERM in each process and agrees on the step via the
coordination service (it must be asked at every step). SIGINT counts as SIGTERM there.

When the clean stop cannot happen, the process exits by itself (a signal handler in Python would
never run: it waits for the main thread, which is the one that is stuck):
  - a second SIGTERM or SIGINT exits at once, with 128 + its number (143, 130);
  - after the first one, if no step completes for `grace_s` seconds (the step is stuck, e.g. in a
    collective whose peer is gone), the stacks of all threads are written to stderr and the
    process exits with 143. Each completed step restarts that clock, and once `should_stop` has
    said yes (the checkpoint is being written) it no longer runs: the checkpoint takes what the
    platform's own grace period allows (launch/README.md).
Both are done by a daemon thread that hears every signal through `signal.set_wakeup_fd`: the
interpreter's C-level handler writes the signal number to a socket the moment it arrives,
whatever the main thread is doing.

Multi-process detail: JAX's preemption service catches SIGTERM with a C++ handler. The watcher
installs its own (to hear every signal) and calls JAX's handler from its thread on the first
signal, so the service still learns of the notice (Linux; elsewhere JAX keeps SIGTERM and only
SIGINT is heard here, as before).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

import jax

from jaxclip.watchdog import report_stuck, say

EXIT_PREEMPTED = 143
DEFAULT_GRACE_S = 60.0


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint written at step {step}; rerun the same command "
                         "to resume")
        self.step = step


class _SigAction(ctypes.Structure):
    """glibc's `struct sigaction` (x86-64 and aarch64 share the layout): the handler, a 1024-bit
    mask, the flags, the restorer."""

    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (1024 // 64)),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4  # Linux: the handler takes (signum, siginfo_t *, void *)


class _NativeHandler:
    """The C handler installed for a signal before us (JAX's preemption notifier), so that it can
    be called from a thread and put back afterwards. Linux/glibc only; `load` returns None
    elsewhere or when the current handler is not a native function."""

    def __init__(self, libc, signum: int, saved: _SigAction):
        self._libc = libc
        self.signum = signum
        self._saved = saved
        proto = (ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
                 if saved.flags & _SA_SIGINFO else ctypes.CFUNCTYPE(None, ctypes.c_int))
        self._fn = proto(saved.handler)
        self._siginfo = bool(saved.flags & _SA_SIGINFO)

    @classmethod
    def load(cls, signum: int) -> _NativeHandler | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            saved = _SigAction()
            if libc.sigaction(signum, None, ctypes.byref(saved)) != 0:
                return None
        except (OSError, AttributeError):
            return None
        if saved.handler in (None, int(signal.SIG_DFL), int(signal.SIG_IGN)):
            return None
        return cls(libc, signum, saved)

    def call(self) -> None:
        # JAX's notifier only records that the signal came (an atomic store), which is safe to do
        # from any thread.
        if self._siginfo:
            self._fn(self.signum, None, None)
        else:
            self._fn(self.signum)

    def restore(self) -> None:
        self._libc.sigaction(self.signum, ctypes.byref(self._saved), None)


class PreemptionWatcher:
    def __init__(self, grace_s: float | None = DEFAULT_GRACE_S):
        self.multiprocess = jax.process_count() > 1
        self.signal_name: str | None = None
        self.grace_s = grace_s
        self._previous: dict[int, object] = {}
        self._native: _NativeHandler | None = None
        self._signals = 0  # SIGTERM/SIGINT heard so far (by the thread)
        self._last_progress = 0.0  # when the latest step completed after the first signal
        self._stopping = False  # should_stop said yes: the checkpoint is being written
        self._closed = False
        self._wakeup_previous: int | None = None
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        if self.multiprocess:
            self._native = _NativeHandler.load(signal.SIGTERM)
            if self._native is not None:  # else JAX keeps SIGTERM to itself, as it was
                self._install(signal.SIGTERM)
            self._install(signal.SIGINT)
        else:
            self._install(signal.SIGTERM)
            self._install(signal.SIGINT)
        self._start_thread()

    def _install(self, signum: int) -> None:
        self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Runs in the main thread, whenever it next executes Python; the thread below has already
        # heard the signal and acted on it.
        if self.signal_name is not None:
            return
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: stopping after this step with a checkpoint",
                        self.signal_name)
        if self.multiprocess and self._native is None:
            os.kill(os.getpid(), signal.SIGTERM)  # SIGINT -> JAX's own SIGTERM handler

    def _start_thread(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it: a signal handler must not block
        try:
            self._wakeup_previous = signal.set_wakeup_fd(writer.fileno(),
                                                         warn_on_full_buffer=False)
        except ValueError:  # not the main thread of the main interpreter
            reader.close()
            writer.close()
            return
        self._sockets = (reader, writer)
        self._thread = threading.Thread(target=self._listen, name="jaxclip-preemption",
                                        daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        reader = self._sockets[0]
        while not self._closed:
            timeout = None
            if self._signals and not self._stopping and self.grace_s is not None:
                timeout = self._last_progress + self.grace_s - time.monotonic()
                if timeout <= 0:
                    self._grace_expired()
                    return
            ready, _, _ = select.select([reader], [], [], timeout)
            if not ready:
                continue  # the grace deadline: checked at the top, with any progress since
            try:
                data = reader.recv(64)
            except OSError:
                return  # closed
            if not data:
                return
            for signum in data:
                if self._closed:
                    return  # close() writes a 0 byte to wake this thread
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._heard(signum)

    def _heard(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self._last_progress = time.monotonic()
            if self._native is not None:
                self._native.call()  # JAX's preemption service learns of it, as from SIGTERM
            return
        say(f"preemption: second stop signal ({name}): exiting now, without a checkpoint")
        os._exit(128 + signum)

    def _grace_expired(self) -> None:
        report_stuck(f"preemption: no step completed in the {self.grace_s:g} s since the stop "
                     "signal", "preemption: the step is stuck; exiting without a checkpoint")
        os._exit(EXIT_PREEMPTED)

    def should_stop(self, step: int) -> bool:
        self._last_progress = time.monotonic()  # a step completed: the grace clock restarts
        if self.multiprocess:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self.signal_name is not None or self._signals > 0
        if stop:
            self._stopping = True
        return stop

    def close(self) -> None:
        for signum, handler in self._previous.items():
            if signum == signal.SIGTERM and self._native is not None:
                signal.signal(signum, signal.SIG_DFL)  # Python's own record of the handler
                self._native.restore()  # and JAX's handler back in place
            else:
                signal.signal(signum, handler)
        self._previous.clear()
        if self._sockets is None:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._wakeup_previous if self._wakeup_previous is not None
                                 else -1)
        self._closed = True
        with contextlib.suppress(OSError):
            self._sockets[1].send(b"\0")  # wakes the thread (closing a socket would not)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for sock in self._sockets:
            sock.close()
        self._sockets = None
