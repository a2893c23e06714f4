"""The launch/ scripts: shellcheck and syntax, the local multi-process launcher (a real 2-process
JAX job over gloo, failure and signal handling, no process left behind when the launcher is
killed), the SLURM batch script run end to end through a stand-in `srun`, and the cloud scripts'
dry runs (the commands they would run, parsed back). Every job runs under a deadline, and none of
its processes may outlive the test (`run_job`, `tagged_job`; also used by tests/test_multihost.py).

Real pods and clusters are out of reach here; what runs on them is checked as far as it can be
locally: the exact remote shell commands tpu_qr.sh sends to TPU workers are executed on this
machine with a fake home directory, and the XLA flags of launch/env/gpu.env are fed to this
machine's XLA, which rejects unknown flag names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from jaxclip import distributed

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
ENV_FILES = sorted(LAUNCH.glob("env/*.env"))
BASH = shutil.which("bash")


# conftest.py sets these for the suite's own compilation cache; tests of the env files' defaults
# must not inherit them
CONFTEST_CACHE_SETTINGS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def _env(*, drop: tuple[str, ...] = (), **extra) -> dict:
    """This process's environment minus anything that would make a child think it is part of a
    launch (and minus `drop`), plus PYTHONPATH so children import this checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXCLIP_", "SLURM_", "TPU_", "JAX_COORDINATOR", "DRY_RUN"))
           and k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _run(args, *, env=None, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kw)


# ---- multi-process jobs that cannot outlive their test -------------------------------------------
#
# Every job a test starts carries JAXCLIP_TEST_JOB=<a fresh id> in its environment, which all its
# processes inherit and cannot drop (/proc/PID/environ is the environment they started with): that
# finds them wherever they are, re-parented or in process groups of their own. A test fails if any
# of them is still alive shortly after the launcher ended, and kills them, so one broken test does
# not leave processes behind for the next.

JOB_TAG = "JAXCLIP_TEST_JOB"


def job_processes(tag: str) -> list[int]:
    """Pids of the live processes started with JAXCLIP_TEST_JOB=tag (Linux; [] elsewhere)."""
    found = []
    marker = f"{JOB_TAG}={tag}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, a zombie, or not ours to read
            continue
    return found


