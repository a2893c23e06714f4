"""Interop without torch: file format, lossless round trips, error paths, load API, init, CLI.

Runs on every leg. The PyTorch parity tests are in test_interop_parity.py.
"""

import json
import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxclip
from jaxclip import checkpoint, cli, config, optim, sharding, train, tree
from jaxclip.interop import export, hf_clip, init, mapping, openclip, sources, tensorfile
from tests.interop_util import TEXTS, random_params, tiny_clip_config, write_params_dir


@pytest.fixture(scope="module")
def model():
    cfg = tiny_clip_config("quick_gelu")
    return cfg, random_params(cfg, seed=0)


@pytest.fixture(scope="module")
def src(model, tmp_path_factory):
    return write_params_dir(tmp_path_factory.mktemp("src") / "params", *model)


@pytest.fixture(scope="module")
def hf_dir(src, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf") / "hf")
    export.export(src, out, "hf")
    return out


def test_tensorfile_reads_and_writes_what_the_safetensors_package_does(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
              "s": np.asarray(2.5, np.float32), "i": np.arange(5, dtype=np.int64),
              "h": np.ones((2, 0), np.float16)}
    tensorfile.save(tmp_path / "a.safetensors", arrays, {"format": "pt"})
    theirs = st.load_file(str(tmp_path / "a.safetensors"))
    for k, v in arrays.items():
        assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape, k
        np.testing.assert_array_equal(theirs[k], v)
    st.save_file(arrays, str(tmp_path / "b.safetensors"), metadata={"x": "y"})
    ours = tensorfile.read(tmp_path / "b.safetensors")
    assert tensorfile.read_header(tmp_path / "b.safetensors")[1] == {"x": "y"}
    for k, v in arrays.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v)
    bf = np.array([1.5, -2.0, 3.140625], ml_dtypes.bfloat16)
    tensorfile.save(tmp_path / "c.safetensors", {"b": bf})
    assert tensorfile.read_header(tmp_path / "c.safetensors")[0]["b"]["dtype"] == "BF16"
    np.testing.assert_array_equal(tensorfile.read(tmp_path / "c.safetensors")["b"], bf)


def test_tensorfile_stream_is_checked_against_its_declared_layout(tmp_path):
    path = tmp_path / "x.safetensors"
    specs = [("a", (2,), np.float32), ("b", (3,), np.float32)]
    with pytest.raises(ValueError, match="expected 'a', got 'b'"):
        tensorfile.write(path, specs, iter([("b", np.zeros(3, np.float32))]))
    with pytest.raises(ValueError, match=r"'b' is \(2,\) float32, declared \(3,\)"):
        tensorfile.write(path, specs, iter([("a", np.zeros(2, np.float32)),
                                            ("b", np.zeros(2, np.float32))]))
    assert not os.listdir(tmp_path)  # nothing half-written is left behind
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        tensorfile.read(tmp_path / "bad.safetensors")


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jaxclip_to_hf_to_jaxclip_is_bit_identical(model, hf_dir):
    cfg, params = model
    back = sources.read(hf_dir)
    assert back.kind == "hf_clip"
    _assert_same(params, back.params)
    for tower in ("image", "text"):
        for key in ("act", "ln_eps", "width", "depth", "heads", "mlp_ratio"):
            assert back.cfg.model[tower][key] == cfg.model[tower][key], (tower, key)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    assert hf["text_config"]["hidden_act"] == "quick_gelu"
    assert hf["text_config"]["eos_token_id"] == 49407 and hf["projection_dim"] == 32
    assert tensorfile.read_header(os.path.join(hf_dir, "model.safetensors"))[1] == \
        {"format": "pt"}
    assert len(tensorfile.read(os.path.join(hf_dir, "model.safetensors"))) == 78  # tensors of the tiny config


