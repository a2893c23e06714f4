"""GradCache accumulation (jaxclip.accumulate): k micro-batches give the loss and the gradient of
the whole batch, every negative included, with about 1/k of the activation memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclip import accumulate, config, losses, sharding, train, tree
from jaxclip.data.images import normalize_images
from jaxclip.models.two_tower import l2_normalize
from tests.helpers import random_batch, run_steps

# The demo experiment shrunk to one block per tower; a 4 x 2 data x fsdp mesh, so the
# micro-batches must follow a batch split over two mesh axes and the gradients are fsdp-sharded.
TINY = ["model.embed_dim=32", "model.image.image_size=16", "model.image.patch_size=4",
        "model.image.width=32", "model.image.depth=1", "model.image.heads=2",
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
        "model.text.vocab_size=100", "model.text.eot_id=99", "model.text.pad_id=0",
        "train.batch_size=32", "mesh.data=4", "mesh.fsdp=2"]
SIGLIP = ["loss.name=siglip", "model.logit_scale_init=2.302585", "model.logit_bias_init=-10.0"]
LOCKS = {
    "unlocked": [],
    # The whole image tower frozen, no head: pass 3 never runs the image tower.
    "image_locked": ["model.image.locked=True"],
    # LiT: a locked text tower under a trainable linear head; the head still trains.
    "text_locked_head": ["model.text.locked=True", "model.text.head=linear"],
}


def _setup(overrides):
    cfg = config.load("configs/demo.py", TINY + overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    m = train.build(cfg, mesh)
    state = train.init_state(m)
    batch = sharding.global_batch(random_batch(np.random.default_rng(0), cfg), mesh)
    return cfg, m, state, batch


def _reference_and_accumulated(cfg, m, k, objective=None, tokens=False):
    """One jitted function returning make_train_step's value_and_grad and loss_and_grads."""
    objective = objective or losses.objective_over_mesh(cfg.loss, m.mesh)

    def both(state, batch):
        images = normalize_images(batch["image"], cfg.data.mean, cfg.data.std)

        def loss_fn(params):  # as in train.make_train_step
            model = nnx.merge(m.graphdef, tree.merge(params, state.frozen))
            enc = model(images, batch["text"], return_tokens=tokens)
            loss, metrics = objective(enc)
            return loss, (metrics, enc.logit_scale, enc.logit_bias)

        ref = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        acc = accumulate.loss_and_grads(
            m.graphdef, state.params, state.frozen, images, batch["text"], objective, k,
            return_tokens=tokens, mesh=m.mesh, grad_shardings=m.state_shardings.params)
        return ref, acc

    return jax.jit(both, in_shardings=(m.state_shardings, sharding.batch_sharding(m.mesh)))


