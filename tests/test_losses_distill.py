"""Distillation terms (open_clip's KD, Mod-X): their defining properties, a float64 numpy reference,
sharded = single device on 8 fake devices, and the teacher in the train step (loaded from a params
dir, run in micro-batches, refused with a clear error when it cannot read the student's batch).

Tolerances: float32 against a float64 reference, 1e-5 relative on O(1) losses."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, flops, losses, runtime, sharding, teacher, train, tree
from jaxclip.interop import sources
from jaxclip.models import Encoded, l2_normalize
from tests.helpers import random_batch, tiny_config, train_short

DISTILL_DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "distill_demo.py")


def _unit(rng, *shape):
    return np.asarray(l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32)))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd_reference(x, y, s, tx, ty, t):
    x, y, tx, ty = (a.astype(np.float64) for a in (x, y, tx, ty))
    S, T = np.exp(s) * x @ y.T, np.exp(t) * tx @ ty.T
    rows = -(np.exp(_log_softmax(T)) * _log_softmax(S)).sum(-1).mean()
    cols = -(np.exp(_log_softmax(T.T)) * _log_softmax(S.T)).sum(-1).mean()
    return 0.5 * (rows + cols)


def _modx_reference(x, y, tx, ty, tau, screen):
    """As the Mod-X reference code does it: screened rows of S° replaced by the student's, then
    the KL of every row; but the mean over rows instead of the sum."""
    x, y, tx, ty = (a.astype(np.float64) for a in (x, y, tx, ty))
    total = 0.0
    for S, T in ((x @ y.T / tau, tx @ ty.T / tau), (y @ x.T / tau, ty @ tx.T / tau)):
        if screen:
            wrong = T.argmax(-1) != np.arange(len(T))
            T = np.where(wrong[:, None], S, T)
        lp, lq = _log_softmax(T), _log_softmax(S)
        total += 0.5 * (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return total


def _student_and_teacher(rng, b=16, d=8, dt=12, noise=0.6):
    """A student whose pairs match only roughly, and a wider teacher that is the student
    (projected to its width) plus noise: some of its rows rank correctly and some do not."""
    x = _unit(rng, b, d)
    y = np.asarray(l2_normalize(jnp.asarray(x + noise * rng.normal(size=(b, d)))))
    proj = rng.normal(size=(d, dt)) / np.sqrt(d)
    tx = np.asarray(l2_normalize(jnp.asarray(x @ proj + noise * rng.normal(size=(b, dt)))))
    ty = np.asarray(l2_normalize(jnp.asarray(y @ proj + noise * rng.normal(size=(b, dt)))))
    return x, y, tx, ty


def test_kd_matches_a_numpy_reference():
    x, y, tx, ty = _student_and_teacher(np.random.default_rng(0))
    got = losses.kd_loss(x, y, 1.3, tx, ty, 2.1)
    np.testing.assert_allclose(got, _kd_reference(x, y, 1.3, tx, ty, 2.1), rtol=1e-5)


@pytest.mark.parametrize("screen", [True, False])
def test_modx_matches_a_numpy_reference(screen):
    x, y, tx, ty = _student_and_teacher(np.random.default_rng(1))
    # Both kinds of rows are present, so screening is exercised.
    wrong = (tx @ ty.T).argmax(-1) != np.arange(16)
    assert 0 < wrong.sum() < 16
    got = losses.modx_loss(x, y, tx, ty, temperature=0.5, screen_wrong_rows=screen)
    np.testing.assert_allclose(got, _modx_reference(x, y, tx, ty, 0.5, screen), rtol=1e-5)


def test_kd_of_a_student_equal_to_its_teacher_has_zero_gradient():
    x, y, _, _ = _student_and_teacher(np.random.default_rng(2))
    grads = jax.grad(lambda a, b, s: losses.kd_loss(a, b, s, x, y, 1.7), argnums=(0, 1, 2))(
        jnp.asarray(x), jnp.asarray(y), jnp.float32(1.7))
    for g in grads:
        np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_modx_of_old_equal_new_is_zero_with_zero_gradient():
    x, y, _, _ = _student_and_teacher(np.random.default_rng(3))
    value, grads = jax.value_and_grad(lambda a, b: losses.modx_loss(a, b, x, y, temperature=0.3),
                                      argnums=(0, 1))(jnp.asarray(x), jnp.asarray(y))
    assert abs(float(value)) < 1e-6
    for g in grads:
        np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_modx_screened_rows_contribute_nothing():
    x, y, tx, _ = _student_and_teacher(np.random.default_rng(4))
    # The old model matches every image with the previous row's text: every row and column is
    # ranked wrongly, so all are screened and the term is 0 with no gradient.
    ty = np.roll(tx, 1, axis=0)
    value, grads = jax.value_and_grad(lambda a, b: losses.modx_loss(a, b, tx, ty),
                                      argnums=(0, 1))(jnp.asarray(x), jnp.asarray(y))
    assert float(value) == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    assert float(losses.modx_loss(x, y, tx, ty, screen_wrong_rows=False)) > 0


def test_modx_weight_does_not_depend_on_the_batch_size():
    """A batch repeated twice has the same per-row softmax distributions (each column appears
    twice with half the mass), so each row's KL is unchanged: the mean form gives the same value
    at 2B, where the paper's sum over rows would double."""
    x, y, tx, ty = _student_and_teacher(np.random.default_rng(5))
    twice = [np.concatenate([a, a]) for a in (x, y, tx, ty)]
    one = losses.modx_loss(x, y, tx, ty, screen_wrong_rows=False)
    two = losses.modx_loss(*twice, screen_wrong_rows=False)
    np.testing.assert_allclose(two, one, rtol=1e-5)