def assert_no_survivors(tag: str, grace: float = 10.0) -> None:
    """Waits up to `grace` s for the job's processes to end, then kills what is left and fails."""
    deadline = time.monotonic() + grace
    while (left := job_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left:
        return
    described = []
    for pid in left:
        with contextlib.suppress(OSError):
            described.append(f"{pid}: {(Path('/proc') / str(pid) / 'cmdline').read_bytes()!r}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    raise AssertionError("processes outlived their launcher:\n" + "\n".join(described))


@contextlib.contextmanager
def tagged_job(args, *, env=None, **popen):
    """Starts `args` (a launcher) in a session of its own with a fresh JAXCLIP_TEST_JOB tag; on
    the way out, a launcher still running gets SIGKILL on its process group (what a CI timeout
    does) and no process of the job may survive."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(args, env=dict(env or _env(), **{JOB_TAG: tag}), cwd=REPO, text=True,
                            start_new_session=True, **popen)
    proc.tag = tag
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        assert_no_survivors(tag)


def run_job(args, *, timeout: float, env=None) -> subprocess.CompletedProcess:
    """Runs a launcher command to the end within `timeout` s, its processes included: past it,
    the launcher's process group is killed and the test fails (with the output so far)."""
    with tagged_job(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            # The launcher is dead; its processes die with it (that is tested), so the pipes close.
            out, err = proc.communicate(timeout=30)
            raise AssertionError(f"{shlex.join(map(str, args))} ran past {timeout} s:\n"
                                 f"{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _dry(script: str, *args, **env) -> list[list[str]]:
    """Runs `launch/SCRIPT ARGS` with DRY_RUN=1 and returns the printed commands as argv lists."""
    out = _run([str(LAUNCH / script), *args], env=_env(DRY_RUN="1", **env))
    assert out.returncode == 0, out.stderr
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ---- static checks ----------------------------------------------------------------------------

def test_every_script_is_documented_and_strict():
    assert {p.name for p in SCRIPTS} >= {"local.sh", "tpu_qr.sh", "tpu_xpk.sh", "gke.sh",
                                         "gpu_slurm.sbatch", "worker.sh", "lib.sh"}
    for path in SCRIPTS:
        lines = path.read_text().splitlines()
        if path.name == "lib.sh":  # sourced, not run
            assert lines[0] == "# shellcheck shell=bash"
            continue
        assert lines[0] == "#!/usr/bin/env bash", path
        assert lines[1].startswith("# ") and lines[2].startswith("#"), f"{path}: no header"
        assert "Example" in path.read_text(), f"{path}: the header has no example"
        assert "set -euo pipefail" in lines, path
        assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("path", SCRIPTS + ENV_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    out = _run([BASH, "-n", str(path)])
    assert out.returncode == 0, out.stderr


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI installs it")
    # launch/.shellcheckrc lets shellcheck follow the sourced lib.sh and env files.
    out = _run(["shellcheck", *map(str, SCRIPTS + ENV_FILES)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_jobset_template_is_yaml():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc = yaml.safe_load((LAUNCH / "gke_jobset.yaml").read_text())
    assert doc["kind"] == "JobSet" and doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"


# ---- jaxclip.distributed: which environments start jax.distributed ------------------------------

def test_launch_kind():
    kind = distributed.launch_kind
    assert kind({}) is None
    assert kind({"JAXCLIP_COORDINATOR": "h:1", "JAXCLIP_NUM_PROCESSES": "2",
                 "JAXCLIP_PROCESS_ID": "0"}) == "explicit"
    assert kind({"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0"}) == "slurm"
    assert kind({"SLURM_NTASKS": "16"}) is None  # the batch script itself, not a task
    assert kind({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert kind({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert kind({"JAXCLIP_DISTRIBUTED": "1"}) == "forced"  # Cloud TPU VM: no env signal
    assert kind({"JAXCLIP_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}) is None
    assert kind({"JAXCLIP_DISTRIBUTED": "", "TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    with pytest.raises(ValueError, match="JAXCLIP_DISTRIBUTED"):
        kind({"JAXCLIP_DISTRIBUTED": "maybe"})


# ---- local.sh ---------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxclip import distributed

    assert distributed.maybe_initialize()
    rank = jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    # Each process contributes its 4 local devices' values (rank + 1); the sum crosses processes.
    local = np.full((jax.local_device_count(),), rank + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    ranks = multihost_utils.process_allgather(np.array([rank]))
    # The leading newline: gloo's C++ threads log "connected to N peer ranks" in several writes,
    # and one of them can land in the middle of this line (seen once in 16 runs under load).
    print(f"\\nRESULT rank={rank} processes={jax.process_count()} devices={jax.device_count()} "
          f"local={jax.local_device_count()} sum={float(total)} ranks={ranks.ravel().tolist()}",
          flush=True)
""")
EXPECTED = "processes=2 devices=8 local=4 sum=12.0 ranks=[0, 1]"


def test_local_two_processes_share_a_jax_job():
    out = run_job([str(LAUNCH / "local.sh"), "-n", "2", "--cpu-devices-per-process", "4", "--",
                   sys.executable, "-c", CHILD], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        # Output lines carry the rank prefix.
        assert f"[{rank}] RESULT rank={rank} {EXPECTED}" in out.stdout, out.stdout


def test_local_prefixes_logs_and_passes_the_environment(tmp_path):
    out = run_job([str(LAUNCH / "local.sh"), "-n", "3", "--port", "23456", "--log-dir",
                   str(tmp_path), "--", "sh", "-c",
                   'echo "$JAXCLIP_PROCESS_ID/$JAXCLIP_NUM_PROCESSES@$JAXCLIP_COORDINATOR"; '
                   'echo err >&2'], timeout=60)
    assert out.returncode == 0, out.stderr
    for r in range(3):
        assert f"[{r}] {r}/3@localhost:23456" in out.stdout and f"[{r}] err" in out.stdout
        assert (tmp_path / f"rank{r}.log").read_text() == f"{r}/3@localhost:23456\nerr\n"


def test_local_gpus_per_process_sets_device_ids():
    out = run_job([str(LAUNCH / "local.sh"), "-n", "2", "--gpus-per-process", "3", "--",
                   "sh", "-c", 'echo "ids=$JAXCLIP_LOCAL_DEVICE_IDS"'], timeout=60)
    assert "[0] ids=0,1,2" in out.stdout and "[1] ids=3,4,5" in out.stdout, out.stdout


def test_local_replaces_an_inherited_device_count():
    out = run_job([str(LAUNCH / "local.sh"), "-n", "1", "--cpu-devices-per-process", "2", "--",
                   "sh", "-c", 'echo "$JAX_PLATFORMS|$XLA_FLAGS"'], timeout=60,
                  env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_dump_to=/x"))
    assert "[0] cpu|--xla_dump_to=/x --xla_force_host_platform_device_count=2" in out.stdout


@pytest.mark.parametrize("args", [["--", "true"], ["-n", "0", "--", "true"], ["-n", "2"],
                                  ["-n", "2", "--bogus", "--", "true"]])
def test_local_rejects_bad_usage(args):
    out = _run([str(LAUNCH / "local.sh"), *args])
    assert out.returncode == 2 and "error" in out.stderr


def test_local_failing_process_stops_the_others():
    start = time.monotonic()
    out = run_job([str(LAUNCH / "local.sh"), "-n", "3", "--term-timeout", "5", "--", "sh", "-c",
                   'if [ "$JAXCLIP_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60'], timeout=30)
    # The first failure's status wins; the sleeping ranks got SIGTERM at once (sh dies of it,
    # its `sleep` child goes with the process group).
    assert out.returncode == 3, out.stderr
    assert time.monotonic() - start < 10
    assert "process 1 exited with status 3" in out.stderr


@contextlib.contextmanager
def _launched(args, ready_lines: int, env=None):
    """local.sh (or any launcher) running in the background, once `ready_lines` of its output
    lines contain "ready"; its processes may not outlive the test (tagged_job)."""
    with tagged_job(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        lines = []
        while len([x for x in lines if "ready" in x]) < ready_lines:
            line = proc.stdout.readline()
            assert line, f"launcher ended early: {lines} {proc.stderr.read()}"
            lines.append(line)
        yield proc, lines


def test_local_forwards_sigterm_to_every_process():
    child = ("import os, signal, sys, time\n"
             "r = os.environ['JAXCLIP_PROCESS_ID']\n"
             "def stop(sig, frame):\n"
             "    print(f'rank {r} got signal {sig}', flush=True); sys.exit(7)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "print(f'rank {r} ready', flush=True)\n"
             "time.sleep(60)\n")
    with _launched([str(LAUNCH / "local.sh"), "-n", "2", "--", sys.executable, "-c", child],
                   2) as (proc, lines):
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    lines += stdout.splitlines(keepends=True)
    assert proc.returncode == 7, stderr  # the processes' own status after a clean stop
    for r in (0, 1):
        assert f"[{r}] rank {r} got signal {int(signal.SIGTERM)}\n" in lines, lines
    assert "forwarding it to all 2 processes" in stderr


def test_local_kills_a_process_that_ignores_sigterm():
    child = ("import signal, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "print('ready', flush=True)\n"
             "time.sleep(60)\n")
    with _launched([str(LAUNCH / "local.sh"), "-n", "2", "--term-timeout", "1", "--",
                    sys.executable, "-c", child], 2) as (proc, _):
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert time.monotonic() - start < 8
    assert "still running: killing it" in stderr and "Killed" not in stderr


def test_local_rank_killed_by_sigkill_stops_the_others():
    """A rank that dies of SIGKILL (the OOM killer) gets its peers stopped: SIGTERM first, SIGKILL
    after --term-timeout for the one that ignores it (a rank stuck in a collective)."""
    start = time.monotonic()
    out = run_job([str(LAUNCH / "local.sh"), "-n", "3", "--term-timeout", "2", "--", "sh", "-c",
                   'if [ "$JAXCLIP_PROCESS_ID" = 1 ]; then sleep 0.5; kill -KILL $$; fi; '
                   'if [ "$JAXCLIP_PROCESS_ID" = 2 ]; then trap "" TERM; fi; sleep 60'],
                  timeout=30)
    assert out.returncode == 128 + signal.SIGKILL, out.stderr
    assert time.monotonic() - start < 15
    assert "process 1 exited with status 137" in out.stderr
    assert "process 2 is still running: killing it" in out.stderr


# Each rank starts a child of its own (a data-loader worker, say) and then waits.
RANK_WITH_A_CHILD = ("import subprocess, sys, time\n"
                     "child = subprocess.Popen(['sleep', '300'])\n"
                     "print('ready', flush=True)\n"
                     "time.sleep(300)\n")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_killed_by_sigkill_leaves_no_process_behind():
    """SIGKILL on the launcher alone (what a test's or CI's timeout does): its watcher kills every
    process group it started, so the ranks and their own children all go."""
    with _launched([str(LAUNCH / "local.sh"), "-n", "2", "--", sys.executable, "-c",
                    RANK_WITH_A_CHILD], 2) as (proc, _):
        # launcher, watcher, 2 output readers, 2 ranks, 2 children
        assert len(job_processes(proc.tag)) >= 8
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert_no_survivors(proc.tag)
        assert "the launcher is gone: killing its 2 processes" in proc.stderr.read()


@pytest.mark.skipif("--pdeathsig" not in (subprocess.run(["setpriv", "--help"], capture_output=True,
                                                         text=True).stdout
                                          if shutil.which("setpriv") else ""),
                    reason="needs util-linux setpriv with --pdeathsig (Linux)")
def test_local_ranks_die_with_the_launcher_even_without_its_watcher():
    """SIGKILL on the launcher and its watcher together: the kernel's parent-death signal still
    ends every rank. (Not the ranks' own children: that is the watcher's part.)"""
    with _launched([str(LAUNCH / "local.sh"), "-n", "2", "--", sys.executable, "-c",
                    RANK_WITH_A_CHILD], 2) as (proc, _):
        cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in _children(proc.pid)}
        ranks = [p for p, c in cmdlines.items() if c.startswith(sys.executable.encode())]
        # The watcher is a subshell of the launcher: the same command line.
        watcher = [p for p, c in cmdlines.items()
                   if c == Path(f"/proc/{proc.pid}/cmdline").read_bytes()]
        assert len(ranks) == 2 and len(watcher) == 1, cmdlines
        grandchildren = [c for r in ranks for c in _children(r)]
        os.kill(watcher[0], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{r}").exists() for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [r for r in ranks if Path(f"/proc/{r}/status").exists() and
                 "zombie" not in Path(f"/proc/{r}/status").read_text()]
        assert not alive, alive
        for pid in grandchildren:  # expected to survive here; not left for the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---- env files and worker.sh ------------------------------------------------------------------

def _worker_env(platform: str, drop: tuple[str, ...] = (), **env) -> dict[str, str]:
    out = _run([str(LAUNCH / "worker.sh"), platform, "--", "true"],
               env=_env(drop=drop, DRY_RUN="1", **env))
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line
                and not line.startswith("+ "))


def test_env_files_defaults_and_overrides():
    gpu = _worker_env("gpu", drop=CONFTEST_CACHE_SETTINGS,
                      XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false")
    flags = gpu["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=1073741824" in flags
    assert flags[-1] == "--xla_gpu_enable_latency_hiding_scheduler=false"  # the user's flag wins
    assert gpu["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90" and gpu["NCCL_DEBUG"] == "WARN"
    assert gpu["JAX_COMPILATION_CACHE_DIR"].endswith("jaxclip/xla")
    assert _worker_env("gpu", JAXCLIP_GPU_FLAGS="", XLA_FLAGS="--x=1")["XLA_FLAGS"] == "--x=1"
    assert _worker_env("cpu", JAX_COMPILATION_CACHE_DIR="/shared/c")["JAX_COMPILATION_CACHE_DIR"] \
        == "/shared/c"
    tpu = _worker_env("tpu", LIBTPU_INIT_ARGS="--xla_tpu_foo=1")
    assert tpu["LIBTPU_INIT_ARGS"].startswith("--xla_tpu_enable_async_collective_fusion=true")
    assert tpu["LIBTPU_INIT_ARGS"].endswith(" --xla_tpu_foo=1")
    assert "XLA_FLAGS" not in tpu
    # Sourcing twice (the sbatch script, then each task) does not stack the defaults.
    twice = _run([BASH, "-c", ". launch/env/gpu.env; a=$XLA_FLAGS; . launch/env/gpu.env; "
                  '[ "$a" = "$XLA_FLAGS" ]'], env=_env())
    assert twice.returncode == 0


def test_worker_rejects_an_unknown_platform():
    out = _run([str(LAUNCH / "worker.sh"), "gpus", "--", "true"])
    assert out.returncode == 2 and "unknown platform" in out.stderr


def test_env_files_are_understood_by_jax():
    """XLA aborts on an unknown flag name in XLA_FLAGS, and the GPU flags are parsed by every
    backend, so this machine's jaxlib checks the names in gpu.env; JAX reads common.env's cache
    settings."""
    env = _worker_env("gpu", drop=CONFTEST_CACHE_SETTINGS,
                      JAX_COMPILATION_CACHE_DIR="/tmp/jaxclip-test-cache")
    check = ("import jax; jax.devices(); c = jax.config; "
             "print(c.jax_compilation_cache_dir, c.jax_persistent_cache_min_compile_time_secs)")
    out = _run([sys.executable, "-c", check], env=_env(**env, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["/tmp/jaxclip-test-cache", "1.0"]


# ---- gpu_slurm.sbatch -------------------------------------------------------------------------

FAKE_SRUN = textwrap.dedent("""\
    #!{python}
    # Stand-in for srun on one machine: runs the step's tasks here with SLURM's task variables,
    # forwards SIGTERM to them, and kills the step when a task fails (--kill-on-bad-exit).
    import os, signal, subprocess, sys, time
    args, opts = sys.argv[1:], {{}}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
    print("srun " + " ".join(f"--{{k}}={{v}}" for k, v in opts.items()), flush=True)
    ntasks, per_node = int(opts["ntasks"]), int(opts["ntasks-per-node"])
    procs = [subprocess.Popen(args, env=dict(
        os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node), SLURM_STEP_ID="0",
        SLURM_NODEID=str(i // per_node), SLURM_NTASKS=str(ntasks),
        SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=opts["nodes"]))
        for i in range(ntasks)]
    signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):
            [p.terminate() for p in procs if p.poll() is None]
        time.sleep(0.05)
    sys.exit(max(p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs))
""")


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    job_id = str(os.getpid() % 100000 + 7)  # JAX derives the coordinator port from it
    return tmp_path, _env(drop=CONFTEST_CACHE_SETTINGS, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                          SLURM_JOB_ID=job_id, SLURM_JOB_NUM_NODES="1",
                          SLURM_SUBMIT_DIR=str(REPO), JAXCLIP_SHARED_DIR=str(tmp_path))


def test_slurm_batch_script_runs_a_jax_job(fake_slurm):
    """The whole SLURM path on CPU: sbatch script -> srun -> worker.sh gpu (env files) ->
    jaxclip.distributed ("slurm") -> JAX's own SLURM detection."""
    tmp_path, env = fake_slurm
    env.update(GPUS_PER_NODE="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = run_job([BASH, str(LAUNCH / "gpu_slurm.sbatch"), "--", sys.executable, "-c", CHILD],
                  env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "srun --kill-on-bad-exit=1 --nodes=1 --gpus-per-node=2" in out.stdout
    for rank in (0, 1):
        assert f"RESULT rank={rank} {EXPECTED}" in out.stdout, out.stdout
    assert (tmp_path / ".cache/jaxclip/xla").is_dir()  # the compilation cache on shared storage


def test_slurm_time_limit_stops_tasks_and_requeues(fake_slurm):
    tmp_path, env = fake_slurm
    task = ('trap \'echo "task $SLURM_PROCID stopped"; exit 143\' TERM; '
            'echo "task $SLURM_PROCID ready"; while :; do sleep 0.1; done')
    env["GPUS_PER_NODE"] = "2"
    with _launched([BASH, str(LAUNCH / "gpu_slurm.sbatch"), "--", "sh", "-c", task], 2,
                   env=env) as (proc, _):
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert "task 0 stopped" in stdout and "task 1 stopped" in stdout
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", env["SLURM_JOB_ID"]]


def test_slurm_dry_run_layouts():
    base = {"SLURM_JOB_NUM_NODES": "4", "SLURM_CPUS_PER_TASK": "12", "SLURM_JOB_ID": "1"}
    out = _run([BASH, str(LAUNCH / "gpu_slurm.sbatch"), "--config", "c.py", "--workdir", "w"],
               env=_env(DRY_RUN="1", **base))
    (srun,) = [shlex.split(x[2:]) for x in out.stdout.splitlines() if x.startswith("+ ")]
    assert srun[0] == "srun" and "--gpu-bind=none" in srun
    assert "--gpus-per-task=1" not in " ".join(srun)  # breaks JAX's GPU choice, see the script
    assert _flag(srun, "--ntasks-per-node") == "8" and _flag(srun, "--ntasks") == "32"
    assert srun[srun.index("--") - 2:] == [str(LAUNCH / "worker.sh"), "gpu", "--", "jaxclip",
                                           "train", "--config", "c.py", "--workdir", "w"]
    assert "JAX_LOCAL_DEVICE_IDS" not in out.stdout
    out = _run([BASH, str(LAUNCH / "gpu_slurm.sbatch"), "--config", "c.py", "--workdir", "w"],
               env=_env(DRY_RUN="1", PROCS_PER="node", SLURM_GPUS_PER_NODE="h100:4",
                        SRUN_ARGS="--container-image=img --container-mounts=/s", **base))
    (srun,) = [shlex.split(x[2:]) for x in out.stdout.splitlines() if x.startswith("+ ")]
    assert _flag(srun, "--ntasks-per-node") == "1" and _flag(srun, "--ntasks") == "4"
    assert _flag(srun, "--gpus-per-node") == "4" and _flag(srun, "--cpus-per-task") == "48"
    assert _flag(srun, "--container-image") == "img"
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out.stdout.splitlines()


# ---- Cloud TPU VM: tpu_qr.sh ------------------------------------------------------------------

QR = {"ZONE": "us-west4-a", "PROJECT": "proj", "TPU_NAME": "tpu1", "GCS_BUCKET": "bkt"}
TRAIN_ARGS = ["--config", "configs/demo.py", "--workdir", "/mnt/jaxclip/runs/my demo"]


def test_tpu_qr_create_and_delete():
    (create,) = _dry("tpu_qr.sh", "create", SPOT="1", ACCELERATOR_TYPE="v6e-32", **QR)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "tpu1-qr"]
    assert _flag(create, "--node-id") == "tpu1" and _flag(create, "--zone") == "us-west4-a"
    assert _flag(create, "--accelerator-type") == "v6e-32"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv6e"
    assert _flag(create, "--project") == "proj" and "--spot" in create
    (create,) = _dry("tpu_qr.sh", "create", ACCELERATOR_TYPE="v4-16", **QR)
    assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base" and "--spot" not in create
    (delete,) = _dry("tpu_qr.sh", "delete", **QR)
    assert delete[3:6] == ["queued-resources", "delete", "tpu1-qr"] and "--force" in delete
    out = _run([str(LAUNCH / "tpu_qr.sh"), "create"], env=_env(DRY_RUN="1"))
    assert out.returncode == 2 and "ZONE" in out.stderr


def _remote_script(ssh: list[str]) -> str:
    """The shell command gcloud would run on the workers."""
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and ssh[5] == "tpu1"
    assert "--worker=all" in ssh
    return _flag(ssh, "--command")


def test_tpu_qr_setup_copies_and_installs():
    *copy, ssh = _dry("tpu_qr.sh", "setup", **QR)
    scp = copy[-1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    script = _remote_script(ssh)
    assert _run([BASH, "-n", "-c", script]).returncode == 0
    for piece in ('tar -xzf "$HOME/jaxclip-src.tgz"', "uv venv --quiet --python 3.12",
                  'uv pip install --quiet --python "$HOME/jaxclip-venv"/bin/python -e '
                  '"$HOME/jaxclip" "jax[tpu]"', "gcsfuse --implicit-dirs", "bkt /mnt/jaxclip"):
        assert piece in script, piece


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs setsid (util-linux)")
def test_tpu_qr_train_and_stop_run_on_a_fake_worker(tmp_path):
    """Executes the exact commands `train` and `stop` send to the TPU workers, here, with a home
    directory laid out as `setup` leaves it and a stand-in `jaxclip` that records what it got."""
    home = tmp_path / "home"
    (home / "jaxclip-venv/bin").mkdir(parents=True)
    (home / "jaxclip").symlink_to(REPO)
    (home / "jaxclip-venv/bin/python").symlink_to(sys.executable)
    fake = home / "jaxclip-venv/bin/jaxclip"
    fake.write_text(textwrap.dedent("""\
        #!/bin/sh
        trap 'echo stopped >> "$HOME/fake.out"; exit 143' TERM
        { echo "args: $*"; echo "distributed=$JAXCLIP_DISTRIBUTED mode=$WANDB_MODE";
          echo "cache=$JAX_COMPILATION_CACHE_DIR"; echo "libtpu=$LIBTPU_INIT_ARGS"; } > "$HOME/fake.out"
        while :; do sleep 0.1; done
    """))
    fake.chmod(0o755)
    env = _env(HOME=str(home))
    (train,) = _dry("tpu_qr.sh", "train", "-e", "WANDB_MODE=offline", "--", *TRAIN_ARGS, **QR)
    (stop,) = _dry("tpu_qr.sh", "stop", **QR)
    out_file = home / "fake.out"
    try:
        assert _run(["sh", "-c", _remote_script(train)], env=env).returncode == 0
        deadline = time.monotonic() + 20
        while "libtpu=" not in (out_file.read_text() if out_file.exists() else ""):
            assert time.monotonic() < deadline, (home / "jaxclip-train.log").read_text()
            time.sleep(0.1)
        got = out_file.read_text()
        assert "args: train --config configs/demo.py --workdir /mnt/jaxclip/runs/my demo" in got
        assert "distributed=1 mode=offline" in got and "cache=/mnt/jaxclip/xla-cache" in got
        assert "libtpu=--xla_tpu_enable_async_collective_fusion=true" in got
        again = _run(["sh", "-c", _remote_script(train)], env=env)
        assert again.returncode == 1 and "a trainer is running" in again.stderr
        assert "sent SIGTERM" in _run(["sh", "-c", _remote_script(stop)], env=env).stdout
        deadline = time.monotonic() + 10
        while "stopped" not in out_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        pid_file = home / "jaxclip-train.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_tpu_qr_foreground_logs_and_ssh():
    (train,) = _dry("tpu_qr.sh", "train", "--", *TRAIN_ARGS, FOREGROUND="1", **QR)
    script = _remote_script(train)
    assert "exec launch/worker.sh tpu -- jaxclip train" in script and "setsid" not in script
    (logs,) = _dry("tpu_qr.sh", "logs", LOG_WORKER="3", SSH_ARGS="--internal-ip", **QR)
    assert _flag(logs, "--worker") == "3" and "--internal-ip" in logs
    assert "tail" in _flag(logs, "--command")
    (ssh,) = _dry("tpu_qr.sh", "ssh", "--", "nvidia-smi || true", **QR)
    assert _flag(ssh, "--command") == "nvidia-smi || true"


# ---- GKE: tpu_xpk.sh and gke.sh ---------------------------------------------------------------

def test_tpu_xpk_commands():
    (create,) = _dry("tpu_xpk.sh", "train", "-e", "A=b c", "--", *TRAIN_ARGS, CLUSTER="c1",
                     NUM_SLICES="2", IMAGE="img:tpu", WORKLOAD="run1")
    assert create[:3] == ["xpk", "workload", "create"]
    assert _flag(create, "--cluster") == "c1" and _flag(create, "--workload") == "run1"
    assert _flag(create, "--num-slices") == "2" and _flag(create, "--docker-image") == "img:tpu"
    assert create[create.index("-tgps") + 1] == "120"
    envs = [create[i + 1] for i, a in enumerate(create) if a == "--env"]
    assert envs == ["JAXCLIP_DISTRIBUTED=1", "A=b c"]
    command = _flag(create, "--command")
    assert shlex.split(command) == ["exec", "launch/worker.sh", "tpu", "--", "jaxclip", "train",
                                    *TRAIN_ARGS]
    (create,) = _dry("tpu_xpk.sh", "train", "--", *TRAIN_ARGS, CLUSTER="c1")
    assert _flag(create, "--base-docker-image") == "python:3.12-slim"
    assert _flag(create, "--script-dir") == str(REPO)
    assert _flag(create, "--command").startswith("pip install")
    (delete,) = _dry("tpu_xpk.sh", "delete", CLUSTER="c1", WORKLOAD="run1")
    assert delete[:3] == ["xpk", "workload", "delete"]


XPK_PARSE = """
import argparse, json, sys
from xpk.parser import core
for argv in json.loads(sys.argv[1]):
    parser = argparse.ArgumentParser(prog="xpk")
    core.set_parser(parser=parser)
    parser.parse_args(argv[1:])
print("parsed", flush=True)
"""


def test_tpu_xpk_commands_parse_with_xpk():
    """The printed commands parsed by xpk's own argument parser (xpk 1.16 checked). xpk pins
    google-cloud packages that downgrade protobuf below what tensorflow-datasets needs, so it
    lives in its own environment: $JAXCLIP_XPK_PYTHON (tools/test.sh makes one)."""
    python = os.environ.get("JAXCLIP_XPK_PYTHON")
    if not python:
        pytest.skip("xpk is not installed: set JAXCLIP_XPK_PYTHON to a python that has it "
                    "(tools/test.sh does)")
    argvs = [_dry("tpu_xpk.sh", "train", "--", *TRAIN_ARGS, CLUSTER="c1")[0],
             _dry("tpu_xpk.sh", "status", CLUSTER="c1")[0]]
    out = _run([python, "-c", XPK_PARSE, json.dumps(argvs)])
    assert out.returncode == 0 and "parsed" in out.stdout, out.stderr[-2000:]


def test_gke_render_fills_the_jobset():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    out = _run([str(LAUNCH / "gke.sh"), "render", "-e", 'MSG=a "quoted" & $value', "--",
                *TRAIN_ARGS, "--config.train.steps=10"],
               env=_env(IMAGE="img:tpu", GCS_BUCKET="bkt", NUM_SLICES="2", NAME="run1",
                        TPU_TOPOLOGY="2x4", VMS_PER_SLICE="1", CHIPS_PER_VM="8"))
    assert out.returncode == 0, out.stderr
    assert not re.search(r"\$\{[A-Z_]+\}", out.stdout)
    doc = yaml.safe_load(out.stdout)
    assert doc["metadata"]["name"] == "run1" and doc["spec"]["failurePolicy"]["maxRestarts"] == 3
    (rjob,) = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 1 and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
    (c,) = pod["containers"]
    assert c["command"] + c["args"] == ["launch/worker.sh", "tpu", "--", "jaxclip", "train",
                                        *TRAIN_ARGS, "--config.train.steps=10"]
    assert c["env"] == [{"name": "JAX_COMPILATION_CACHE_DIR", "value": "/gcs/xla-cache"},
                        {"name": "JAXCLIP_DISTRIBUTED", "value": "1"},
                        {"name": "MSG", "value": 'a "quoted" & $value'}]
    assert c["resources"]["limits"]["google.com/tpu"] == 8
    assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"
    missing = _run([str(LAUNCH / "gke.sh"), "render", "--", *TRAIN_ARGS], env=_env(IMAGE="i"))
    assert missing.returncode == 2 and "GCS_BUCKET" in missing.stderr


def test_gke_apply_and_delete_dry_run():
    out = _run([str(LAUNCH / "gke.sh"), "apply", "--", *TRAIN_ARGS],
               env=_env(DRY_RUN="1", IMAGE="img", GCS_BUCKET="b", NAME="run1"))
    assert out.returncode == 0 and "kind: JobSet" in out.stdout
    assert out.stdout.rstrip().endswith("+ kubectl apply -f -")
    (delete,) = _dry("gke.sh", "delete", NAME="run1")
    assert delete == ["kubectl", "delete", "jobset", "run1"]
