"""The benchmark tools run: they are how speed is measured, so they must not rot between runs.

Numbers are not asserted (timings are not tests); what is asserted is that a tool runs the real
computation on a sharded mesh and reports what it claims to, and that bad input is a clear error.
"""

import json
import os

import pytest

from tests.helpers import load_tool

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEMO = os.path.join(ROOT, "configs", "demo.py")
TINY = ["--config.model.image.depth=1", "--config.model.text.depth=1",
        "--config.train.batch_size=16"]


def test_bench_train_times_the_sharded_train_step(tmp_path, capsys):
    import jax

    from jaxclip import config, flops

    out = str(tmp_path / "bench.json")
    result = load_tool("bench_train").main(
        ["--config", DEMO, "--steps", "2", "--warmup", "1", "--json", out, *TINY])
    assert result["devices"] == jax.device_count() == 8  # the demo mesh spans all devices
    assert result["samples_per_sec"] > 0 and result["mfu"] > 0
    assert result["final_loss"] > 0
    cfg = config.load(DEMO, [a.removeprefix("--config.") for a in TINY])
    assert result["flops_per_sample"] == flops.train_flops_per_sample(cfg, 16)
    assert result["temp_mib"] > 0 and result["argument_mib"] > 0
    with open(out) as f:
        assert json.load(f)["samples_per_sec"] == result["samples_per_sec"]
    printed = capsys.readouterr().out
    assert "batch 16 on 8 x" in printed and "samples/s" in printed and "MFU" in printed


def test_bench_train_errors_name_the_problem():
    tool = load_tool("bench_train")
    with pytest.raises(SystemExit, match="bad config.*no_such_key"):
        tool.main(["--config", DEMO, "--config.train.no_such_key=1"])
    with pytest.raises(SystemExit, match="does not divide"):
        tool.main(["--config", DEMO, "--config.train.batch_size=12"])
    with pytest.raises(SystemExit, match="before jax is imported"):
        tool.main(["--config", DEMO, "--devices", "4"])


def test_bench_checkpoint_fingerprints_saves_and_restores_a_real_state(tmp_path, capsys):
    result = load_tool("bench_checkpoint").main(
        ["--config", DEMO, "--repeats", "1", "--dir", str(tmp_path), *TINY])
    assert result["arrays"] > 100 and result["state_mb"] > 1  # params + AdamW moments
    assert 0 < result["finite_check_s"] <= result["save_block_s"] <= result["save_total_s"]
    assert result["fingerprint_s"] > 0
    assert result["restore_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["orbax_only_save_block_s"] > 0
    steps = sorted(os.listdir(os.path.join(tmp_path, "checkpoints")))
    assert steps == ["4", "5"]  # jaxclip saves 1-2, Orbax-only 3-4, the restored one 5