def _assert_same(ref, acc):
    (loss_r, (metrics_r, scale_r, bias_r)), grads_r = jax.device_get(ref)
    (loss_a, (metrics_a, scale_a, bias_a)), grads_a = jax.device_get(acc)
    np.testing.assert_allclose(loss_a, loss_r, rtol=1e-6)
    assert metrics_a.keys() == metrics_r.keys()
    for name in metrics_r:
        np.testing.assert_allclose(metrics_a[name], metrics_r[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert scale_a == scale_r and (bias_r is None) == (bias_a is None)
    flat_r, flat_a = tree.flatten(grads_r), tree.flatten(grads_a)
    assert flat_a.keys() == flat_r.keys()
    # Absolute tolerance at 1e-5 of the largest gradient anywhere in the model: a gradient that
    # is exactly zero in theory (attention key biases, softmax-invariant) is float32 noise
    # (~1e-8) from cancelling terms as large as the rest of the model's gradients, so scaling by
    # its own maximum would compare noise with noise.
    scale = max(float(np.abs(g).max()) for g in flat_r.values())
    worst = 0.0
    for path, g in flat_r.items():
        assert flat_a[path].dtype == g.dtype, path
        np.testing.assert_allclose(flat_a[path], g, rtol=1e-5, atol=1e-5 * scale, err_msg=path)
        worst = max(worst, float(np.abs(flat_a[path] - g).max()) / scale)
    return worst


# CLIP + SimCLR over two views of each image (SLIP, loss.aux.simclr): the view embeddings
# (B, 2, E') are embedded in pass 1 and pulled back through the view head and the image tower in
# pass 3.
SLIP = ["data.views=2", "model.image.view_head.out=16", "model.image.view_head.hidden=24",
        "loss.aux.simclr=1.0"]
# CWCL with its weight tower (the image) locked: the weights come from the full batch's frozen
# embeddings in pass 2, which accumulation must not change.
OBJECTIVES = {"clip": [], "siglip": SIGLIP, "slip": SLIP,
              "cwcl": ["loss.name=cwcl", "loss.cwcl.weight_tower=image"]}

# Each loss with each impl, unlocked and with one of the two locked layouts (compile time).
# CLIP's unlocked ring case runs with the SimCLR term (slip): it adds the image views to what
# the case checks at no extra compile; its locked all_gather case runs CWCL (weights from the
# locked image tower).
CASES = [(loss, impl, lock) for loss in ("clip", "siglip") for impl in ("all_gather", "ring")
         for lock in ("unlocked", "image_locked" if loss == "clip" else "text_locked_head")]
CASES[CASES.index(("clip", "ring", "unlocked"))] = ("slip", "ring", "unlocked")
CASES[CASES.index(("clip", "all_gather", "image_locked"))] = ("cwcl", "all_gather", "image_locked")


@pytest.mark.parametrize("loss,impl,lock", CASES, ids=["-".join(c) for c in CASES])
def test_four_microbatches_equal_the_full_batch(loss, impl, lock):
    overrides = OBJECTIVES[loss] + [f"loss.impl={impl}"] + LOCKS[lock]
    cfg, m, state, batch = _setup(overrides)
    if loss == "slip":
        assert "view_head" in state.params and batch["image"].shape[1] == 2
    if lock == "image_locked":
        assert "image" not in state.params and "image" in state.frozen
    if lock == "text_locked_head":
        assert "text" in state.frozen and "text_head" in state.params
    ref, acc = _reference_and_accumulated(cfg, m, 4)(state, batch)
    worst = _assert_same(ref, acc)
    if loss == "slip":  # the term ran, and its head learns
        assert "loss_simclr" in ref[0][1][0]
        assert np.abs(tree.flatten(jax.device_get(ref[1]))["view_head/fc0/kernel"]).max() > 0
    print(f"{loss}/{impl}/{lock}: loss {float(ref[0][0]):.7f} vs {float(acc[0][0]):.7f}, "
          f"max |grad difference| / max |grad| {worst:.2e}")
    if impl == "all_gather" and lock != "text_locked_head":
        # The image tower runs in pass 1 and again in pass 3, unless nothing in it trains.
        assert _image_tower_runs(cfg, m, 4) == (1 if lock == "image_locked" else 2)


def _image_tower_runs(cfg, m, k):
    """How many times loss_and_grads' program multiplies by the patch-embedding kernel."""
    objective = losses.objective_over_mesh(cfg.loss, m.mesh)

    def fn(state, batch):
        images = normalize_images(batch["image"], cfg.data.mean, cfg.data.std)
        return accumulate.loss_and_grads(m.graphdef, state.params, state.frozen, images,
                                         batch["text"], objective, k, mesh=m.mesh)

    p, w = cfg.model.image.patch_size, cfg.model.image.width
    traced = jax.jit(fn).trace(m.abstract_state, train.batch_specs(cfg, m.mesh))

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and any(
                    getattr(v.aval, "shape", None) == (p, p, 3, w) for v in eqn.invars):
                n += 1
            for sub in jax.tree.leaves(eqn.params, is_leaf=lambda x: hasattr(x, "eqns")
                                       or hasattr(x, "jaxpr")):
                if hasattr(sub, "jaxpr") or hasattr(sub, "eqns"):
                    n += count(getattr(sub, "jaxpr", sub))
        return n

    return count(traced.jaxpr.jaxpr)


def test_token_objective_gets_token_gradients():
    """A token-level objective (enc.x_tokens / y_tokens / y_mask, FILIP-like) through
    the same three passes: the token embeddings' gradient reaches the towers."""

    def objective(enc):
        # Mean of the real text tokens and of the patch tokens, as extra embeddings in a dense
        # InfoNCE next to the pooled one.
        mask = enc.y_mask[..., None].astype(jnp.float32)
        txt = l2_normalize((enc.y_tokens * mask).sum(1) / mask.sum(1))
        img = l2_normalize(enc.x_tokens.mean(1))
        labels = jnp.arange(img.shape[0])
        scale = jnp.exp(enc.logit_scale)
        total = 0.0
        for a, b in ((img, txt), (enc.x, enc.y)):
            logits = scale * a @ b.T
            total += -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
        return total, {}

    cfg, m, state, batch = _setup([])
    ref, acc = _reference_and_accumulated(cfg, m, 4, objective=objective, tokens=True)(state,
                                                                                       batch)
    worst = _assert_same(ref, acc)
    print(f"tokens: max |grad difference| / max |grad| {worst:.2e}")


def test_microbatches_must_divide_the_per_device_batch():
    accumulate.check_microbatches(256, 8, 4)
    accumulate.check_microbatches(256, 8, 1)
    with pytest.raises(config.ConfigError, match=r"train.microbatches=3 does not divide the "
                                                 r"per-device batch 32"):
        accumulate.check_microbatches(256, 8, 3)
    with pytest.raises(config.ConfigError, match="must be >= 1"):
        accumulate.check_microbatches(256, 8, 0)


def test_activation_memory_falls_with_the_number_of_microbatches():
    """Compile-only: XLA's planned temp memory per device of the whole loss-and-gradient program.

    A model whose activations dominate (64 patch tokens, width 64, 2 blocks, batch 256 on 8
    devices) against parameters of ~0.2 M; the embeddings (B x 32) are all the accumulated
    program keeps besides one micro-batch's activations.
    """
    overrides = ["model.image.image_size=32", "model.image.width=64", "model.image.depth=2",
                 "model.text.width=64", "model.text.depth=2", "train.batch_size=256"]
    cfg, m, _, _ = _setup(overrides)
    objective = losses.objective_over_mesh(cfg.loss, m.mesh)

    def temp_mb(k):
        def fn(state, batch):
            images = normalize_images(batch["image"], cfg.data.mean, cfg.data.std)
            return accumulate.loss_and_grads(
                m.graphdef, state.params, state.frozen, images, batch["text"], objective, k,
                mesh=m.mesh, grad_shardings=m.state_shardings.params)

        jitted = jax.jit(fn, in_shardings=(m.state_shardings, sharding.batch_sharding(m.mesh)))
        compiled = jitted.lower(m.abstract_state, train.batch_specs(cfg, m.mesh)).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    one, four = temp_mb(1), temp_mb(4)
    print(f"temp per device: k=1 {one:.2f} MiB, k=4 {four:.2f} MiB ({four / one:.2f}x)")
    assert four < 0.5 * one


def test_the_trainers_step_with_microbatches_updates_like_the_full_batch():
    """train.microbatches wired into make_train_step: two AdamW steps with k=4 leave the same
    parameters and log the same losses as k=1 (fp32; AdamW divides by sqrt(nu), so gradient
    rounding of 1e-7 relative shows up around 1e-6 in the update)."""
    results = []
    for k in (1, 4):
        _, m, state, batch = _setup([f"train.microbatches={k}"])
        results.append(run_steps(train.make_train_step(m), state, batch))
    (loss1, params1), (loss4, params4) = results
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_microbatches_that_do_not_divide_are_refused_before_anything_runs(tmp_path):
    cfg = config.load("configs/demo.py", [*TINY, "train.microbatches=3"])
    with pytest.raises(config.ConfigError, match="train.microbatches=3 does not divide"):
        train.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
