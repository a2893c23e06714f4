"""`jaxclip eval` on a short training run's workdir, the evaluator schedule during training, and
tools/plot_metrics.py on the same workdir."""

import fcntl
import json
import os
import shutil
import sys

import pytest

from jaxclip import cli
from jaxclip.metrics import read_metrics
from tests.helpers import load_tool

ROOT = os.path.join(os.path.dirname(__file__), "..")
RELATIONS = ["above", "below", "to the left of", "to the right of"]
CONFIG = f'''
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = dict(embed_dim=32,
                   image=dict(image_size=32, patch_size=8, width=32, depth=1, heads=2),
                   text=dict(context_length=16, width=32, depth=1, heads=2))
    c.train = dict(steps=4, batch_size=16, log_every=2, ckpt_every=2, progress=False)
    c.optim = dict(lr=1e-3, warmup_steps=1)
    c.data = dict(train=dict(dataset="shapes_small"))
    c.evals = dict(
        val=dict(type="retrieval", dataset="shapes_small", split="val", max_examples=64,
                 every_steps=2, at_start=True),
        rel=dict(type="zeroshot", dataset="shapes_small", split="val", max_examples=64,
                 label="relation", classes={RELATIONS!r}, templates=["a shape {{}} a shape"]),
    )
    return c
'''