def _encoded(x, y, s, tx, ty, t):
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    return Encoded({"image": x, "text": y}, s, teacher=Encoded({"image": tx, "text": ty}, t))


def test_weight_zero_is_clip_and_needs_no_teacher():
    x, y, tx, ty = _student_and_teacher(np.random.default_rng(6))
    cfg = config.defaults().loss
    cfg.impl = "dense"
    clip, _ = losses.total_objective(cfg)(_encoded(x, y, 1.0, tx, ty, 2.0), axis=None)
    cfg.aux = {"kd": 0.0, "modx": 0.0}
    value, metrics = losses.total_objective(cfg)(_encoded(x, y, 1.0, tx, ty, 2.0), axis=None)
    assert float(value) == float(clip) and "loss_kd" not in metrics
    assert not losses.needs_teacher(cfg)
    cfg.aux = {"kd": 1.0}
    assert losses.needs_teacher(cfg)


def test_sharded_equals_single_device():
    """On a 2x4 mesh, beside all_gather CLIP (beside the ring form the terms run the same code
    after core.after's ordering; test_distill_demo_trains_and_logs_its_terms runs it)."""
    rng = np.random.default_rng(7)
    x, y, tx, ty = (jnp.asarray(a) for a in _student_and_teacher(rng, b=32))
    scale = jnp.float32(1.5)

    def value_and_grads(fn, a, b):
        def f(a, b, s, tx, ty):
            return fn(_encoded(a, b, s, tx, ty, jnp.float32(2.0)))
        # Jitted: op-by-op dispatch of the unsharded reference costs more than its compile.
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(a, b, scale,
                                                                                tx, ty)

    cfg = config.defaults().loss
    cfg.aux = {"kd": 0.5, "modx": 3.0}
    dense = cfg.copy_and_resolve_references()
    dense.impl = "dense"
    (ref_v, ref_m), ref_g = value_and_grads(losses.objective_over_mesh(dense, None), x, y)
    assert 0 < ref_m["modx_screened_rows"] < 1
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, (2, 4, 1))))
    put = functools.partial(jax.device_put, device=sharding.batch_sharding(mesh))
    tx, ty = put(tx), put(ty)
    (v, m), g = value_and_grads(losses.objective_over_mesh(cfg, mesh), put(x), put(y))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for key in ("loss_kd", "loss_modx", "modx_screened_rows", "modx_screened_cols",
                "kd_agreement"):
        np.testing.assert_allclose(m[key], ref_m[key], rtol=1e-6, err_msg=key)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# ---- the teacher in the trainer ----

