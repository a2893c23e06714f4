"""Fault tests: the everyday mistakes and accidents that must not lose or corrupt a run's work.

Each test reproduces one failure of an earlier jaxclip (changed config on resume, two trainers in
one workdir, a failed start rewriting config.json, a non-finite state checkpointed, bit rot in a
checkpoint, a damaged newest checkpoint for eval/export, tracebacks for config errors) and checks
the guarantee in docs/reliability.md that replaces it.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclip import checkpoint, config, runlock, runtime, train
from jaxclip.interop import export
from jaxclip.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
TINY = [
    "train.steps=4", "train.batch_size=16", "train.log_every=1", "train.ckpt_every=2",
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


def _listing(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints 2 and 4): its losses and a pristine copy."""
    os.environ["JAXCLIP_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train(_cfg(), workdir)
    return workdir, _losses(workdir)


def _copy(trained, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(trained[0], dst)
    return dst


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "JAXCLIP_DEBUG"}
    return subprocess.run([sys.executable, "-m", "jaxclip.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def test_a_changed_config_is_an_error_that_keeps_every_checkpoint(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = _listing(workdir)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        train.train(_cfg("train.steps=6", "model.image.width=64", "model.image.heads=2"),
                    workdir)
    message = str(err.value)
    assert "checkpoint 4" in message and "params/image" in message
    assert "model.image.width=128 (checkpoint) vs 64" in message
    assert "--config.init.path=" in message  # the explicit way to start from these weights
    # Only the optimizer's tree changes without gradient clipping.
    with pytest.raises(checkpoint.CheckpointMismatchError, match="opt_state"):
        train.train(_cfg("train.steps=6", "optim.grad_clip=0"), workdir)
    assert _listing(workdir) == before  # nothing renamed, nothing deleted
    train.train(_cfg("train.steps=6"), workdir)  # the original config resumes at step 4
    assert min(s for s in _losses(workdir) if s > 4) == 5
    assert _losses(workdir)[4] == trained[1][4]


def test_cli_config_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    workdir = str(tmp_path / "never")
    for override, needle in [("--config.loss.impl=bogus", "loss"),
                             ("--config.train.batch_size=15", "train.batch_size=15"),
                             ("--config.data.train.dataset=" + str(tmp_path / "nothing"),
                              "nothing")]:
        out = _cli("train", "--config", DEMO, "--workdir", workdir,
                   *[f"--config.{o}" for o in TINY], override)
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("jaxclip")]
        assert len(lines) == 1 and needle in lines[0], out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert not os.path.exists(workdir)  # checked before anything is created
    none_cfg = tmp_path / "none.py"
    none_cfg.write_text("def get_config():\n    pass\n")
    out = _cli("train", "--config", str(none_cfg), "--workdir", workdir)
    assert out.returncode == 2 and "returned NoneType" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_second_trainer_is_refused_and_the_first_finishes_unharmed(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "jaxclip.cli", "train", "--config", DEMO, "--workdir", workdir,
           *[f"--config.{o}" for o in TINY], "--config.train.steps=12"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            assert first.poll() is None and time.time() < deadline, "first trainer never started"
            time.sleep(0.1)
        t0 = time.perf_counter()
        with pytest.raises(runlock.WorkdirLockedError, match=f"pid {first.pid}"):
            train.train(_cfg("train.steps=12", "optim.lr=0.01"), workdir)
        assert time.perf_counter() - t0 < 30  # refused at once, not after a hang
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, out[-3000:]
    steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
    assert steps == list(range(1, 13))  # every step logged once, by the first run alone
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["lr"] == 1e-3


def test_a_dead_holder_never_leaves_a_stale_lock(tmp_path):
    code = ("import sys, time; from jaxclip.runlock import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.WorkdirLockedError, match=f"pid {holder.pid}"):
            runlock.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()  # SIGKILL: no handler runs; the kernel drops the flock
        holder.wait(timeout=30)
    runlock.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_failed_start_leaves_config_json_and_exports_unchanged(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = f.read()
    out = _cli("train", "--config", DEMO, "--workdir", workdir, *[f"--config.{o}" for o in TINY],
               "--config.model.image.act=quick_gelu", "--config.train.batch_size=15")
    assert out.returncode == 2, out.stderr[-2000:]
    with open(path) as f:
        assert f.read() == saved
    # Even an edited config.json does not relabel the weights: readers use the checkpoint's.
    edited = json.loads(saved)
    edited["model"]["image"]["act"] = "quick_gelu"
    with open(path, "w") as f:
        json.dump(edited, f)
    assert checkpoint.load_config(workdir).model.image.act == "gelu"
    with pytest.raises(ValueError, match="inside the training workdir"):
        export.export(workdir, workdir, "hf")
    with pytest.raises(ValueError, match="inside the training workdir"):
        export.export(workdir, os.path.join(workdir, "hf"), "hf")
    assert _listing(workdir) == ["2", "4"] and not os.path.exists(os.path.join(workdir, "hf"))


def test_non_finite_parameters_are_never_checkpointed(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    # An infinite learning rate: step 5's loss is still finite (computed before the update),
    # but the parameters it writes are not.
    with pytest.raises(checkpoint.NonFiniteStateError, match="at step 5"):
        train.train(_cfg("train.steps=6", "train.ckpt_every=1", "optim.lr=1e39",
                         "optim.warmup_steps=0"), workdir)
    assert _listing(workdir) == ["2", "4"]  # the newest is the last finite one
    train.train(_cfg("train.steps=6"), workdir)  # the advice (a sane lr) resumes from it
    assert np.isfinite(_losses(workdir)[6])


def _data_files(step_dir):
    return sorted((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
                   for f in fs if len(f) == 32 and os.sep + "d" in r), key=os.path.getsize)


def _plain_orbax_restore(workdir, step, abstract):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    finally:
        manager.close()


def test_flipped_bytes_are_detected_and_the_previous_checkpoint_is_used(trained, tmp_path,
                                                                         caplog):
    m = train.build(_cfg())
    clean = jax.device_get(_plain_orbax_restore(trained[0], 4, m.abstract_state).params)
    # Find a flip that Orbax itself restores without complaint (zstd frames carry no checksum):
    # that is the silent corruption the fingerprints exist for.
    for attempt in range(8):
        workdir = _copy(trained, tmp_path, f"run{attempt}")
        big = _data_files(os.path.join(workdir, "checkpoints", "4"))[-1]
        with open(big, "r+b") as f:
            f.seek(os.path.getsize(big) // 2 + 97 * attempt)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
        try:
            flipped = jax.device_get(_plain_orbax_restore(workdir, 4, m.abstract_state).params)
        except Exception:
            continue
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in
               zip(jax.tree.leaves(flipped), jax.tree.leaves(clean))):
            break
    else:
        pytest.fail("no silent single-byte corruption found in 8 tries")
    # eval/export readers skip it without moving anything...
    with caplog.at_level("WARNING"):
        _, _, step = runtime.restore(workdir)
    assert step == 2 and "fingerprint" in caplog.text
    assert "4" in _listing(workdir)
    # ...the trainer sets it aside and resumes from step 2, reproducing the losses.
    train.train(_cfg(), workdir)
    assert any(n.startswith("4.unreadable-") for n in _listing(workdir))
    assert _losses(workdir)[4] == trained[1][4]


def test_eval_and_export_fall_back_past_a_truncated_newest_checkpoint(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    biggest = _data_files(os.path.join(workdir, "checkpoints", "4"))[-1]
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    cfg, params, step = runtime.restore(workdir)
    assert step == 2 and cfg.model.image.width == 128 and "logit_scale" in params
    assert _listing(workdir) == ["2", "4"]  # readers never move a run's files
    with pytest.raises(checkpoint.CheckpointDamagedError, match="checkpoint 4"):
        runtime.restore(workdir, step=4)  # an explicit step is not silently replaced


def test_fingerprints_do_not_depend_on_the_mesh_and_catch_one_flipped_bit():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxclip import integrity, sharding

    values = np.random.RandomState(0).randn(16, 24).astype(np.float32)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    layouts = [jax.device_put(values, NamedSharding(mesh, spec))
               for spec in (P(), P("fsdp"), P(None, ("data", "fsdp")), P("data", "fsdp"))]
    digests = {integrity.summarize({"w": x})["w"]["digest"] for x in layouts}
    assert len(digests) == 1  # the same values on any layout
    for flat_index in (0, 7, 383):  # one bit of one element, anywhere: a different digest
        flipped = values.copy()
        flipped.reshape(-1).view(np.uint32)[flat_index] ^= np.uint32(1 << 3)
        assert integrity.summarize({"w": flipped})["w"]["digest"] not in digests
    swapped = values[::-1].copy()  # the same words in other places: detected too
    assert integrity.summarize({"w": swapped})["w"]["digest"] not in digests
    bad = values.copy()
    bad[3, 4] = np.inf
    assert integrity.finite({"w": bad, "ok": values, "n": np.int32(1)}) == {
        "w": False, "ok": True, "n": True}


_STALLED_RUN = '''
import sys, time
from jaxclip import config, train
from jaxclip.data import stream

real = stream.train_stream

def stalling(cfg, start_step, tokenizer):  # step 5's input never arrives (a hung reader)
    for step, batch in enumerate(real(cfg, start_step, tokenizer), start_step + 1):
        if step == 5:
            time.sleep(600)
        yield batch

stream.train_stream = stalling
train.train(config.load(sys.argv[1], sys.argv[3:]), sys.argv[2])
'''


def test_a_stalled_step_makes_the_watchdog_exit_naming_the_step(tmp_path):
    from jaxclip.watchdog import EXIT_HUNG

    script = tmp_path / "stalled.py"
    script.write_text(_STALLED_RUN)
    workdir = str(tmp_path / "run")
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), DEMO, workdir, *TINY, "train.steps=8",
         "train.watchdog_floor_s=3", "train.watchdog_first_floor_s=120"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == EXIT_HUNG, out.stderr[-3000:]
    assert "watchdog: step at step 5 has run" in out.stderr
    assert "in stalling" in out.stderr  # every thread's stack, the stuck one included
    assert time.perf_counter() - t0 < 200
    assert _listing(workdir) == ["2", "4"]  # what was saved before the hang is intact
