"""Objectives: the spec's known values, and sharded (all_gather, ring) = single-device dense.

Tolerances: float32 throughout. Sharded and dense differ only in summation order, so losses agree
to a few ulps of their magnitude (rtol 1e-6) and gradients to atol 1e-6 (their entries are
O(1e-2); tiled forms, which also reorder the log-sum-exp, get 1e-5).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, losses, sharding
from jaxclip.losses import geometry
from jaxclip.models import Encoded, l2_normalize

B = 4


def test_clip_uniform_logits_is_log_batch():
    x = jnp.ones((B, 8)) / math.sqrt(8)
    assert float(losses.clip_loss(x, x, 0.0)) == pytest.approx(math.log(B), abs=1e-6)


def test_clip_orthonormal_pairs_at_scale_100_is_tiny():
    e = jnp.eye(B, 8)
    assert float(losses.clip_loss(e, e, math.log(100))) < 1e-30


def test_clip_is_symmetric_in_the_towers():
    rng = np.random.default_rng(0)
    x, y = (l2_normalize(jnp.asarray(rng.normal(size=(6, 5)))) for _ in range(2))
    np.testing.assert_allclose(losses.clip_loss(x, y, 2.0), losses.clip_loss(y, x, 2.0),
                               rtol=1e-6)


def test_siglip_values_at_init():
    e = jnp.eye(8)[:B]
    orthogonal = jnp.eye(8)[B:2 * B]  # all similarities 0
    assert float(losses.siglip_loss(e, orthogonal, math.log(10), -10.0)) == \
        pytest.approx(10.000182, abs=2e-6)
    assert float(losses.siglip_loss(e, e, math.log(10), -10.0)) == \
        pytest.approx(0.693283, abs=2e-6)


def test_align_smoothing_minimum_and_options():
    e = jnp.eye(B, 8)
    c_star = math.log(1 + B * 0.9 / 0.1)  # 3.6109: the finite minimiser under smoothing
    at_min = losses.clip_loss(e, e, 1 / c_star, label_smoothing=0.1, scale_param="temperature")
    assert float(at_min) == pytest.approx(0.34878, abs=1e-5)
    for c in (c_star - 0.5, c_star + 0.5):  # it is a minimum
        other = losses.clip_loss(e, e, 1 / c, label_smoothing=0.1, scale_param="temperature")
        assert float(other) > float(at_min)
    rng = np.random.default_rng(1)
    x, y = (l2_normalize(jnp.asarray(rng.normal(size=(5, 6)))) for _ in range(2))
    plain = losses.clip_loss(x, y, 2.0)
    np.testing.assert_array_equal(losses.clip_loss(x, y, 2.0, label_smoothing=0.0), plain)
    np.testing.assert_array_equal(losses.clip_loss(x, y, 2.0, direction_reduce="sum"),
                                  2 * plain)
    uniform = jnp.ones((B, 8)) / math.sqrt(8)
    assert float(losses.clip_loss(uniform, uniform, 1.0, label_smoothing=0.1,
                                  scale_param="temperature")) == pytest.approx(math.log(B), 1e-6)


def test_geometry_terms():
    cfg = config.defaults().loss
    x = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]])
    enc = Encoded.of_pair(x, x, jnp.float32(0.0))
    assert float(losses.get("uniformity").fn(enc, cfg, None)[0]) == pytest.approx(-8.0, 1e-6)
    assert float(losses.get("align").fn(enc, cfg, None)[0]) == 0.0
    collapsed = Encoded.of_pair(jnp.ones((3, 2)) / math.sqrt(2), jnp.ones((3, 2)) / math.sqrt(2),
                        jnp.float32(0))
    assert float(losses.get("uniformity").fn(collapsed, cfg, None)[0]) == pytest.approx(0, abs=1e-6)


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown objective 'nope'"):
        losses.get("nope")
    cfg = config.defaults().loss
    cfg.name, cfg.impl = "align", "bogus"
    with pytest.raises(ValueError, match="has no 'bogus' implementation"):
        losses.total_objective(cfg)


def _random_embeddings(n=32, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (l2_normalize(jnp.asarray(rng.normal(size=(n, d)), jnp.float32)),
            l2_normalize(jnp.asarray(rng.normal(size=(n, d)), jnp.float32)))


def _value_and_grads(fn, img, txt, scale, bias):
    def f(a, b, s, c):
        return fn(Encoded.of_pair(a, b, s, c))[0]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(img, txt, scale, bias)


MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_loss_and_grads_equal_single_device(name, impl, shape):
    img, txt = _random_embeddings()
    scale, bias = jnp.float32(2.3), jnp.float32(-3.0)
    cfg = config.defaults().loss
    cfg.name, cfg.clip.label_smoothing = name, 0.1 if name == "clip" else 0.0
    cfg.aux = {"uniformity": 0.5} if name == "clip" else {}
    dense_cfg = cfg.copy_and_resolve_references()
    dense_cfg.impl = "dense"
    ref_v, ref_g = _value_and_grads(losses.objective_over_mesh(dense_cfg, None), img, txt,
                                    scale, bias)
    cfg.impl = impl
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    v, g = _value_and_grads(losses.objective_over_mesh(cfg, mesh), put(img), put(txt), scale, bias)
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for name_, a, b in zip(("image", "text", "scale", "bias"), g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name_)
    # The scale gradient carries no hidden factor of the device count (open_clip #616).
    assert abs(float(g[2])) > 1e-3


def _loss_temp_bytes(impl: str, n_devices: int, b: int = 256, d: int = 64) -> int:
    cfg = config.defaults().loss
    cfg.impl = impl
    mesh = sharding.make_mesh(dict(data=n_devices, fsdp=1, tensor=1),
                              devices=jax.devices()[:n_devices])
    fn = losses.objective_over_mesh(cfg, mesh)
    spec = jax.ShapeDtypeStruct((b * n_devices, d), jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
    s = jax.ShapeDtypeStruct((), jnp.float32)

    def f(a, t, scale):
        return jax.value_and_grad(lambda a, t, scale: fn(Encoded.of_pair(a, t, scale))[0],
                                  argnums=(0, 1, 2))(a, t, scale)

    compiled = jax.jit(f).lower(spec, spec, s).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_ring_loss_memory_stays_flat_as_the_global_batch_grows():
    # Per-device batch fixed at b = 512 (d = 64); the global batch B grows 4x with the device
    # count. all_gather holds b x B logits; the ring (a custom VJP that recomputes blocks while
    # they travel again) holds only this shard's blocks, the travelling block and O(b)
    # statistics. Measured temp memory, 2 -> 8 devices (jax 0.10.2): all_gather 12.6 -> 50.1 MB;
    # ring 2.77 -> 2.77 MB (the previous ring, which kept every received block: 6.3 -> 7.6 MB).
    b, d = 512, 64
    gather = [_loss_temp_bytes("all_gather", n, b=b, d=d) for n in (2, 8)]
    ring = [_loss_temp_bytes("ring", n, b=b, d=d) for n in (2, 8)]
    assert gather[1] > 3.5 * gather[0]
    # No shard stores the other shards' embeddings: 4x the devices adds less than one b x d block.
    assert ring[1] - ring[0] < b * d * 4


def _log_mean_exp(v):
    return np.log(np.mean(np.exp(v)))


def test_cross_uniformity_matches_numpy_reference():
    rng = np.random.default_rng(3)
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, 12, 5)))
    enc = Encoded.of_pair(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                          jnp.float32(0.0))
    got = losses.get("cross_uniformity").fn(enc, config.defaults().loss, None)[0]
    d2 = np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)  # float64
    want = _log_mean_exp(-2.0 * d2[~np.eye(12, dtype=bool)])  # unmatched pairs only
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The matched pairs (the diagonal) are not part of the mean.
    assert float(got) != pytest.approx(_log_mean_exp(-2.0 * d2.ravel()), rel=1e-3)


def test_modality_gap_is_logged_without_gradient_and_matches_numpy():
    rng = np.random.default_rng(4)
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, 10, 6)))
    y = y + 0.5  # an offset between the modalities' centroids
    cfg = config.defaults().loss
    fn = losses.total_objective(cfg)

    def gap(a, b):
        return fn(Encoded.of_pair(a, b, jnp.float32(2.0)), axis=None)[1]["modality_gap"]

    a, b = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    np.testing.assert_allclose(gap(a, b), np.linalg.norm(x.mean(0) - y.mean(0)), rtol=1e-6)
    for g in jax.grad(gap, argnums=(0, 1))(a, b):
        np.testing.assert_array_equal(g, 0.0)


def test_modality_gap_with_k_captions_leaves_the_absent_ones_out():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(4, 3, 6))
    present = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], bool)
    got = geometry.modality_gap(jnp.asarray(x), jnp.asarray(y), None, None, jnp.asarray(present))
    np.testing.assert_allclose(got, np.linalg.norm(x.mean(0) - y[present].mean(0)), rtol=1e-5)


@pytest.mark.parametrize("impl", ["all_gather", "ring"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_geometry_terms_and_gap_equal_single_device(impl, shape):
    img, txt = _random_embeddings(seed=5)
    scale, bias = jnp.float32(2.3), jnp.float32(0.0)
    cfg = config.defaults().loss
    cfg.aux = {"align": 0.3, "cross_uniformity": 0.7}
    dense_cfg = cfg.copy_and_resolve_references()
    dense_cfg.impl = "dense"
    dense = losses.objective_over_mesh(dense_cfg, None)
    ref_v, ref_g = _value_and_grads(dense, img, txt, scale, bias)
    ref_metrics = jax.jit(lambda a, b: dense(Encoded.of_pair(a, b, scale, bias))[1])(img, txt)
    cfg.impl = impl
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    sharded = losses.objective_over_mesh(cfg, mesh)
    v, g = _value_and_grads(sharded, put(img), put(txt), scale, bias)
    metrics = jax.jit(lambda a, b: sharded(Encoded.of_pair(a, b, scale, bias))[1])(put(img),
                                                                                  put(txt))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for name_, a, b in zip(("image", "text", "scale"), g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name_)
    assert set(metrics) == set(ref_metrics) >= {"loss_align", "loss_cross_uniformity",
                                                "modality_gap"}
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    x, y = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    np.testing.assert_allclose(metrics["modality_gap"], np.linalg.norm(x.mean(0) - y.mean(0)),
                               rtol=1e-5)


def test_clip_gap_config_trains_and_logs_the_gap(tmp_path, monkeypatch):
    import os

    from jaxclip import train
    from jaxclip.metrics import read_metrics

    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "clip_gap.py")
    cfg = config.load(path, ["train.steps=2", "train.batch_size=8", "train.log_every=1",
                             "train.progress=false", "model.image.depth=1", "model.text.depth=1",
                             "evals={}", "data.train.dataset=shapes_small"])
    assert dict(cfg.loss.aux) == {"align": 1.0, "uniformity": 1.0} and not cfg.loss.learn_scale
    train.train(cfg, str(tmp_path / "run"))
    logged = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logged) == 2
    for record in logged:
        for key in ("loss", "loss_clip", "loss_align", "loss_uniformity", "modality_gap"):
            assert np.isfinite(record[key]), key
        assert record["logit_scale"] == pytest.approx(math.log(100), abs=1e-6)  # fixed
        assert 0 < record["modality_gap"] < 2


def test_modality_gap_psum_is_ordered_against_the_ring_loops():
    # Without auxiliary terms nothing else ties the gap's psum to the ring: it has no backward
    # pass, so unless it feeds the ring's inputs it may run beside the backward ring loop
    # (jaxclip.losses.core.after says why that can hang on XLA:CPU).
    from tests.test_losses_ring import _unordered_loop_collectives

    img, txt = _random_embeddings()
    cfg = config.defaults().loss
    cfg.impl, cfg.tile = "ring", 2
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    fn = losses.objective_over_mesh(cfg, mesh)
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))

    def step(a, t, s):
        return jax.value_and_grad(lambda *e: fn(Encoded.of_pair(*e)), argnums=(0, 1, 2),
                                  has_aux=True)(a, t, s)

    hlo = jax.jit(step).lower(put(img), put(txt), jnp.float32(2.3)).compile().as_text()
    assert hlo.count(" while(") >= 2
    assert _unordered_loop_collectives(hlo) == []
