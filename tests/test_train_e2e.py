"""End to end: `jaxclip train` on the built-in shapes data, exact resume, NaN stop."""

import json
import os

import numpy as np
import pytest

from jaxclip import cli, config, train
from jaxclip.data import builtin
from jaxclip.metrics import read_metrics

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
SMALL = [
    "train.steps=6", "train.batch_size=16", "train.log_every=1", "train.ckpt_every=3",
    "train.progress=false", "model.image.depth=1", "model.text.depth=1",
    "data.train.dataset=shapes_small",
    "evals.val.dataset=shapes_small", "evals.val.every_steps=3",
    "evals.novel.dataset=shapes_small", "evals.novel.every_steps=0",
    "evals.relation.dataset=shapes_small", "evals.relation.every_steps=0",
]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.slow
def test_cli_train_smoke(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    argv = ["train", "--config", DEMO, "--workdir", workdir] + [f"--config.{o}" for o in SMALL]
    assert cli.main(argv) == 0
    rows = read_metrics(workdir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "logit_scale", "samples_per_sec", "grad_norm", "mfu"):
        assert all(np.isfinite(r[key]) for r in steps), key
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    for name in ("val", "novel"):
        for metric in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
            assert 0.0 <= evals[f"eval/{name}/{metric}"] <= 1.0
    assert 0.0 <= evals["eval/relation/top1"] <= evals["eval/relation/top2"] <= 1.0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["steps"] == 6
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert "final evaluation" in capsys.readouterr().out


def _cfg():
    return config.load(DEMO, [*SMALL, "evals={}"])


@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    straight = str(tmp_path / "straight")
    train.train(_cfg(), straight)
    resumed = str(tmp_path / "resumed")
    train.train(_cfg(), resumed, stop_at=4)  # checkpoint at 3 (periodic) and 4 (stop)
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [1, 2, 3, 4]
    train.train(_cfg(), resumed)  # continues at step 5 from the step-4 checkpoint
    a = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert a == b  # bit for bit on CPU: same data stream, same parameters, same program


@pytest.mark.slow
def test_resume_with_a_different_batch_size_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    train.train(_cfg(), workdir, stop_at=3)
    cfg = _cfg()
    cfg.train.batch_size = 32
    with pytest.raises(ValueError, match="global_batch was 16 .* is 32 now"):
        train.train(cfg, workdir)


@pytest.mark.slow
def test_resume_follows_the_data_to_a_new_path_but_refuses_other_data(tmp_path, monkeypatch):
    import shutil

    workdir = str(tmp_path / "run")
    train.train(_cfg(), workdir, stop_at=3)
    built = builtin.dataset_dir("shapes_small")
    moved = tmp_path / "moved_cache"  # the same dataset, mounted elsewhere after a restart
    shutil.copytree(built, moved / "datasets" / os.path.basename(built))
    monkeypatch.setenv("JAXCLIP_CACHE", str(moved))
    other = _cfg()
    other.data.train.split = "val"  # different records: the stream would silently change
    with pytest.raises(ValueError, match=r"source_ids was .*\(sources were"):
        train.train(other, workdir)
    train.train(_cfg(), workdir)
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = _cfg()
    cfg.model.logit_scale_init = 1e4  # exp overflows: the first loss is not finite
    cfg.loss.scale_max = None
    with pytest.raises(train.NonFiniteLossError, match="at step 1"):
        train.train(cfg, str(tmp_path / "nan"))
    assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "1")


def _record_consumed(monkeypatch):
    """Fingerprints of the batches the trainer's loop takes, in the order it takes them."""
    import hashlib
    import threading

    import jax

    from jaxclip.data import prefetch

    taken = []

    class Recording(prefetch.DeviceBatches):
        def __next__(self):
            batch, skipped = super().__next__()
            digest = hashlib.sha256()
            for key in sorted(batch):
                digest.update(np.asarray(jax.device_get(batch[key])).tobytes())
            taken.append(digest.hexdigest()[:16])
            return batch, skipped

    monkeypatch.setattr(prefetch, "DeviceBatches", Recording)
    return taken, lambda: [t for t in threading.enumerate()
                           if t.name == "jaxclip-prefetch" and t.is_alive()]


@pytest.mark.slow
def test_prefetch_to_device_consumes_the_same_batches_across_a_resume(tmp_path, monkeypatch):
    """Depth 3 with a stop at step 4 takes exactly the batches, and gets exactly the losses, of a
    synchronous uninterrupted run: a skipped or repeated batch (a read-ahead batch lost or
    replayed at the resume) changes the fingerprint list and the losses after it."""
    taken, threads = _record_consumed(monkeypatch)
    sync = _cfg()
    sync.data.prefetch_to_device = 0
    train.train(sync, str(tmp_path / "sync"))
    straight = list(taken)
    taken.clear()
    ahead = _cfg()
    ahead.data.prefetch_to_device = 3
    train.train(ahead, str(tmp_path / "ahead"), stop_at=4)
    assert not threads()  # the stop left no producer behind (it had read ahead past step 4)
    train.train(ahead, str(tmp_path / "ahead"))
    assert len(straight) == 6 and len(set(straight)) == 6
    assert taken == straight
    assert _losses(tmp_path / "sync") == _losses(tmp_path / "ahead")
    assert not threads()


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


@pytest.mark.slow
def test_an_input_error_stops_training_at_its_step_and_leaves_no_thread(tmp_path, monkeypatch):
    from jaxclip.data import stream

    _, threads = _record_consumed(monkeypatch)
    real = stream.train_stream

    def failing(cfg, start_step, tokenizer):  # the batch of step 5 cannot be read
        for step, batch in enumerate(real(cfg, start_step, tokenizer), start_step + 1):
            if step == 5:
                raise OSError("shard vanished")
            yield batch

    monkeypatch.setattr(stream, "train_stream", failing)
    cfg = _cfg()
    cfg.data.prefetch_to_device = 2
    with pytest.raises(OSError, match="shard vanished") as err:
        train.train(cfg, str(tmp_path / "run"))
    assert "preparing the batch of step 5" in "".join(err.value.__notes__)
    assert [r["step"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
    assert not threads()
