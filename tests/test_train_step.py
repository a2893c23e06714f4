"""The train step: sharded meshes match one device, locked towers, clamps, schedules, masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import optim, sharding, train, tree
from tests.helpers import random_batch, tiny_config


def _run(cfg, shape, batches):
    n = math.prod(shape)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices=jax.devices()[:n])
    m = train.build(cfg, mesh)
    state = train.init_state(m)
    step = train.make_train_step(m)
    losses = []
    for b in batches:
        state, metrics = step(state, sharding.global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), m


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    cfg = tiny_config()
    return [random_batch(rng, cfg) for _ in range(4)]


@pytest.fixture(scope="module")
def single_device_run(batches):
    return _run(tiny_config(**{"optim.lr": 1e-3, "optim.warmup_steps": 2}), (1, 1, 1), batches)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sharded_train_steps_match_one_device(batches, single_device_run, shape):
    """Four AdamW steps on a sharded mesh follow the 1-device loss curve.

    Tolerance 2e-5 relative: the meshes only reorder float32 sums, but Adam's normalised update
    turns a rounding-level gradient difference into an O(lr) parameter difference for entries
    whose gradient is near zero, so the curves drift apart slightly with every step.
    """
    cfg = tiny_config(**{"optim.lr": 1e-3, "optim.warmup_steps": 2})
    ref_losses = single_device_run[0]
    losses, _, m = _run(cfg, shape, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert losses[-1] < losses[0]
    if shape[1] > 1:  # FSDP: the big weights really are split over the fsdp axis
        spec = m.param_shardings["text"]["token_embed"].spec
        assert spec == jax.sharding.PartitionSpec("tensor", "fsdp") or "fsdp" in spec


def test_locked_tower_is_unchanged_and_has_no_optimizer_state(batches):
    cfg = tiny_config(**{"model.image.locked": True, "optim.lr": 1e-2})
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    m = train.build(cfg, mesh)
    state = train.init_state(m)
    before = jax.device_get(state.frozen)
    assert set(before) == {"image"} and "image" not in state.params
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert opt_paths and not any("'image'" in p for p in opt_paths)
    step = train.make_train_step(m)
    text_before = jax.device_get(state.params["text"])
    for b in batches[:2]:
        state, _ = step(state, sharding.global_batch(b, mesh))
    after = jax.device_get(state.frozen)
    for path, value in tree.flatten(before).items():
        np.testing.assert_array_equal(tree.flatten(after)[path], value, err_msg=path)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), text_before,
                                         jax.device_get(state.params["text"])))
    assert max(moved) > 0


def test_logit_scale_is_clamped_to_0_ln100_after_a_huge_step(batches):
    # Learning-rate multipliers of +-1e6 on the scale throw it ~1e3 in either direction in one
    # Adam step; open_clip's clamp puts it back into [0, ln 100] exactly.
    ends = []
    for mult in (1e6, -1e6):
        cfg = tiny_config(**{"optim.lr_mults": {"logit_scale": mult}, "optim.grad_clip": 0.0})
        _, state, _ = _run(cfg, (1, 1, 1), batches[:1])
        ends.append(float(state.params["logit_scale"]))
    assert sorted(ends) == [0.0, float(np.float32(math.log(100)))]  # exactly, in float32
    cfg.loss.scale_max = None  # SigLIP-style: no clamp
    _, state, _ = _run(cfg, (1, 1, 1), batches[:1])
    assert abs(float(state.params["logit_scale"])) > 100


def test_learning_rate_schedule_matches_open_clip():
    cfg = tiny_config(**{"optim.lr": 1.0, "optim.warmup_steps": 4})
    lr = optim.learning_rate(cfg.optim, total_steps=14)
    # open_clip: warmup lr·(step+1)/warmup, then 0.5·(1 + cos(pi·e/es))·lr
    expected = [(s + 1) / 4 for s in range(4)] + \
        [0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]
    np.testing.assert_allclose([float(lr(s)) for s in range(14)], expected, atol=1e-6)


def test_weight_decay_mask_and_lr_multipliers():
    cfg = tiny_config(**{"optim.lr_mults": {"^text/": 0.1}})
    params = {"image": {"blocks": {"mlp": {"fc1": {"kernel": jnp.zeros((2, 3, 4)),
                                                   "bias": jnp.zeros((2, 4))}}},
                        "pos_embed": jnp.zeros((5, 3)), "ln_pre": {"scale": jnp.zeros(3)}},
              "text": {"proj": jnp.zeros((3, 2))}, "logit_scale": jnp.zeros(())}
    mask = tree.flatten(optim.decay_mask(params, cfg.optim))
    assert mask == {"image/blocks/mlp/fc1/kernel": True, "image/blocks/mlp/fc1/bias": False,
                    "image/pos_embed": False, "image/ln_pre/scale": False,
                    "text/proj": True, "logit_scale": False}
    mults = tree.flatten(optim.lr_multipliers(params, cfg.optim))
    assert mults["text/proj"] == 0.1 and mults["image/pos_embed"] == 1.0


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


def test_logical_rules_respect_divisibility_and_use_each_axis_once():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    P = jax.sharding.PartitionSpec
    assert sharding.logical_spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
    assert sharding.logical_spec(("embed", "mlp"), (7, 16), mesh) == P(None, "tensor")
    assert sharding.logical_spec(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)
    assert sharding.logical_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_spec(("layers", "embed", "heads", "kv"), (2, 8, 4, 8), mesh) == \
        P(None, "fsdp", "tensor", None)
