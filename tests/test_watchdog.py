"""Hangs end the process: the watchdog (a phase past its limit exits with EXIT_HUNG, stacks on
stderr) and the preemption watcher's way out (a second stop signal, or a step stuck past the
grace period after the first).

Whatever could end a process runs in a child process (an `os._exit` here would end pytest); every
child has a timeout and is killed if it outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxclip.preemption import EXIT_PREEMPTED
from jaxclip.watchdog import EXIT_HUNG, Watchdog

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _child(code: str, *args: str):
    """A Python child running `code`, stdout/stderr piped; killed on the way out if still alive."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _wait_for(proc, word: str, timeout: float = 60) -> None:
    """Reads the child's stdout until a line contains `word`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"child ended early: {proc.stderr.read()}"
        if word in line:
            return
    raise AssertionError(f"no {word!r} from the child within {timeout} s")


def _finish(proc, timeout: float = 60) -> tuple[int, str, float]:
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr, time.monotonic() - start


# ---- the watchdog -----------------------------------------------------------------------------

STUCK = """
    import sys, time
    from jaxclip.watchdog import Watchdog

    def sleeping_in_a_collective():
        time.sleep(120)

    wd = Watchdog(multiple=5, floor_s=float(sys.argv[1]), first_floor_s=float(sys.argv[2]))
    for step in range(int(sys.argv[3])):  # steps of 0.2 s: the median the limit comes from
        with wd.phase("step", step):
            time.sleep(0.2)
    print("ready", flush=True)
    with wd.phase(sys.argv[4], 7, limit_s=float(sys.argv[5]) if len(sys.argv) > 5 else None):
        sleeping_in_a_collective()
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("args, phase, limit", [
    # before any step completed: the first floor
    (("600", "1", "0", "step"), "step", 1.0),
    # 3 steps of 0.2 s, multiple 5: about 1 s (the median's, above the 0.1 s floor)
    (("0.1", "600", "3", "step"), "step", None),
    # a limit of its own, far below the floors the thread sleeps by
    (("600", "600", "0", "eval", "1"), "eval", 1.0),
], ids=["first-floor", "median", "own-limit"])
def test_a_stuck_phase_ends_the_process_with_its_stacks(args, phase, limit):
    with _child(STUCK, *args) as proc:
        _wait_for(proc, "ready")
        code, stderr, took = _finish(proc)
    assert code == EXIT_HUNG, stderr
    assert 0.9 <= took < 30, took
    assert "sleeping_in_a_collective" in stderr  # the stuck thread's stack
    assert f"watchdog: {phase} at step 7 is stuck; stacks of all threads follow" in stderr
    # One line straight on stderr, the same through logging (no handler here: its last resort,
    # stderr, with a level prefix) followed by the stacks again.
    line = [x for x in stderr.splitlines() if x.startswith("watchdog: ") and "has run" in x]
    assert len(line) == 1 and line[0].startswith(f"watchdog: {phase} at step 7 has run "), stderr
    assert line[0].endswith("); exiting") and f"ERROR:root:{line[0]}" in stderr
    got = float(line[0].split("(limit ")[1].split(" s)")[0])
    if limit is None:  # 5 x the median of three 0.2 s sleeps (which overshoot a little)
        assert 1.0 <= got < 2.5, line
    else:
        assert got == limit, line
    assert "not reached" not in stderr


FINISHES = """
    import time
    from jaxclip.watchdog import Watchdog

    wd = Watchdog(multiple=50, floor_s=1.0)
    for step in range(2000):  # short steps
        with wd.phase("step", step):
            pass
    with wd.phase("eval", 2000):
        time.sleep(0.5)  # below the 1 s floor
    time.sleep(1.5)  # outside any phase: idle time has no limit
    wakeups = wd.wakeups
    wd.close()
    print(f"done wakeups={wakeups}", flush=True)
"""


def test_a_phase_that_finishes_in_time_does_not_fire():
    with _child(FINISHES) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The thread sleeps by the floor (1 s), not per phase: ~2.5 s of run, 2000 steps.
    wakeups = int(out.split("wakeups=")[1])
    assert wakeups <= 8, out


def test_the_limit_is_a_multiple_of_the_median_step_with_floors():
    with Watchdog(multiple=100, floor_s=0.001, first_floor_s=50) as wd:
        assert wd.limit() == 50  # no step completed yet: the first floor
        with wd.phase("eval", 0):
            time.sleep(0.3)  # not a step: does not count
        assert wd.limit() == 50
        for step, seconds in enumerate([0.02, 0.02, 0.02, 0.3]):  # one slow step
            with wd.phase("step", step):
                time.sleep(seconds)
        with pytest.raises(RuntimeError), wd.phase("step", 4):
            time.sleep(0.3)
            raise RuntimeError("a failed step does not count")
        # The median (0.02 s plus sleep overshoot), not the mean (0.09 s), times 100.
        assert 2.0 <= wd.limit() < 5.0, wd.limit()
    with Watchdog(multiple=2, floor_s=30) as wd:
        with wd.phase("step", 0):
            time.sleep(0.01)
        assert wd.limit() == 30  # the floor wins over 2 x 0.01 s
    with pytest.raises(ValueError, match="positive"):
        Watchdog(multiple=0)
    off = Watchdog(floor_s=0)  # off: no thread, phases cost nothing and never fire
    with off.phase("step", 0):
        pass
    assert not off.enabled and off.limit() == float("inf") and off._thread is None
    off.close()


# ---- the preemption watcher's way out ---------------------------------------------------------

PREEMPTED = """
    import os, sys, time
    from jaxclip.preemption import PreemptionWatcher

    def stuck_in_a_collective():
        time.sleep(120)

    watcher = PreemptionWatcher(grace_s=float(sys.argv[1]))
    for step in range(3):
        time.sleep(0.05)
        watcher.should_stop(step)
    print(f"ready {os.getpid()}", flush=True)
    if sys.argv[2] == "stuck":
        stuck_in_a_collective()
    else:  # steps go on until the watcher says stop, then a checkpoint longer than the grace
        step = 3
        while not watcher.should_stop(step):
            time.sleep(0.05)
            step += 1
        print(f"stopping after step {step}", flush=True)
        time.sleep(3 * float(sys.argv[1]))
        watcher.close()
        print("checkpointed", flush=True)
"""


def test_sigterm_while_a_step_is_stuck_exits_after_the_grace_period():
    with _child(PREEMPTED, "1", "stuck") as proc:
        _wait_for(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        code, stderr, took = _finish(proc)
    assert code == EXIT_PREEMPTED, stderr
    assert 0.9 <= took < 20, took
    assert "no step completed in the 1 s since the stop signal" in stderr
    assert "stuck_in_a_collective" in stderr
    assert "the step is stuck; exiting without a checkpoint" in stderr


def test_a_second_sigterm_exits_at_once():
    with _child(PREEMPTED, "60", "stuck") as proc:
        _wait_for(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code, stderr, took = _finish(proc)
    assert code == EXIT_PREEMPTED, stderr
    assert took < 10, took  # not the 60 s grace
    assert "second stop signal (SIGTERM): exiting now" in stderr


def test_a_clean_stop_is_not_cut_short_by_the_grace_period():
    with _child(PREEMPTED, "0.5", "steps") as proc:
        _wait_for(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err  # its own exit, not the grace period's 143
    assert "stopping after step" in out and "checkpointed" in out  # 1.5 s of "checkpoint"
    assert "stuck" not in err