def test_jaxclip_to_open_clip_to_jaxclip_is_bit_identical_with_bias_and_eos_pooling(tmp_path):
    # A logit bias and a non-maximal EOT id (open_clip's "eos" pooling) are representable too.
    cfg = tiny_clip_config("gelu", logit_bias_init=-10.0, **{"text.eot_id": 3,
                                                              "image.ln_eps": 1e-6})
    params = random_params(cfg, seed=5)
    src = write_params_dir(tmp_path / "src", cfg, params)
    export.export(src, str(tmp_path / "oc"), "open_clip")
    with open(tmp_path / "oc" / "open_clip_config.json") as f:
        oc = json.load(f)["model_cfg"]
    assert oc["text_cfg"]["pool_type"] == "eos" and oc["text_cfg"]["eos_id"] == 3
    assert oc["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6} and oc["init_logit_bias"] == -10.0
    back = sources.read(str(tmp_path / "oc"))
    _assert_same(params, back.params)
    assert back.cfg.model.text.eot_id == 3 and back.cfg.model.image.ln_eps == 1e-6
    with pytest.raises(ValueError, match="logit_bias_init"):
        export.export(src, str(tmp_path / "hf"), "hf")


def test_export_names_every_feature_the_format_cannot_represent(tmp_path):
    cfg = tiny_clip_config("gelu", **{"image.pool": "map", "text.proj_bias": True,
                                      "text.pool": "mean", "image.act": "quick_gelu"})
    with pytest.raises(ValueError) as e:
        hf_clip.hf_config(cfg.model, 0.0)
    for feature in ("model.image.pool='map'", "model.text.proj_bias", "model.text.pool='mean'"):
        assert feature in str(e.value)
    with pytest.raises(ValueError, match="image.act='quick_gelu' differs"):
        openclip.open_clip_config(cfg.model, 32, (0, 0, 0), (1, 1, 1))
    bert = tiny_clip_config(**{"text.kind": "bert", "text.pool": "mean", "text.causal": False,
                               "text.head": "linear", "image.head": "mlp"})
    with pytest.raises(ValueError) as e:
        hf_clip.hf_config(bert.model, 0.0)
    for feature in ("model.text.kind='bert'", "model.text.head='linear'",
                    "model.image.head='mlp'", "model.text.causal=False"):
        assert feature in str(e.value)
    # Through the command, before any weights are read.
    write_params_dir(tmp_path / "p", bert, random_params(bert))
    with pytest.raises(ValueError, match="cannot export to a HF CLIPModel"):
        export.export(str(tmp_path / "p"), str(tmp_path / "out"), "hf")
    assert not os.path.exists(tmp_path / "out")


def test_import_lists_unknown_missing_and_misshaped_tensors(hf_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    tensors = {k: np.array(v) for k, v in tensorfile.read(bad / "model.safetensors").items()}
    del tensors["text_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["text_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((255, 64), np.float32)
    tensors["vision_model.extra_head.weight"] = np.zeros(3, np.float32)
    tensors["text_model.embeddings.position_ids"] = np.arange(32)  # a known buffer: ignored
    tensorfile.save(bad / "model.safetensors", tensors)
    with pytest.raises(mapping.MappingError) as e:
        sources.read(str(bad))
    msg = str(e.value)
    assert "unknown tensors (no jaxclip parameter maps to them) (1):\n" \
           "    vision_model.extra_head.weight" in msg
    assert "missing tensors (1):\n    text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "text_model.encoder.layers.0.mlp.fc1.weight (255, 64); expected " \
           "text_model.encoder.layers.0.mlp.fc1.weight (256, 64)" in msg
    assert "position_ids" not in msg


def test_hf_config_translation_rejects_what_jaxclip_lacks():
    hf = {"model_type": "clip", "text_config": {"hidden_act": "gelu_new"}}
    with pytest.raises(ValueError, match="text_config.hidden_act='gelu_new'"):
        hf_clip.model_config(hf)
    legacy = hf_clip.model_config({"model_type": "clip", "text_config": {"eos_token_id": 2}})
    assert legacy["text"]["eot_id"] == 49407  # HF pools at argmax(ids) for eos id 2
    with pytest.raises(ValueError, match="attentional_pool=True"):
        openclip.model_config({"embed_dim": 8, "vision_cfg": {"attentional_pool": True}})


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory):
    """A workdir whose checkpoint was saved from parameters sharded over 8 devices (fsdp)."""
    cfg, params = model
    cfg = config.from_dict(cfg.to_dict())
    cfg.model.image.locked = True  # part of the parameters live in `frozen`
    path = str(tmp_path_factory.mktemp("wd") / "run")
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    m = train.build(cfg, mesh)
    shardings = tree.flatten(m.param_shardings)
    placed = {p: jax.device_put(v, shardings[p]) for p, v in params.items()}
    trainable, frozen = optim.split_trainable(tree.unflatten(placed), cfg)
    state = train.TrainState(jax.numpy.int32(7), trainable, frozen, m.tx.init(trainable))
    assert state.params["text"]["token_embed"].sharding.spec != jax.sharding.PartitionSpec()
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json(cfg))
    ckpt = checkpoint.Checkpointer(path, every=1, keep=2)
    ckpt.save(7, state, data={"next_step": 7}, config=cfg.to_dict(), progress={}, force=True)
    ckpt.close()
    return path


def test_export_from_a_sharded_workdir_checkpoint(model, workdir, tmp_path):
    _, params = model
    assert cli.main(["export", "--workdir", workdir, "--format", "hf", "--out",
                     str(tmp_path / "hf")]) == 0
    _assert_same(params, sources.read(str(tmp_path / "hf")).params)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; available: \[7\]"):
        export.export(workdir, str(tmp_path / "x"), "hf", step=3)


def test_load_api_embeds_like_the_model_from_every_source(model, src, hf_dir, workdir):
    cfg, _ = model
    enc = jaxclip.load(src)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pixels = enc.preprocess(images)
    mean = np.asarray(cfg.data.mean, np.float32) * 255
    std = np.asarray(cfg.data.std, np.float32) * 255
    np.testing.assert_allclose(pixels, (images - mean) / std, rtol=1e-6, atol=1e-6)
    assert enc.preprocess([rng.integers(0, 256, (48, 40), dtype=np.uint8)]).shape == \
        (1, 32, 32, 3)  # grayscale, resized and centre-cropped
    img = enc.encode_image(pixels)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(enc.encode_image(pixels, batch_size=2), img, atol=1e-6)
    tokens = enc.tokenize(TEXTS)
    txt = enc.encode_text(tokens)
    hf_pad = np.where(tokens == 0, 49407, tokens)  # HF pads with EOT; first-EOT pooling
    np.testing.assert_allclose(enc.encode_text(hf_pad), txt, atol=1e-6)
    np.testing.assert_array_equal(enc.embed_texts(TEXTS), txt)
    for other in (jaxclip.load(hf_dir), jaxclip.load(workdir, step=7)):
        np.testing.assert_array_equal(other.encode_image(pixels), img)
        np.testing.assert_array_equal(other.encode_text(tokens), txt)
    with pytest.raises(ValueError, match="run preprocess"):
        enc.encode_image(images)
    with pytest.raises(ValueError, match="exceed the context length 32"):
        enc.encode_text(np.zeros((1, 40), np.int32))


def test_init_loads_the_selected_parameters_and_checks_them(model, src, tmp_path):
    cfg, params = model
    run = config.from_dict(cfg.to_dict())
    run.init.update(path=src, select="^text/")
    run.model.text.locked = True
    m = train.build(run, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1),
                                            devices=jax.devices()[:1]))
    fresh = train.init_state(m)
    state = init.apply(m, fresh)
    got = tree.flatten(jax.device_get(tree.merge(state.params, state.frozen)))
    before = tree.flatten(jax.device_get(tree.merge(fresh.params, fresh.frozen)))
    for p in got:
        expected = params[p] if p.startswith("text/") else before[p]
        np.testing.assert_array_equal(got[p], expected, err_msg=p)

    def error(select="^text/", **model_overrides):
        bad = config.from_dict(run.to_dict())
        bad.init.select = select
        for k, v in model_overrides.items():
            config.apply_override(bad, f"model.{k}={v}")
        with pytest.raises(ValueError) as e:
            init.load_selected(bad)
        return str(e.value)

    assert "matches none" in error(select="^nothing/")
    msg = error(**{"text.act": "gelu", "text.width": 128, "text.heads": 8})
    assert "model.text.act is 'gelu' in this run but 'quick_gelu'" in msg
    assert "text/token_embed: checkpoint (49408, 64), model (49408, 128)" in msg
    msg = error(select="^(text|image_head)/", **{"image.head": "linear"})
    assert "missing parameters (selected, not in the checkpoint) (2):" in msg
    assert "image_head/proj/kernel" in msg
    msg = error(**{"text.head": "linear"})
    assert "unknown parameters (not in this run's model) (1):\n    text/proj" in msg


def test_cli_convert_writes_a_params_dir(hf_dir, tmp_path, caplog):
    out = str(tmp_path / "conv")
    assert cli.main(["convert", "--from", "hf", hf_dir, "--out", out,
                     "--context-length", "16"]) == 0
    pre = sources.read(out)
    assert pre.kind == "jaxclip" and pre.params["text/pos_embed"].shape == (16, 64)
    assert pre.cfg.model.text.context_length == 16
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model"]["text"]["act"] == "quick_gelu"
    with pytest.raises(ValueError, match="is a hf_clip directory, not open_clip"):
        sources.convert(hf_dir, out, source_format="open_clip")
    # A logit scale beyond open_clip's clamp is copied verbatim, with a warning.
    tensors = dict(tensorfile.read(os.path.join(out, "params.safetensors")))
    tensors["logit_scale"] = np.asarray(5.0, np.float32)
    tensorfile.save(os.path.join(out, "params.safetensors"), tensors)
    sources.warn_logit_scale(sources.read(out).params, config.defaults().loss, out)
    assert f"exceeds loss.scale_max {math.log(100):.4f}" in caplog.text
