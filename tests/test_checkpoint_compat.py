"""A workdir written by an older jaxclip (tests/fixtures/layout_v1, made at commit c866023 before
the tower registry and per-loss config sections) still restores: same parameter paths, shapes and
values, its stored config still loads, and training resumes from it to the loss an uninterrupted
run reached. Regenerating the fixture with new code would defeat the test (see its script)."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxclip import checkpoint, config, runtime, train
from jaxclip.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "layout_v1")
DEMO = os.path.join(HERE, "..", "configs", "demo.py")


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(HERE, "fixtures", "layout_v1.json")) as f:
        return json.load(f)


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, (*prefix, k))
        else:
            yield "/".join((*prefix, k)), v


def test_old_parameters_restore_with_the_same_paths_and_values(expected):
    cfg, params, step = runtime.restore(FIXTURE)
    assert step == expected["step"]
    got = dict(_flat(params))
    assert sorted(got) == sorted(expected["params"])
    for path, want in expected["params"].items():
        a = np.asarray(got[path])
        assert list(a.shape) == want["shape"], path
        assert a.reshape(-1)[0] == pytest.approx(want["first"], rel=1e-6, abs=1e-7), path
        assert a.astype(np.float64).sum() == pytest.approx(want["sum"], rel=1e-6, abs=1e-6), path
    # The old flat loss keys keep their meaning in the stored config.
    assert cfg.loss.name == "siglip"
    assert cfg.model.image.head == "linear"


def test_the_old_config_still_loads_and_training_resumes_exactly(expected, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE, workdir)
    stored = checkpoint.load_config(workdir)
    assert stored.loss.name == "siglip"
    cfg = config.load(DEMO, [*expected["overrides"], "train.steps=3"])
    train.train(cfg, workdir)
    losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
    # Resume is bit-identical in this codebase; 1e-6 leaves room for a changed XLA fusion only.
    assert losses[3] == pytest.approx(expected["losses"]["3"], rel=1e-6)
    assert checkpoint.checkpoint_steps(workdir)[-1] == 3
