"""One trainer per workdir: an exclusive lock held for the run's lifetime.

Two trainers writing one workdir interleave their checkpoints, config and metrics, or crash on
each other's Orbax temporary directories. `WorkdirLock` takes an advisory `flock` on
WORKDIR/.lock and writes the holder (host, pid, start time) into it. The kernel releases a flock
when its holder dies in any way, SIGKILL included, so a dead run's lock is never stale on a local
filesystem. Where flock is not supported (some network filesystems), the lock falls back to
creating the file exclusively; a file left by a dead process on the same host (its pid no longer
exists) is taken over, one from another host is reported and must be removed by hand.

Multi-host runs take it on process 0 only (every host sees the same workdir); the trainer
broadcasts the outcome so that every process stops with the same error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    pass


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 1)}


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {since})"


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: int | None = None
        self._exclusive_file = False

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirLockedError(self._locked_message(_read(self.path))) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return self._acquire_exclusive_file()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> WorkdirLock:
        """Fallback without flock: O_EXCL creation of a second file, with stale-pid takeover."""
        path = self.path + ".held"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = _read(path)
                same_host = info.get("host") == socket.gethostname()
                if same_host and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
                    os.unlink(path)  # its holder is dead: the lock is stale
                    continue
                raise WorkdirLockedError(self._locked_message(info, path)) from None
            os.write(fd, json.dumps(_holder()).encode())
            os.close(fd)
            self.path, self._exclusive_file = path, True
            return self
        raise WorkdirLockedError(self._locked_message(_read(path), path))

    def _locked_message(self, info: dict, path: str | None = None) -> str:
        workdir = os.path.dirname(self.path)
        msg = (f"workdir {workdir} is in use by another trainer: {_describe(info)}; wait for "
               "it to finish, stop it, or pass another --workdir")
        if path:  # the fallback's file survives its holder on another host
            msg += f" (if that run is gone, remove {path})"
        return msg

    def release(self) -> None:
        if self._exclusive_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._exclusive_file = False
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
