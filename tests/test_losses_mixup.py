"""m²-mix (geodesic multimodal mixup): slerp's defining properties, the term against a numpy
reference, sharded = single device, and the mixing ratio tied to (seed, step) in training.

Tolerances: float32; the numpy reference is float64, so 1e-5 relative on O(1) losses."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, losses, sharding
from jaxclip.losses.mixup import mixing_ratio, slerp
from jaxclip.models import Encoded, l2_normalize
from tests.helpers import train_short

M2MIX_DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "m2mix_demo.py")


def _unit(rng, *shape):
    return np.asarray(l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32)))


def test_slerp_stays_on_the_sphere_and_hits_its_end_points():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 16, 8), _unit(rng, 16, 8)
    for lam in (0.0, 0.3, 0.5, 0.9, 1.0):
        np.testing.assert_allclose(jnp.linalg.norm(slerp(a, b, lam), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), a, atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 0.0), b, atol=1e-5)
    e1, e2 = np.eye(4, dtype=np.float32)[:2]
    np.testing.assert_allclose(slerp(e1, e2, 0.5), (e1 + e2) / np.sqrt(2), atol=1e-6)


def test_slerp_falls_back_where_the_two_vectors_coincide():
    a = _unit(np.random.default_rng(1), 8)
    out, grad = jax.value_and_grad(lambda v: jnp.sum(slerp(v, a, 0.3) * a))(a)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(slerp(a, a, 0.3), a, atol=1e-6)


def _reference(x, y, lam, tau):
    x, y = x.astype(np.float64), y.astype(np.float64)
    theta = np.arccos(np.clip(np.sum(x * y, -1, keepdims=True), -1, 1))
    m = (np.sin(lam * theta) * x + np.sin((1 - lam) * theta) * y) / np.sin(theta)
    pos = np.sum(x * y, -1)
    total = 0.0
    for anchor in (x, y):
        logits = anchor @ m.T
        np.fill_diagonal(logits, pos)
        logits = logits / tau
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += np.mean(lse - pos / tau)
    return total


def _cfg(**over):
    cfg = config.defaults().loss
    cfg.name, cfg.impl = "m2mix", over.pop("impl", "dense")
    cfg.m2mix.update(over)
    return cfg


def test_term_matches_a_numpy_reference():
    rng = np.random.default_rng(2)
    x, y = _unit(rng, 12, 6), _unit(rng, 12, 6)
    key = jax.random.key(3)
    cfg = _cfg(alpha=0.5, temperature=0.07)
    enc = Encoded.of_pair(jnp.asarray(x), jnp.asarray(y), jnp.float32(0.0))
    enc = Encoded(enc.emb, enc.logit_scale, key=key)
    value, metrics = losses.total_objective(cfg)(enc, axis=None)
    lam = float(mixing_ratio(key, 0.5))
    assert 0.0 < lam < 1.0 and metrics["m2mix_lambda"] == pytest.approx(lam)
    np.testing.assert_allclose(value, _reference(x, y, lam, 0.07), rtol=1e-5)


def test_the_ratio_is_a_function_of_the_key_alone():
    k0, k1 = (jax.random.fold_in(jax.random.key(0), s) for s in (0, 1))
    assert float(mixing_ratio(k0, 0.5)) == float(mixing_ratio(k0, 0.5))
    assert float(mixing_ratio(k0, 0.5)) != float(mixing_ratio(k1, 0.5))
    with pytest.raises(ValueError, match="step's key"):
        mixing_ratio(None, 0.5)


@pytest.mark.parametrize("shape", [(2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_equals_single_device_with_clip(shape):
    rng = np.random.default_rng(4)
    x, y = jnp.asarray(_unit(rng, 32, 8)), jnp.asarray(_unit(rng, 32, 8))
    key, scale = jax.random.key(5), jnp.float32(2.0)

    def value_and_grads(fn, a, t):
        def f(a, t, s):
            return fn(Encoded({"image": a, "text": t}, s, key=key))[0]
        # Jitted: op-by-op dispatch over 8 devices takes longer than the compile.
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(a, t, scale)

    cfg = config.defaults().loss
    cfg.aux = {"m2mix": 0.5}
    dense = cfg.copy_and_resolve_references()
    dense.impl = "dense"
    ref_v, ref_g = value_and_grads(losses.objective_over_mesh(dense, None), x, y)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    v, g = value_and_grads(losses.objective_over_mesh(cfg, mesh), put(x), put(y))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_training_logs_the_step_ratio_and_the_term(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    # The config as written, in a short form (its full-length numbers: docs/objectives.md).
    cfg, rows = train_short(M2MIX_DEMO, ["train.batch_size=8"], str(tmp_path / "run"),
                            logged=("loss", "loss_m2mix", "m2mix_lambda"))
    assert cfg.loss.aux.m2mix == 0.01 and cfg.loss.m2mix.alpha == 0.5
    for row in rows:  # step s used the key of (seed, s - 1)
        key = jax.random.fold_in(jax.random.key(cfg.seed), row["step"] - 1)
        assert row["m2mix_lambda"] == pytest.approx(float(mixing_ratio(key, 0.5)), rel=1e-6)
        assert np.isfinite(row["loss_m2mix"]) and row["loss_m2mix"] > 0
