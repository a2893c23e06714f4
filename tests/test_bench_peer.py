"""tools/bench_peer.py runs both libraries' training steps and reports what it claims to.

Numbers are not asserted (timings are not tests); shapes are tiny so the run stays fast.
"""

import json

from tests import torch_shim
from tests.helpers import load_tool

torch_shim.require("open_clip")

TINY = ["--config.model.embed_dim=16", "--config.model.image.image_size=16",
        "--config.model.image.patch_size=8", "--config.model.image.width=32",
        "--config.model.image.depth=1", "--config.model.image.heads=2",
        "--config.model.text.context_length=8", "--config.model.text.vocab_size=500",
        "--config.model.text.eot_id=499", "--config.model.text.width=32",
        "--config.model.text.depth=1", "--config.model.text.heads=2"]


def test_bench_peer_times_both_libraries(capsys):
    result = load_tool("bench_peer").main(
        ["--batch", "8", "--rounds", "2", "--steps", "2", "--warmup", "1", *TINY])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert len(result["jaxclip_rounds"]) == len(result["open_clip_rounds"]) == 2
    assert result["jaxclip_samples_per_sec"] > 0 and result["open_clip_samples_per_sec"] > 0
    assert result["ratio"] == (result["jaxclip_samples_per_sec"]
                               / result["open_clip_samples_per_sec"])
    # the same model on both sides: parameter counts agree exactly
    assert result["params_jaxclip"] == result["params_open_clip"]
    assert result["final_loss_jaxclip"] > 0 and result["final_loss_open_clip"] > 0
    for key in ("cpu", "jax", "torch", "open_clip", "batch_size", "flops_per_sample"):
        assert result[key]
