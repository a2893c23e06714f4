"""The towers: output shapes, normalisation, masking, pooling variants, execution modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclip import config
from jaxclip.models import SIZES, build_model
from jaxclip.models import layers as L
from tests.helpers import jitted, random_tokens, tiny_config


def _inputs(cfg, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.model.image.image_size
    images = jnp.asarray(rng.normal(size=(batch, s, s, 3)), jnp.float32)
    tokens = jnp.asarray(random_tokens(rng, batch, cfg.model.text.context_length))
    return images, tokens


def test_shapes_and_unit_norm():
    cfg = tiny_config()
    model = build_model(cfg.model)
    images, tokens = _inputs(cfg)
    out = jitted(model, return_tokens=True)(images, tokens)
    assert out.image_emb.shape == (3, 32) and out.text_emb.shape == (3, 32)
    assert out.tokens["image"].shape == (3, 16, 32)  # 4x4 patches, CLS dropped
    assert out.tokens["text"].shape == (3, 12, 32) and out.masks["text"].shape == (3, 12)
    np.testing.assert_allclose(jnp.linalg.norm(out.image_emb, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(out.tokens["text"], axis=-1), 1.0, rtol=1e-6)
    assert out.logit_scale.shape == () and out.logit_bias is None
    np.testing.assert_allclose(out.logit_scale, np.log(1 / 0.07), rtol=1e-6)


@pytest.mark.parametrize("pool, causal", [("eot", True), ("eot", False), ("mean", False),
                                          ("first", False)])
def test_padding_tokens_change_nothing(pool, causal):
    cfg = tiny_config(**{"model.text.pool": pool, "model.text.causal": causal})
    model = build_model(cfg.model)
    encode = jitted(model, "encode_text")
    _, tokens = _inputs(cfg, batch=6)
    emb, _, mask = encode(tokens)
    mask = np.asarray(mask)
    if pool == "eot":  # whatever follows EOT is padding and must not matter
        noisy = np.where(mask, tokens, 7)
        np.testing.assert_array_equal(encode(jnp.asarray(noisy))[0], emb)
    # A shorter context (dropping pure padding) gives the same embedding.
    fits = ~mask[:, 7:].any(-1)  # rows whose real tokens all lie in the first 7 positions
    assert fits.any() and not fits.all()
    short = encode(jnp.asarray(tokens[:, :7]))[0]
    np.testing.assert_allclose(short[fits], emb[fits], atol=2e-6)


def test_text_real_tokens_do_matter():
    cfg = tiny_config()
    encode = jitted(build_model(cfg.model), "encode_text")
    _, tokens = _inputs(cfg, batch=2)
    changed = tokens.at[:, 0].set(5)
    assert not np.allclose(encode(changed)[0], encode(tokens)[0])


@pytest.mark.parametrize("pool", ["cls", "mean", "map"])
def test_image_pooling_variants(pool):
    cfg = tiny_config(**{"model.image.pool": pool})
    model = build_model(cfg.model)
    images, _ = _inputs(cfg)
    emb, _ = jitted(model, "encode_image")(images)
    assert emb.shape == (3, 32) and np.all(np.isfinite(emb))
    if pool == "map":
        assert "map_head" in nnx.to_pure_dict(nnx.state(model))["image"]


def test_scan_equals_loop_and_remat_equals_plain():
    cfg = tiny_config()
    images, tokens = _inputs(cfg)
    ref = build_model(cfg.model)
    params = nnx.to_pure_dict(nnx.state(ref))

    def loss(p, variant):
        c = tiny_config(**variant)
        m = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(c.model))), p)
        out = m(images, tokens)
        return jnp.sum(out.image_emb * out.text_emb)

    def value_and_grad(variant):
        return jax.jit(jax.value_and_grad(lambda p: loss(p, variant)))(params)

    base, gbase = value_and_grad({})
    for variant in ({"model.scan_layers": False}, {"model.remat": "full"}):
        v, g = value_and_grad(variant)
        np.testing.assert_allclose(v, base, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gbase)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_is_close():
    cfg = tiny_config()
    images, tokens = _inputs(cfg)
    f32 = build_model(cfg.model)
    bf = build_model(tiny_config(**{"model.dtype": "bfloat16"}).model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf)))
    a, b = jitted(f32)(images, tokens), jitted(bf)(images, tokens)
    assert b.image_emb.dtype == jnp.float32  # embeddings are normalised in float32
    cos = jnp.sum(a.image_emb * b.image_emb, -1)
    assert float(cos.min()) > 0.98


def test_siglip_bias_and_quick_gelu():
    cfg = tiny_config(**{"model.logit_bias_init": -10.0, "model.logit_scale_init": 2.302585,
                         "model.image.act": "quick_gelu", "model.text.proj_bias": True})
    model = build_model(cfg.model)
    images, tokens = _inputs(cfg)
    out = jitted(model)(images, tokens)
    assert float(out.logit_bias) == -10.0
    assert "proj_bias" in nnx.to_pure_dict(nnx.state(model))["text"]


def test_wrong_image_size_and_overlong_text_are_errors():
    cfg = tiny_config()
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match="image tower expects"):
        model.encode_image(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model.encode_text(jnp.zeros((1, 13), jnp.int32))


def test_registry_sizes_have_open_clip_parameter_counts():
    # Parameter counts in millions, from open_clip's docs/model_profile.csv.
    expected = {"ViT-B-32": 151.28, "ViT-B-16": 149.62, "ViT-L-14": 427.62, "ViT-H-14": 986.11}
    for name, millions in expected.items():
        cfg = config.defaults()
        config._merge(cfg, {"model": SIZES[name]})
        abstract = nnx.eval_shape(lambda c=cfg: build_model(c.model))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
        assert abs(n / 1e6 - millions) < 0.01, (name, n)


def test_masked_mean_counts_real_positions_only():
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[True, True, False], [False, False, False]])
    mean = L.masked_mean(x, mask, axis=1)
    np.testing.assert_allclose(mean[0], x[0, :2].mean(0))
    np.testing.assert_array_equal(mean[1], 0.0)  # nothing to average: 0, not NaN
    np.testing.assert_allclose(L.masked_mean(x[..., 0], mask), x[0, :2, 0].mean())


def test_image_views_through_the_view_head():
    """data.views > 1: the view head maps every view, view 0 alone gives the image-text
    embedding (the one-view model's), and a model without the head has no such parameters."""
    plain_cfg = tiny_config()
    cfg = tiny_config(**{"model.image.view_head.out": 8, "model.image.view_head.hidden": 16})
    plain, model = build_model(plain_cfg.model), build_model(cfg.model)
    state, plain_state = (nnx.to_pure_dict(nnx.state(m)) for m in (model, plain))
    assert "view_head" not in plain_state  # old checkpoints' layout, unchanged
    assert sorted(state["view_head"]) == ["fc0", "fc1", "fc2", "ln0", "ln1"]
    assert state["view_head"]["fc0"]["kernel"].shape == (32, 16)
    # Parameters are drawn in path order and view_head sorts last: the towers start the same.
    for a, b in zip(jax.tree.leaves({k: v for k, v in state.items() if k != "view_head"}),
                    jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(1)
    views = jnp.asarray(rng.normal(size=(3, 2, 16, 16, 3)), jnp.float32)
    out = jitted(model, "encode_all")({"image": views})
    assert out.emb["image_views"].shape == (3, 2, 8)
    np.testing.assert_allclose(jnp.linalg.norm(out.emb["image_views"], axis=-1), 1.0, rtol=1e-6)
    one = jitted(plain, "encode_image")(views[:, 0])[0]
    np.testing.assert_allclose(out.emb["image"], one, atol=1e-5)
    assert not np.allclose(out.emb["image_views"][:, 0], out.emb["image_views"][:, 1])
    with pytest.raises(ValueError, match="needs a view head"):
        plain.encode_all({"image": views})
