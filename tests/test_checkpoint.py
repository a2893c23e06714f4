"""Checkpoints: preemption, corruption, resharding restore, kill -9, retention policy.

Every "resumed equals uninterrupted" check compares losses bit for bit: on CPU the same program
on the same data and parameters is deterministic, and the data stream resumes by step index.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxclip import checkpoint, config, sharding, train
from jaxclip import metrics as metrics_lib
from jaxclip.metrics import read_metrics
from jaxclip.preemption import EXIT_PREEMPTED

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
TINY = [
    "train.steps=8", "train.batch_size=16", "train.log_every=1", "train.ckpt_every=3",
    "train.progress=false", "model.image.depth=1", "model.text.depth=1",
    "data.train.dataset=shapes_small", "evals={}",
]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(*extra):
    return config.load(DEMO, [*TINY, *extra])


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of an uninterrupted 8-step run (the reference for every resume test)."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    os.environ["JAXCLIP_CACHE"] = str(cache)
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.train(_cfg(), workdir)
    return _losses(workdir)


def _cli(workdir, *extra, env=None):
    cmd = [sys.executable, "-m", "jaxclip.cli", "train", "--config", DEMO, "--workdir", workdir,
           *[f"--config.{o}" for o in TINY], *extra]
    return subprocess.Popen(cmd, env=env or dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()}")
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path) and any(s >= step for s in _losses(workdir)):
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the trainer")


@pytest.mark.slow
def test_sigterm_at_a_random_step_then_resume_reproduces_the_losses(tmp_path, straight):
    workdir = str(tmp_path / "run")
    at = random.Random().randint(1, 6)  # any step: SIGTERM lands between steps
    proc = _cli(workdir)
    _wait_for_step(workdir, at, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped = max(_losses(workdir))
    assert stopped < 8 and "preempted: checkpoint written at step" in out
    assert checkpoint.Checkpointer(workdir, every=3, keep=2).latest_step() == stopped
    train.train(_cfg(), workdir)  # the same command again resumes
    assert _losses(workdir) == straight


@pytest.mark.slow
def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(tmp_path, straight):
    workdir = str(tmp_path / "run")
    proc = _cli(workdir, "--config.train.ckpt_every=2")
    _wait_for_step(workdir, 5, proc)
    committed = os.path.join(workdir, "checkpoints", "4")  # renamed into place when complete
    deadline = time.time() + 120
    while not os.path.isdir(committed) and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # no chance to save; a save of step 6 may be half-written
    proc.wait()
    logged = max(_losses(workdir))
    assert checkpoint.Checkpointer(workdir, every=2, keep=2).latest_step() == 4
    train.train(_cfg("train.ckpt_every=2"), workdir)  # resumes at 4: steps 5.. are redone
    assert logged - 4 <= 2 + 1  # lost: the steps after the last committed checkpoint
    assert _losses(workdir) == straight  # and the redone steps log the same losses


@pytest.mark.slow
def test_a_truncated_checkpoint_is_skipped_with_a_warning(tmp_path, straight, caplog):
    workdir = str(tmp_path / "run")
    train.train(_cfg(), workdir, stop_at=6)  # checkpoints at 3 and 6
    step6 = os.path.join(workdir, "checkpoints", "6")
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(step6) for f in fs),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with caplog.at_level("WARNING"):
        train.train(_cfg(), workdir)
    assert "checkpoint 6 in" in caplog.text and "is unreadable" in caplog.text
    assert any(n.startswith("6.unreadable-") for n in os.listdir(os.path.dirname(step6)))
    assert _losses(workdir) == straight  # steps 4..8 redone from checkpoint 3


def test_every_checkpoint_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    workdir = str(tmp_path / "run")
    train.train(_cfg("train.steps=3"), workdir)
    meta = os.path.join(workdir, "checkpoints", "3", "state", "_METADATA")
    with open(meta, "w") as f:
        f.write("{ not json")
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[3\]"):
        train.train(_cfg("train.steps=3"), workdir)


def test_restore_onto_a_different_mesh_reshards(tmp_path):
    cfg = _cfg("train.steps=2", "mesh.data=1", "mesh.fsdp=8")
    workdir = str(tmp_path / "run")
    train.train(cfg, workdir)
    saved = checkpoint.Checkpointer(workdir, every=3, keep=2)
    m8 = train.build(cfg)
    state8 = saved.restore(2, m8.abstract_state)["state"]
    # Four devices as data=2 x fsdp=2: every parameter comes back, laid out for the new mesh.
    mesh4 = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
    m4 = train.build(cfg, mesh4)
    state4 = saved.restore(2, m4.abstract_state)["state"]
    emb = state4.params["text"]["token_embed"]
    assert emb.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 1}
    assert "fsdp" in emb.sharding.spec[1]
    for a, b in zip(jax.tree.leaves(jax.device_get(state8)), jax.tree.leaves(
            jax.device_get(state4))):
        np.testing.assert_array_equal(a, b)


def test_retention_keeps_the_latest_n_plus_every_mth(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2, keep_every=6)
    for step in range(1, 14):
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, data={}, config={}, progress={})
    ckpt.close()
    assert checkpoint.Checkpointer(str(tmp_path), every=1, keep=2).all_steps() == [6, 12, 13]


def test_goodput_clock_puts_each_second_in_one_bucket(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: now[0])
    goodput = metrics_lib.Goodput(total_s=50.0, step_s=40.0)  # an earlier invocation's
    clock = metrics_lib.GoodputClock(goodput, invocation_start=90.0)
    with clock.timed("step"):
        now[0] += 1.0  # stepping
        with clock.timed("data_wait") as wait:
            now[0] += 0.25
        now[0] += 2.0
        with clock.timed("checkpoint"):
            now[0] += 3.0
            with clock.timed("eval"):  # nested twice: counted once, in the innermost
                now[0] += 0.5
    assert wait.seconds == 0.25
    assert (goodput.step_s, goodput.data_wait_s, goodput.checkpoint_s, goodput.eval_s) == (
        43.0, 0.25, 3.0, 0.5)
    assert clock.wall().total_s == 50.0 + (now[0] - 90.0)
    with pytest.raises(AttributeError, match="no bucket 'nap_s'"), clock.timed("nap"):
        pass


def test_checkpoint_records_stream_position_config_and_goodput(tmp_path):
    workdir = str(tmp_path / "run")
    train.train(_cfg("train.steps=3"), workdir)
    m = train.build(_cfg("train.steps=3"))
    items = checkpoint.Checkpointer(workdir, every=3, keep=2).restore(3, m.abstract_state)
    assert items["data"]["next_step"] == 3 and items["data"]["global_batch"] == 16
    assert items["config"]["train"]["steps"] == 3
    goodput = items["progress"]["goodput"]
    assert goodput["step_s"] > 0 and goodput["compile_s"] > 0 and goodput["total_s"] > 0
    rows = read_metrics(workdir)
    assert 0 < rows[-1]["goodput/fraction"] < 1
    assert rows[0]["setup/step_temp_mb"] > 0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 3


def test_profiler_window_writes_a_trace(tmp_path):
    workdir = str(tmp_path / "run")
    train.train(_cfg("train.steps=3", "train.profile_steps=(2, 3)"), workdir)
    traces = [f for _, _, fs in os.walk(os.path.join(workdir, "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces)