def _teacher_config():
    """A teacher unlike the students: wider embeddings, its own image size, longer context, and
    CLIP's vocabulary so that configs/distill_demo.py can use it too."""
    cfg = tiny_config()
    cfg.model.embed_dim = 24
    cfg.model.image.update(image_size=32, patch_size=8, depth=1)
    cfg.model.text.update(vocab_size=49408, context_length=20, depth=1, eot_id=49407)
    cfg.data.update(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    cfg = _teacher_config()
    flat = {k: np.asarray(v) for k, v in tree.flatten(runtime.fresh_params(cfg)).items()}
    out = str(tmp_path_factory.mktemp("teacher"))
    sources.write(sources.Pretrained("jaxclip", out, cfg, flat), out)
    return out


def _distill_config(teacher_path, **over):
    cfg = tiny_config(**{"loss.aux.kd": 1.0, "loss.aux.modx": 10.0, "train.batch_size": 16,
                         "model.image.depth": 1, "model.text.depth": 1, **over})
    cfg.loss.teacher.path = teacher_path
    return cfg


def test_the_teacher_encodes_like_its_own_model(teacher_dir):
    """The step's teacher embeddings are the teacher model's own: its mean/std, its image size
    (16 -> 32 px) and its context length (12 -> 20 tokens, padded); the same in micro-batches."""
    cfg = _distill_config(teacher_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    t = teacher.load(cfg, mesh)
    assert t.cfg.model.embed_dim == 24
    batch = sharding.global_batch(random_batch(np.random.default_rng(9), cfg), mesh)
    encode = jax.jit(lambda p, i, s, k: teacher.encode(t, p, i, s, k, mesh), static_argnums=3)
    enc = encode(t.params, batch["image"], batch["text"], 1)
    # Under train.microbatches it runs 2 micro-batches per device's rows (8 devices here), in
    # the original row order.
    halves = encode(t.params, batch["image"], batch["text"], 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), halves, enc)
    batch = jax.device_get(batch)
    encode_pixels, encode_tokens = runtime.local_encoders(t.cfg.model)
    # Bilinear resizing is linear with weights summing to 1, so it commutes with normalising.
    big = jax.image.resize(jnp.asarray(batch["image"], jnp.float32), (16, 32, 32, 3), "bilinear")
    np.testing.assert_allclose(enc.emb["image"],
                               encode_pixels(t.params, (big - 127.5) / (0.25 * 255.0)),
                               atol=1e-4)
    np.testing.assert_allclose(enc.emb["text"],
                               encode_tokens(t.params, np.pad(batch["text"], ((0, 0), (0, 8)))),
                               atol=1e-5)
    assert float(enc.logit_scale) == pytest.approx(float(t.params["logit_scale"]))

    # What the micro-batches are for: the compiled teacher forward of a 256-row batch plans
    # less scratch in 4 micro-batches than in one (only one micro-batch's activations alive).
    def temp(k):
        specs = train.batch_specs(_distill_config(teacher_dir, **{"train.batch_size": 256}),
                                  mesh)
        return encode.lower(t.params, specs["image"], specs["text"], k).compile() \
            .memory_analysis().temp_size_in_bytes

    one, four = temp(1), temp(4)
    assert four < 0.5 * one, (one, four)


def test_a_teacher_from_a_hf_directory(teacher_dir, tmp_path):
    """The same teacher exported to HF transformers' CLIPModel format loads with the same
    parameters, image statistics and scale (no torch needed: safetensors)."""
    from jaxclip.interop.export import export

    export(teacher_dir, str(tmp_path / "hf"), "hf")
    cfg = _distill_config(str(tmp_path / "hf"))
    mesh = sharding.make_mesh(cfg.mesh)
    hf, ours = teacher.load(cfg, mesh), teacher.load(_distill_config(teacher_dir), mesh)
    assert sources.detect(hf.path) == "hf_clip"
    np.testing.assert_allclose(hf.cfg.data.mean, ours.cfg.data.mean, rtol=1e-6)
    np.testing.assert_allclose(hf.cfg.data.std, ours.cfg.data.std, rtol=1e-6)
    a, b = tree.flatten(jax.device_get(hf.params)), tree.flatten(jax.device_get(ours.params))
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], rtol=1e-6, atol=1e-7, err_msg=path)


def test_the_teacher_forward_counts_in_the_step_flops():
    student, tcfg = tiny_config(), _teacher_config()
    extra = flops.train_flops_per_sample(student, 16, tcfg.model) - \
        flops.train_flops_per_sample(student, 16)
    assert extra == pytest.approx(flops.image_forward_flops(tcfg.model.image, 24)
                                  + flops.text_forward_flops(tcfg.model.text, 24))


def test_bad_teacher_settings_are_one_line_errors(teacher_dir, tmp_path):
    cfg = _distill_config("")
    with pytest.raises(config.ConfigError, match="set loss.teacher.path"):
        train.preflight(cfg)
    cfg.loss.teacher.path = str(tmp_path / "nowhere")
    with pytest.raises(config.ConfigError, match="not a directory"):
        train.preflight(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    longer = _distill_config(teacher_dir, **{"model.text.context_length": 24})
    with pytest.raises(config.ConfigError, match="context_length 20 is shorter"):
        teacher.load(longer, mesh)
    # A student with another tokenizer than the teacher's (CLIP BPE): a small WordPiece file.
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "dog"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({w: i for i, w in enumerate(words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[PAD]", "[UNK]"])
    tok.save(str(tmp_path / "tokenizer.json"))
    other = _distill_config(teacher_dir)
    other.data.tokenizer = config.ConfigDict({"kind": "hf",
                                              "path": str(tmp_path / "tokenizer.json")})
    with pytest.raises(config.ConfigError, match="tokenizer .* differs from the student's"):
        teacher.load(other, mesh)


def test_distill_demo_trains_and_logs_its_terms(teacher_dir, tmp_path, monkeypatch):
    """configs/distill_demo.py in a short form (Mod-X added): two steps on the small shapes set
    with the test's (random) teacher, beside the ring form of CLIP and in 2 micro-batches:
    finite, with the terms' diagnostics in the log."""
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    _, rows = train_short(f"{DISTILL_DEMO}:{teacher_dir}", [
        "train.batch_size=16", "train.microbatches=2", "loss.impl=ring", "loss.aux.modx=10"],
        str(tmp_path / "run"), logged=("loss", "loss_kd", "kd_agreement", "kd_teacher_acc",
                                       "loss_modx", "modx_screened_rows", "modx_screened_cols"))
    assert rows[0]["loss_kd"] > 0 and rows[0]["loss_modx"] >= 0
