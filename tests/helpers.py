"""Small configs and inputs shared by the tests."""

import importlib.util
import os

import jax
import numpy as np
from flax import nnx

from jaxclip import config


def load_tool(name: str):
    """tools/NAME.py as a module (the tools are scripts, not part of the package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides):
    """A two-tower model small enough to compile and run in well under a second."""
    cfg = config.defaults()
    cfg.model.embed_dim = 32
    cfg.model.image.update(image_size=16, patch_size=4, width=32, depth=2, heads=4)
    cfg.model.text.update(vocab_size=100, context_length=12, width=32, depth=2, heads=4,
                          eot_id=99, pad_id=0)
    cfg.train.update(batch_size=16, steps=10, log_every=5, progress=False)
    for key, value in overrides.items():
        config.apply_override(cfg, f"{key}={value}")
    return cfg


def random_tokens(rng, batch, length, eot=99, vocab=100):
    """Token rows SOT-like first token, random body, EOT, then zero padding."""
    toks = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = rng.integers(2, length)
        toks[i, :n - 1] = rng.integers(1, vocab - 1, n - 1)
        toks[i, n - 1] = eot
    return toks


def random_batch(rng, cfg, batch=None):
    b = batch or cfg.train.batch_size
    s = cfg.model.image.image_size
    views = (cfg.data.views,) if cfg.data.views > 1 else ()
    return {"image": rng.integers(0, 256, (b, *views, s, s, 3), dtype=np.uint8),
            "text": random_tokens(rng, b, cfg.model.text.context_length,
                                  cfg.model.text.eot_id, cfg.model.text.vocab_size)}


def jitted(model, method="__call__", **kwargs):
    """model.method(*args, **kwargs) as one compiled function (eager NNX calls compile every
    primitive separately, which is slow on CPU)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, *args):
        return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)

    return lambda *args: run(params, *args)


def run_steps(step, state, batch, n: int = 2):
    """(losses of n steps on one batch, final parameters on the host)."""
    losses = []
    for _ in range(n):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


# A config of configs/ trained in CI: its own objective, data and pipeline, with one block per
# tower, two steps on the small shapes set, every step logged and no evaluator.
SHORT_RUN = ["train.steps=2", "train.log_every=1", "train.progress=false", "model.image.depth=1",
             "model.text.depth=1", "evals={}", "data.train.dataset=shapes_small"]


def train_short(config_path: str, overrides, workdir: str, logged=("loss",)):
    """Trains `config_path` (a configs/ file, `path:arg` allowed) in the SHORT_RUN form plus
    `overrides`; returns (config, the logged training rows), each row checked to hold finite
    values of every key in `logged`."""
    from jaxclip import train
    from jaxclip.metrics import read_metrics

    cfg = config.load(config_path, [*SHORT_RUN, *overrides])
    train.train(cfg, workdir)
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.train.steps + 1))
    for row in rows:
        for key in logged:
            assert np.isfinite(row[key]), (key, row)
    return cfg, rows
