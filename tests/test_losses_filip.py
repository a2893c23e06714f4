"""FILIP (jaxclip/losses/tokenwise.py): the defining properties of token-wise late interaction,
a float64 numpy reference, chunking, the mesh, gradient accumulation and a short training run.

Tolerances: float32. Reorderings of the same sums (chunks, shards, micro-batches) agree to a few
ulps: losses rtol 1e-6, gradients atol 1e-6 / rtol 1e-5 (entries are O(1e-2)), as in
tests/test_losses.py; the float64 reference to rtol 1e-5.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, evals, losses, runtime, sharding
from jaxclip.losses import tokenwise
from jaxclip.models import Encoded, l2_normalize
from tests.helpers import train_short
from tests.test_accumulate import _assert_same, _reference_and_accumulated, _setup

FILIP_DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "filip_demo.py")


def _tokens(rng, batch, n, d=8):
    return l2_normalize(jnp.asarray(rng.normal(size=(batch, n, d)), jnp.float32))


def _inputs(batch=6, n_image=5, n_text=7, d=8, seed=0):
    """Random unit tokens and a text mask with 2..n_text real tokens (1 if n_text is 1) at the
    front of each row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(2, n_text), n_text + 1, (batch, 1))
    mask = jnp.asarray(np.arange(n_text)[None, :] < lengths)
    return _tokens(rng, batch, n_image, d), _tokens(rng, batch, n_text, d), mask


def _numpy_filip(image, text, mask, scale, eps=0.0):
    """The paper's formula in float64, one pair at a time."""
    image, text, mask = (np.asarray(a, np.float64) for a in (image, text, mask))
    B = len(image)
    s_i, s_t = np.zeros((B, B)), np.zeros((B, B))
    for i in range(B):
        for j in range(B):
            sim = image[i] @ text[j][mask[j] > 0].T  # (patches, real words)
            s_i[i, j] = sim.max(axis=1).mean()  # each patch's best word, mean over patches
            s_t[i, j] = sim.max(axis=0).mean()  # each real word's best patch, mean over words

    def ce(logits):
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return np.mean(-(1 - eps) * np.diag(logp) - eps * logp.mean(1))

    return 0.5 * (ce(scale * s_i) + ce(scale * s_t.T))


def test_one_token_per_side_is_clip():
    image, text, _ = _inputs(n_image=1, n_text=1)
    mask = jnp.ones((6, 1), bool)
    for eps in (0.0, 0.1):
        np.testing.assert_allclose(
            losses.filip_loss(image, text, mask, 2.0, label_smoothing=eps),
            losses.clip_loss(image[:, 0], text[:, 0], 2.0, label_smoothing=eps), rtol=1e-6)


def _matrices(image, text, mask):
    """(S^I, S^T) over the whole batch."""
    image_mask = jnp.ones(image.shape[:2], bool)
    s_i = tokenwise.late_interaction_logits(image, image_mask, text, mask, 0)
    s_t_transposed = tokenwise.late_interaction_logits(text, mask, image, image_mask, 0)
    return s_i, s_t_transposed.T


def test_masked_pads_change_nothing_even_where_every_real_similarity_is_negative():
    image, text, mask = _inputs()
    # Patches in the positive orthant, words in the negative one: every real similarity is
    # negative, so a pad scored 0 (zero-filled, not masked) would win every patch's max and
    # change S^I (the MindSpore port's bug).
    image, text = l2_normalize(jnp.abs(image)), l2_normalize(-jnp.abs(text))
    rng = np.random.default_rng(1)
    pads = {"zero": jnp.zeros((6, 3, 8)), "random": _tokens(rng, 6, 3)}
    before = _matrices(image, text, mask)
    assert float(jnp.max(jnp.einsum("ikd,jrd->ijkr", image, text))) < 0
    loss = losses.filip_loss(image, text, mask, 2.0)
    padded_mask = jnp.concatenate([mask, jnp.zeros((6, 3), bool)], axis=1)
    for kind, pad in pads.items():
        padded = jnp.concatenate([text, pad], axis=1)
        for a, b in zip(_matrices(image, padded, padded_mask), before):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(losses.filip_loss(image, padded, padded_mask, 2.0), loss,
                                   rtol=1e-6, err_msg=kind)