def shared_base(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker has its own basetemp; their parent is shared by the session.
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(shared_base(tmp_path_factory) / "jaxclip-cache")


@pytest.fixture(autouse=True)
def cache(cache_root, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", cache_root)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_root):
    """A 4-step training run: checkpoints at 2 and 4, evals at 0 (val), 2 (val), 4 (both).

    xdist spreads this module's tests over workers, each of which would build the fixture; a file
    lock lets the first one train and the others reuse its run.
    """
    root = shared_base(tmp_path_factory) / "evalcli"
    root.mkdir(exist_ok=True)
    config_path, workdir = root / "tiny.py", str(root / "run")
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed attempt starts over
            config_path.write_text(CONFIG)
            with pytest.MonkeyPatch.context() as mp:  # module scope: `cache` is per test
                mp.setenv("JAXCLIP_CACHE", cache_root)
                assert cli.main(["train", "--config", str(config_path),
                                 "--workdir", workdir]) == 0
            (root / "done").write_text("trained\n")
    return str(config_path), workdir


def logged_evals(workdir, step):
    rows = [r for r in read_metrics(workdir) if r["step"] == step]
    return {k: v for r in rows for k, v in r.items()
            if k.startswith("eval/") and not k.endswith("/seconds")}


@pytest.mark.slow
def test_training_runs_evaluators_on_schedule(run):
    _, workdir = run
    steps = {}
    for row in read_metrics(workdir):
        for key in row:
            if key.startswith("eval/") and key.endswith("/seconds"):
                steps.setdefault(key.split("/")[1], []).append(row["step"])
    assert steps == {"val": [0, 2, 4], "rel": [4]}  # at_start + every 2; rel only at the end
    final = logged_evals(workdir, 4)
    assert 0 <= final["eval/rel/top1"] <= final["eval/rel/top5"] == 1.0  # 4 classes: top-5 = all
    assert 0 <= final["eval/val/i2t_r1"] <= final["eval/val/i2t_r10"] <= 1


@pytest.mark.slow
def test_eval_latest_checkpoint_reproduces_the_training_evals(run, capsys):
    _, workdir = run
    assert cli.main(["eval", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert f"evaluation of {workdir} at step 4" in out
    for line in ("rel  (", "  top1 ", "val  (", "  i2t_r1 ", "  t2i_median_rank "):
        assert line in out, line
    path = os.path.join(workdir, "eval_4.json")
    assert f"wrote {path}" in out
    with open(path) as f:
        report = json.load(f)
    assert report["step"] == 4 and set(report["evals"]) == {"val", "rel"}
    got = {k: v for k, v in report["metrics"].items() if not k.endswith("/seconds")}
    # The restored parameters are the ones the trainer evaluated at its last step.
    assert got == logged_evals(workdir, 4)


@pytest.mark.slow
def test_eval_step_only_and_overrides(run, tmp_path, capsys):
    config_path, workdir = run
    argv = ["eval", "--workdir", workdir, "--step", "2", "--only", "val",
            "--config.evals.val.ks=(1, 2)", "--out", str(tmp_path / "e.json")]
    assert cli.main(argv) == 0
    with open(tmp_path / "e.json") as f:
        metrics = json.load(f)["metrics"]
    assert {k.split("/")[1] for k in metrics} == {"val"}
    assert "eval/val/i2t_r2" in metrics and "eval/val/i2t_r5" not in metrics
    assert metrics["eval/val/i2t_r1"] == logged_evals(workdir, 2)["eval/val/i2t_r1"]
    # An explicit config file, plus an evaluator the run never had.
    extra = ("{'type': 'retrieval', 'dataset': 'shapes_small', 'split': 'novel', "
             "'max_examples': 32, 'geometry': True}")
    argv = ["eval", "--workdir", workdir, "--config", config_path, "--only", "novel",
            f"--config.evals.novel={extra}", "--out", str(tmp_path / "n.json")]
    assert cli.main(argv) == 0
    assert "modality_gap" in capsys.readouterr().out
    with open(tmp_path / "n.json") as f:
        assert json.load(f)["metrics"]["eval/novel/uniformity_image"] <= 0


@pytest.mark.slow
def test_eval_of_imported_weights_matches_the_workdir(run, tmp_path, capsys):
    """Exported to a HF CLIPModel directory and evaluated from there (model, tokenizer and
    preprocessing from the weights, evaluators from --config): the same numbers as the run."""
    config_path, workdir = run
    hf = str(tmp_path / "hf")
    assert cli.main(["export", "--workdir", workdir, "--format", "hf", "--out", hf]) == 0
    out = str(tmp_path / "imported.json")
    assert cli.main(["eval", "--workdir", hf, "--config", config_path, "--out", out]) == 0
    assert f"evaluation of {hf} at imported weights" in capsys.readouterr().out
    with open(out) as f:
        report = json.load(f)
    assert report["step"] == "imported"
    got = {k: v for k, v in report["metrics"].items() if not k.endswith("/seconds")}
    want = logged_evals(workdir, 4)
    assert got.keys() == want.keys()
    for key, value in want.items():  # same float32 parameters and programs: equal up to rounding
        assert got[key] == pytest.approx(value, abs=1e-6), key
    capsys.readouterr()
    _fails(capsys, ["eval", "--workdir", hf, "--config", config_path, "--step", "2"],
           "--step applies to training workdirs")
    _fails(capsys, ["eval", "--workdir", hf], "no evaluators")  # the weights' config has none


def _fails(capsys, argv, pattern):
    """A usage error: exit status 2 and one line on stderr matching `pattern`, no traceback."""
    import re

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_eval_errors_are_clear(run, tmp_path, capsys):
    config_path, workdir = run
    cases = [
        (["--workdir", workdir, "--only", "nope"], r"no evaluator named \['nope'\]"),
        (["--workdir", workdir, "--step", "3"], r"no checkpoint at step 3; available: \[2, 4\]"),
        (["--workdir", str(tmp_path)], r"no finished checkpoint under checkpoints/"),
        (["--workdir", str(tmp_path), "--config", config_path], r"no finished checkpoint"),
        (["--workdir", workdir, "--config.evals.val.postproc=qb"], r"postproc must be one of"),
        (["--workdir", workdir, "--config.evals={}"], r"no evaluators"),
    ]
    for argv, message in cases:
        _fails(capsys, ["eval", *argv], message)
    assert not os.path.exists(tmp_path / "checkpoints")  # evaluation creates nothing


@pytest.mark.slow
def test_plot_tool_writes_pngs(run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is a tool-only dependency")
    _, workdir = run
    tool = load_tool("plot_metrics")
    assert tool.main([workdir, "--out", str(tmp_path)]) == 0
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(["loss.png", "lr.png", "logit_scale.png", "throughput.png",
                            "grad_norm.png", "eval_val.png", "eval_rel.png"])
    for name in files:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_plot_tool_reads_resumed_and_non_finite_rows(tmp_path):
    tool = load_tool("plot_metrics")
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": "nan", "lr": 0.1},
             {"step": 2, "loss": 1.5}, {"step": 2, "eval/v/top1": 0.5, "eval/v/seconds": 3.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 3, \"lo")
    series = tool.read_series(str(path))
    assert series["loss"] == [(1, 2.0), (2, 1.5)]  # a re-logged step: the last value wins
    assert series["eval/v/top1"] == [(2, 0.5)] and series["lr"] == [(2, 0.1)]


def test_plot_tool_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert load_tool("plot_metrics").main([str(tmp_path)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert load_tool("plot_metrics").main([str(tmp_path / "missing")]) == 2
