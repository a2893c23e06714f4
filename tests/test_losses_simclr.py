"""SLIP's image-image term (SimCLR's NT-Xent over two views): a numpy reference, its defining
properties, sharded = single device (loss and gradients, next to CLIP), and the config errors.

Tolerances: float32 against a float64 reference, 1e-5 relative on O(1) losses."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxclip
from jaxclip import config, losses, sharding, train
from jaxclip.interop import export, hf_clip, tensorfile
from jaxclip.models import Encoded, l2_normalize
from tests.helpers import train_short

SLIP_DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "slip_demo.py")

# Compiled once per shape and temperature (eager dispatch compiles every primitive on its own).
_simclr = jax.jit(losses.simclr_loss, static_argnums=2)


def _unit(rng, *shape):
    return np.asarray(l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32)))


def _reference(a, b, tau):
    """NT-Xent as SimCLR writes it: 2B views z, row i's positive its pair, the row itself out."""
    z = np.concatenate([a, b]).astype(np.float64)
    n = len(a)
    sim = z @ z.T / tau
    np.fill_diagonal(sim, -np.inf)
    pair = np.concatenate([np.arange(n) + n, np.arange(n)])
    lse = np.log(np.exp(sim - sim.max(1, keepdims=True)).sum(1)) + sim.max(1)
    return np.mean(lse - sim[np.arange(2 * n), pair])


def test_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 12, 6), _unit(rng, 12, 6)
    for tau in (0.1, 0.5):
        np.testing.assert_allclose(_simclr(a, b, tau), _reference(a, b, tau),
                                   rtol=1e-5)


def test_defining_properties():
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 8, 5), _unit(rng, 8, 5)
    value = float(_simclr(a, b, 0.1))
    # The two views play the same role, and the images have no order.
    assert float(_simclr(b, a, 0.1)) == pytest.approx(value, rel=1e-6)
    perm = rng.permutation(8)
    assert float(_simclr(a[perm], b[perm], 0.1)) == pytest.approx(value, rel=1e-5)
    # Pairing each view with another image's view is worse than the true pairs, when the views
    # of an image agree.
    close = _unit(rng, 8, 5) * 0.2 + a
    close = np.asarray(l2_normalize(jnp.asarray(close)))
    assert _simclr(a, close, 0.1) < _simclr(a, np.roll(close, 1, axis=0), 0.1)
    # Closed form: identical views, all images orthogonal. Each row's positive scores 1/τ, its
    # 2B - 2 negatives 0: loss = log(e^{1/τ} + 2B - 2) - 1/τ.
    e = np.eye(8, dtype=np.float32)[:4]
    expect = np.log(np.exp(2.0) + 6) - 2.0
    assert float(_simclr(e, e, 0.5)) == pytest.approx(expect, rel=1e-5)


def test_the_term_logs_its_diagnostics():
    rng = np.random.default_rng(2)
    a = _unit(rng, 6, 4)
    cfg = config.defaults().loss
    cfg.name, cfg.impl = "simclr", "dense"
    enc = Encoded({"image": a, "text": a, "image_views": jnp.stack([a, a], 1)}, jnp.float32(0))
    _, metrics = losses.get("simclr").fn(enc, cfg, None)
    assert float(metrics["simclr_acc"]) == 1.0  # each view's nearest other view is its pair
    assert float(metrics["simclr_pos_cos"]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="data.views >= 2 and a view head"):
        losses.get("simclr").fn(Encoded({"image": a, "text": a}, jnp.float32(0)), cfg, None)


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
def test_sharded_equals_single_device_next_to_clip(impl):
    """CLIP + 0.5 SimCLR over a 2 x 4 data x fsdp mesh of 8 devices: the loss and the gradients
    of the image, text and view embeddings and of the scale equal the single-device ones (ring:
    the term's collectives are ordered after the ring's loops, losses/__init__.py)."""
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(_unit(rng, 32, 8)), jnp.asarray(_unit(rng, 32, 8))
    views = jnp.asarray(_unit(rng, 32, 2, 6))
    scale = jnp.float32(2.0)

    def value_and_grads(fn, *arrays):
        def f(x, y, v, s):
            return fn(Encoded({"image": x, "text": y, "image_views": v}, s))[0]
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*arrays, scale)

    cfg = config.defaults().loss
    cfg.aux = {"simclr": 0.5}
    cfg.impl = impl
    dense = cfg.copy_and_resolve_references()
    dense.impl = "dense"
    ref_v, ref_g = value_and_grads(losses.objective_over_mesh(dense, None), x, y, views)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    v, g = value_and_grads(losses.objective_over_mesh(cfg, mesh), put(x), put(y), put(views))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for got, want in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    assert np.abs(np.asarray(ref_g[2])).max() > 1e-3  # the views do receive a gradient


@pytest.mark.parametrize("overrides,message", [
    (["loss.aux.simclr=1.0"], r"loss.aux.simclr contrasts two views .* set data.views=2"),
    (["loss.aux.simclr=1.0", "data.views=2"], r"loss.aux.simclr needs a view head"),
    (["data.views=2", "model.image.view_head.out=8"], r"data.views=2 gives extra crops"),
])
def test_missing_views_or_head_are_one_line_config_errors(overrides, message):
    cfg = config.from_dict({})
    cfg.unlock()
    for item in overrides:
        config.apply_override(cfg, item)
    with pytest.raises(config.ConfigError, match=message):
        train.preflight(cfg)


def test_slip_demo_trains_and_logs_the_term(tmp_path, monkeypatch):
    """configs/slip_demo.py in short form (tiny towers, 2 steps): a finite loss, and the term's
    diagnostics in the metrics log. (Micro-batches with views: tests/test_accumulate.py.)"""
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    cfg, rows = train_short(SLIP_DEMO, ["train.batch_size=16", "model.image.view_head.hidden=32"],
                            str(tmp_path / "run"), logged=("loss", "loss_clip", "loss_simclr",
                                                           "simclr_acc", "simclr_pos_cos"))
    for row in rows:
        assert row["loss_simclr"] > 0 and 0 <= row["simclr_acc"] <= 1
        assert row["loss"] == pytest.approx(row["loss_clip"] + row["loss_simclr"], rel=1e-5)
    # The view head serves training only: an export leaves it out and loads as an encoder.
    out = str(tmp_path / "hf")
    export.export(str(tmp_path / "run"), out, "hf")
    names = tensorfile.read_header(os.path.join(out, hf_clip.WEIGHTS))[0]
    assert names and not [n for n in names if "view" in n]
    assert jaxclip.load(out).embed_texts(["a red circle"]).shape == (1, cfg.model.embed_dim)
