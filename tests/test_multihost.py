"""Multi-host training: 2 processes x 4 CPU devices (localhost coordinator, gloo) against the
in-process 1 x 8 run on the same global batch, and checkpoints carried across the two layouts.

The 2-process runs go through `launch/local.sh`, the launcher users run; each process reads its
half of every global batch and feeds its 4 local devices. Both layouts run the same partitioned
program on 8 devices; only the collectives' transport differs (gloo over TCP across processes vs
in-process), so the losses are compared to 1e-6 relative rather than bit for bit.

jax 0.10.x: with several CPU devices per process, gloo's reduce-scatter (the backward of the
all_gather loss) takes about 20 s per step there (fixed in jax 0.11+), so on that version these
tests use the ring loss (ppermute; equal results by tests/test_losses.py). launch/README.md says
the same to users.

No multi-process test can hang the suite: every job runs under a deadline that kills the
launcher's process group, and no process of it may outlive the test (tests/test_launch.py's
`run_job`). The jobs used to hang on jax 0.12: a gloo program that process 0 loads from the
persistent compilation cache (the suite shares one) hangs in its first collective, so the second
2-process run of the same config sat in step 1 forever; jaxclip.distributed now turns the cache off
for multi-process CPU jobs, and `test_a_warm_compilation_cache_does_not_hang_a_job` keeps it so.
"""

import os
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxclip import config, train
from jaxclip.metrics import read_metrics
from jaxclip.preemption import EXIT_PREEMPTED
from tests.test_launch import run_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
LOSS_IMPL = "ring" if tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 11) \
    else "all_gather"
TINY = [
    "train.steps=8", "train.batch_size=16", "train.log_every=1", "train.ckpt_every=4",
    "train.progress=false", "model.image.depth=1", "model.text.depth=1",
    "data.train.dataset=shapes_small", "evals={}", f"loss.impl={LOSS_IMPL}",
]
RTOL = 1e-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "cache")
    os.environ["JAXCLIP_CACHE"] = path
    return path


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """Losses of the uninterrupted 1-process run on this process's 8 devices."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    train.train(config.load(DEMO, TINY), workdir)  # also builds shapes_small into the cache
    return _losses(workdir)


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXCLIP_", "SLURM_", "TPU_", "JAX_COORDINATOR"))}
    env.update(PYTHONPATH=REPO, **extra)
    return env


def _two_processes(workdir, cache, *args):
    cmd = [os.path.join(REPO, "launch", "local.sh"), "-n", "2", "--cpu-devices-per-process", "4",
           "--", sys.executable, "-m", "jaxclip.cli", "train", "--config", DEMO,
           "--workdir", workdir, *[f"--config.{o}" for o in TINY], *args]
    # About 70 s alone on 2 cores, twice that beside other tests.
    out = run_job(cmd, env=_env(JAXCLIP_CACHE=cache), timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "hosts=2" in out.stdout + out.stderr  # really one job of two processes
    return out


def _assert_close(got: dict, want: dict, steps):
    assert sorted(got) == list(steps)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RTOL)


def test_two_processes_match_one_and_hand_over_their_checkpoint(tmp_path, cache, reference):
    workdir = str(tmp_path / "run")
    _two_processes(workdir, cache, "--stop-at", "4")  # 2 x 4 devices, checkpoint at step 4
    _assert_close(_losses(workdir), reference, range(1, 5))
    train.train(config.load(DEMO, TINY), workdir)  # 1 process resumes the 2-process checkpoint
    _assert_close(_losses(workdir), reference, range(1, 9))


def test_two_processes_resume_a_one_process_checkpoint(tmp_path, cache, reference):
    workdir = str(tmp_path / "run")
    train.train(config.load(DEMO, TINY), workdir, stop_at=4)
    _two_processes(workdir, cache)
    _assert_close(_losses(workdir), reference, range(1, 9))
    # The 2-process run wrote one checkpoint per step (not one per process).
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


# An explicit collective inside shard_map, as the loss's all-gather of embeddings: the kind of
# program that hung when process 0 loaded it from the persistent compilation cache (jax 0.12.1).
GATHER = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxclip import distributed

    assert distributed.maybe_initialize()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    gather = jax.jit(jax.shard_map(lambda x: jax.lax.all_gather(x, "d", tiled=True), mesh=mesh,
                                   in_specs=P("d"), out_specs=P("d"), check_vma=False))
    local = np.arange(jax.local_device_count(), dtype=np.float32) + 10 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
    total = float(np.asarray(gather(x).addressable_data(0)).sum())
    # (A leading newline: gloo's own log lines, written in pieces, cannot split this one.)
    print(f"\\nGATHERED {total} cache={jax.config.jax_enable_compilation_cache}", flush=True)
""")


def test_a_warm_compilation_cache_does_not_hang_a_job(tmp_path):
    """The same 2-process CPU program twice with one compilation cache: the second run used to
    find its program in the cache on process 0 and hang in the all-gather (jax 0.12.1)."""
    env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [os.path.join(REPO, "launch", "local.sh"), "-n", "2", "--cpu-devices-per-process", "2",
           "--", sys.executable, "-c", GATHER]
    for _ in range(2):
        out = run_job(cmd, env=env, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        for rank in (0, 1):  # devices hold 0, 1 and 10, 11: every one gathers all four
            assert f"[{rank}] GATHERED 22.0 cache=False" in out.stdout, out.stdout


# Steps of 0.1 s that ask the preemption watcher after each; process 1 is sent SIGTERM at step 5.
STEPS = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    from jaxclip import distributed
    from jaxclip.preemption import EXIT_PREEMPTED, PreemptionWatcher

    assert distributed.maybe_initialize()
    watcher = PreemptionWatcher()
    for step in range(1, 300):
        time.sleep(0.1)
        if jax.process_index() == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        if watcher.should_stop(step):
            print(f"STOPPED at step {step}", flush=True)
            watcher.close()
            sys.exit(EXIT_PREEMPTED)
    sys.exit(1)
""")


def test_sigterm_to_one_process_stops_every_process_after_the_same_step():
    """The watcher takes SIGTERM over from JAX's preemption service (to exit at once on a second
    one, or when a step is stuck) and passes the first one on: the service still agrees on one
    step for all processes."""
    cmd = [os.path.join(REPO, "launch", "local.sh"), "-n", "2", "--cpu-devices-per-process", "1",
           "--", sys.executable, "-c", STEPS]
    out = run_job(cmd, env=_env(), timeout=120)
    assert out.returncode == EXIT_PREEMPTED, out.stdout[-3000:] + out.stderr[-3000:]
    stops = {line.split()[0]: line.split()[-1] for line in out.stdout.splitlines()
             if "STOPPED at step" in line}
    assert set(stops) == {"[0]", "[1]"} and len(set(stops.values())) == 1, out.stdout
    assert int(next(iter(stops.values()))) > 5
    assert "process 0 exited with status 143" in out.stderr  # not killed: it stopped by itself
