"""A new tower kind and a new loss with its own setting, each registered from this file alone
(no edit of jaxclip), are chosen by config lines and train two steps: the recipes of
docs/architecture.md, exercised."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclip import config, losses, train
from jaxclip.losses.core import gather, mean_over, shard_index
from jaxclip.metrics import read_metrics
from jaxclip.models import TwoTower, layers, towers

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")


@towers.register("bag_of_words", modality="text", config=dict(gain=1.0),
                 embeddings=("token_embed",))
class BagOfWords(nnx.Module):
    """A text tower that averages its tokens' embeddings (no transformer), times `gain`."""

    def __init__(self, cfg, embed_dim: int):
        self.token_embed = layers.param(layers.normal(0.02), (cfg.vocab_size, embed_dim),
                                        ("vocab", "joint"))
        self.gain = cfg.bag_of_words.gain
        self.pad_id = cfg.pad_id

    def __call__(self, tokens, *, dtype=jnp.float32, return_tokens=False, **run):
        mask = tokens != self.pad_id
        per_token = self.token_embed[...][tokens].astype(dtype)
        weights = mask[..., None].astype(dtype)
        emb = self.gain * (per_token * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
        return emb, per_token if return_tokens else None, mask


@losses.register("hinge", config=dict(margin=0.2))
def hinge(enc, cfg, axis):
    """Mean hinge on every negative text of the global batch: max(0, margin - s_pos + s_neg)."""
    img, txt = enc.x, gather(enc.y, axis)
    b = img.shape[0]
    sims = img @ txt.T  # (b, B)
    labels = jnp.arange(b) + b * shard_index(axis)
    pos = jnp.take_along_axis(sims, labels[:, None], axis=1)
    is_neg = jnp.arange(sims.shape[1])[None, :] != labels[:, None]
    hinge = jnp.where(is_neg, jax.nn.relu(cfg.hinge.margin - pos + sims), 0.0)
    return mean_over(hinge.sum() / is_neg.sum(), axis), {}


LINES = ["model.text.kind=bag_of_words", "model.text.bag_of_words.gain=2.0", "loss.name=hinge",
         "loss.hinge.margin=0.3"]


def test_registered_settings_are_config_keys_with_defaults_and_checks():
    cfg = config.load(DEMO, LINES)
    assert cfg.loss.hinge.margin == 0.3 and config.defaults().loss.hinge.margin == 0.2
    assert cfg.model.text.bag_of_words.gain == 2.0
    with pytest.raises(config.ConfigError, match="did you mean 'loss.hinge.margin'"):
        config.load(DEMO, [*LINES, "loss.hinge.margn=1"])
    with pytest.raises(config.ConfigError, match="expects float"):
        config.load(DEMO, [*LINES, "model.text.bag_of_words.gain='x'"])
    model = TwoTower(cfg.model, rngs=nnx.Rngs(params=0))
    assert isinstance(model.text, BagOfWords) and model.text.gain == 2.0
    assert float(jnp.abs(model.text.token_embed[...]).sum()) > 0  # drawn, not left at zero
    assert towers.embeddings_pattern().match("text/token_embed")  # layer 0 for lr decay


def test_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, 6, 4)))
    cfg = config.defaults().loss
    cfg.name = "hinge"
    enc = losses.Encoded.of_pair(jnp.asarray(x), jnp.asarray(y), jnp.float32(0.0))
    got = losses.total_objective(cfg)(enc, axis=None)[0]
    s = x @ y.T
    want = np.maximum(0.2 - np.diag(s)[:, None] + s, 0)[~np.eye(6, dtype=bool)].mean()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_toy_tower_and_loss_train_two_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    cfg = config.load(DEMO, [*LINES, "train.steps=2", "train.batch_size=8", "train.log_every=1",
                             "train.progress=false", "model.image.depth=1", "evals={}",
                             "data.train.dataset=shapes_small"])
    train.train(cfg, str(tmp_path / "run"))
    logged = [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logged) == 2 and all(np.isfinite(logged)) and logged[0] != logged[1]
