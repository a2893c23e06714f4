"""Shared pieces of the interop tests: the tiny CLIP config and random weights.

Random parameters are drawn in numpy straight from the model's abstract shapes (no jit), and
every LayerNorm scale and bias and every linear bias is perturbed away from 1 / 0, so a mapping
that swaps a LayerNorm's weight and bias, or drops a bias, changes the embeddings.
"""

import jax
import numpy as np
from flax import nnx

from jaxclip import config, tree
from jaxclip.interop import sources

TEXTS = ["a photo of a cat", "a diagram", "two dogs playing in the snow on a sunny day", "x",
         "A LARGE red circle, above a small blue square!"]
LOGIT_SCALE = 2.6592  # HF's logit_scale_init_value: exp = 14.28; parity errors grow with it


def tiny_clip_config(act="gelu", **model):
    """The tiny parity model: both towers width 64, 2 layers, 4 heads, MLP 256; image 32, patch 8;
    text context 32, CLIP vocabulary; projection 32."""
    cfg = config.defaults()
    cfg.model.update(embed_dim=32, logit_scale_init=LOGIT_SCALE)
    cfg.model.image.update(image_size=32, patch_size=8, width=64, depth=2, heads=4, act=act)
    cfg.model.text.update(context_length=32, width=64, depth=2, heads=4, act=act)
    for key, value in model.items():
        config.apply_override(cfg, f"model.{key}={value}")
    config.validate(cfg)
    return cfg


def random_params(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in sources.model_shapes(cfg.model).items():
        if path == "logit_scale":
            out[path] = np.float32(LOGIT_SCALE) * np.ones((), np.float32)
        elif path == "logit_bias":
            out[path] = np.full((), -3.25, np.float32)
        elif path.endswith("/scale"):
            out[path] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = 0.1 if path.endswith("/bias") or len(shape) < 2 else 0.08
            out[path] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_params_dir(path, cfg, params) -> str:
    sources.write(sources.Pretrained("jaxclip", "test", cfg, params), str(path))
    return str(path)


def bert_features(pre, ids) -> np.ndarray:
    """The pooled, unprojected output of an imported BERT text tower (its `head` is separate)."""
    from jaxclip.models.bert import BertTower

    text_cfg = pre.cfg.model.text
    assert text_cfg.head != "none", "the imported BERT tower has no projection of its own"
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: BertTower(text_cfg, pre.cfg.model.embed_dim)))
    params = tree.unflatten(pre.params)["text"]
    run = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    return np.asarray(run(params, np.asarray(ids, np.int32)))