def test_the_two_similarity_matrices_are_not_transposes():
    s_i, s_t = _matrices(*_inputs())
    assert float(jnp.max(jnp.abs(s_i - s_t))) > 0.05


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_a_numpy_reference_with_pads(eps):
    image, text, mask = _inputs(seed=3)
    got = losses.filip_loss(image, text, mask, 2.5, label_smoothing=eps)
    np.testing.assert_allclose(got, _numpy_filip(image, text, mask, np.exp(2.5), eps), rtol=1e-5)


def _value_and_grads(fn, image, text, mask, scale):
    def loss(a, b, s):
        enc = Encoded({"image": a.mean(1), "text": b.mean(1)}, s, tokens={"image": a, "text": b},
                      masks={"text": mask})
        return fn(enc)[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(image, text, scale)


def _filip_cfg(**own):
    cfg = config.defaults().loss
    cfg.name, cfg.impl = "filip", "dense"
    cfg.filip.update(own)
    return cfg


def _assert_loss_and_grads_equal(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for name, a, b in zip(("image", "text", "scale"), got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)


def test_chunked_equals_unchunked():
    image, text, mask = _inputs(batch=12)
    scale = jnp.float32(2.0)
    want = _value_and_grads(losses.objective_over_mesh(_filip_cfg(chunk=0), None),
                            image, text, mask, scale)
    for chunk in (3, 5):  # 5 does not divide 12: the scan steps by 4
        got = _value_and_grads(losses.objective_over_mesh(_filip_cfg(chunk=chunk), None),
                               image, text, mask, scale)
        _assert_loss_and_grads_equal(got, want)


def test_sharded_equals_single_device_in_loss_and_gradients():
    image, text, mask = _inputs(batch=16)
    scale = jnp.float32(2.3)
    want = _value_and_grads(losses.objective_over_mesh(_filip_cfg(label_smoothing=0.1), None),
                            image, text, mask, scale)
    cfg = _filip_cfg(label_smoothing=0.1, chunk=4)
    cfg.impl = "all_gather"
    mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    got = _value_and_grads(losses.objective_over_mesh(cfg, mesh), put(image), put(text),
                           put(mask), scale)
    _assert_loss_and_grads_equal(got, want)
    assert abs(float(got[1][2])) > 1e-3  # the scale's gradient, not divided by the shards
    # Token selection runs per shard (among the shard's own counterparts, so it differs from
    # the single-device selection by design): it runs and keeps ceil(0.5 · 5) = 3 patches.
    cfg.filip.keep_frac = 0.5
    enc = Encoded({"image": image.mean(1), "text": text.mean(1)}, scale,
                  tokens={"image": put(image), "text": put(text)}, masks={"text": put(mask)})
    loss, metrics = jax.jit(losses.objective_over_mesh(cfg, mesh))(enc)
    assert np.isfinite(float(loss)) and float(metrics["image_tokens_kept"]) == 3.0


def test_chunks_bound_the_memory_of_the_token_similarities():
    """Compile-only: XLA's planned temp memory of loss and gradients, whole batch vs chunks of 8
    (the b x B x n1 x n2 similarities are 4 MiB here, one chunk's 0.5 MiB)."""
    image = jax.ShapeDtypeStruct((64, 16, 32), jnp.float32)
    text = jax.ShapeDtypeStruct((64, 16, 32), jnp.float32)
    mask = jax.ShapeDtypeStruct((64, 16), jnp.bool_)
    scale = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_mib(chunk):
        fn = losses.objective_over_mesh(_filip_cfg(chunk=chunk), None)

        def f(a, b, m, s):
            enc = Encoded({"image": a.mean(1), "text": b.mean(1)}, s,
                          tokens={"image": a, "text": b}, masks={"text": m})
            return jax.value_and_grad(lambda a, b, s: fn(
                dataclasses.replace(enc, tokens={"image": a, "text": b}, logit_scale=s))[0],
                argnums=(0, 1, 2))(a, b, s)

        compiled = jax.jit(f).lower(image, text, mask, scale).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    whole, chunked = temp_mib(0), temp_mib(8)
    print(f"temp: whole batch {whole:.2f} MiB, chunks of 8 {chunked:.2f} MiB")
    assert chunked < 0.5 * whole


def test_token_selection_and_communication_dtype():
    image, text, mask = _inputs(batch=8, n_image=8, n_text=8, seed=5)
    cfg = _filip_cfg(keep_frac=0.25)
    enc = Encoded({"image": image.mean(1), "text": text.mean(1)}, jnp.float32(2.0),
                  tokens={"image": image, "text": text}, masks={"text": mask})
    loss, metrics = losses.get("filip").fn(enc, cfg, None)
    assert float(metrics["image_tokens_kept"]) == 2.0  # ceil(0.25 · 8)
    # Real words go before pads: every text has at least 2 real tokens, so 2 real are kept.
    assert float(metrics["text_tokens_kept"]) == 2.0
    # The kept patches are those with the best match among the batch's real words.
    best = jnp.max(jnp.where(mask[None, None], jnp.einsum("ikd,jrd->ikjr", image, text), -2),
                   axis=(2, 3))
    kept, _ = tokenwise.keep_best_tokens(image, jnp.ones((8, 8), bool), text, mask, 0.25, 3)
    top = jnp.take_along_axis(image, jnp.argsort(-best, axis=1)[:, :2, None], axis=1)
    np.testing.assert_array_equal(kept, top)
    assert np.isfinite(float(loss)) and float(loss) != float(losses.filip_loss(image, text,
                                                                                mask, 2.0))
    full = losses.filip_loss(image, text, mask, 2.0)
    low = losses.filip_loss(image, text, mask, 2.0, comm_dtype="bfloat16")
    np.testing.assert_allclose(low, full, rtol=1e-2)
    assert float(low) != float(full)


def test_has_no_ring_form():
    cfg = _filip_cfg()
    cfg.impl = "ring"
    with pytest.raises(ValueError, match="has no 'ring' implementation"):
        losses.total_objective(cfg)


def test_two_microbatches_equal_the_full_batch():
    cfg, m, state, batch = _setup(["loss.name=filip", "loss.impl=all_gather",
                                   "loss.filip.chunk=8"])
    assert losses.needs_tokens(cfg.loss)
    ref, acc = _reference_and_accumulated(cfg, m, 2, tokens=True)(state, batch)
    _assert_same(ref, acc)


def test_filip_demo_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    cfg, logged = train_short(FILIP_DEMO, ["train.batch_size=8"], str(tmp_path / "run"))
    assert cfg.loss.name == "filip"
    assert logged[0]["image_tokens_kept"] > 0 and "t2i_acc" in logged[0]
    # The trained model scored as it was trained: late-interaction retrieval over token sets.
    cfg_eval, params, _ = runtime.restore(str(tmp_path / "run"))
    cfg_eval.evals = {"late": dict(type="retrieval", split="val", max_examples=24, scoring="late",
                                   query_chunk=5),
                      "pooled": dict(type="retrieval", split="val", max_examples=24)}
    got = evals.evaluate(cfg_eval, params)
    for kind in ("late", "pooled"):
        assert 1 <= got[f"eval/{kind}/i2t_mean_rank"] <= 24
        assert 0 <= got[f"eval/{kind}/t2i_r10"] <= 1
    assert got["eval/late/i2t_mean_rank"] != got["eval/pooled/i2t_mean_rank"]
