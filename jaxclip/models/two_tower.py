"""The dual encoder: image tower + text tower + a learnable logit scale (and optional bias).

Returns L2-normalised embeddings in float32 together with the loss parameters, as an `Encoded`
pytree that every registered objective consumes. Token-level features (FILIP-style objectives) are
only computed when asked for.

`logit_scale` is stored in log space (init ln(1/0.07); SigLIP ln 10) and `logit_bias` exists only
when `model.logit_bias_init` is set. With `loss.scale_param = "temperature"` (ALIGN) the same
parameter holds the temperature itself; the loss, not the model, interprets it.

Each modality's tower comes from the tower registry (towers.py) by `model.<modality>.kind`: the
ViT (image.py), the CLIP transformer (text.py) or a BERT encoder (bert.py). A tower
with `head != "none"` returns unprojected features and a separate head (heads.py, `image_head` /
`text_head`) projects them; a locked tower is cut off by stop_gradient before its head, so no
backward pass is built through it while the head trains.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import sharding
from jaxclip.models import towers
from jaxclip.models.bert import BertTower
from jaxclip.models.heads import Head
from jaxclip.models.image import ImageTower
from jaxclip.models.init import draw_params
from jaxclip.models.text import TextTower

# The built-in towers. Their modules do not import the registry, so that a tower module stays a
# plain model file; a new tower registers itself with `@towers.register(...)` in its own module.
towers.register("vit", modality="image",
                embeddings=("patch_embed", "cls_token", "pos_embed", "ln_pre"))(ImageTower)
towers.register("clip", modality="text", embeddings=("token_embed", "pos_embed"))(TextTower)
towers.register("bert", modality="text",
                embeddings=("token_embed", "pos_embed", "type_embed", "ln_embed"))(BertTower)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Encoded:
    image_emb: jax.Array  # (B, E) L2-normalised, float32
    text_emb: jax.Array  # (B, E) L2-normalised, float32
    logit_scale: jax.Array  # () raw parameter (log-scale or temperature)
    logit_bias: jax.Array | None = None  # ()
    image_tokens: jax.Array | None = None  # (B, N_patches, E) L2-normalised per token
    text_tokens: jax.Array | None = None  # (B, T, E) L2-normalised per token
    text_mask: jax.Array | None = None  # (B, T) bool, real tokens


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _embeddings(emb: jax.Array, tokens: jax.Array | None):
    """L2-normalised output embeddings, pinned to the batch split the loss expects."""
    emb = sharding.constrain(l2_normalize(emb), ("act_batch", None))
    if tokens is not None:
        tokens = sharding.constrain(l2_normalize(tokens), ("act_batch", None, None))
    return emb, tokens


class TwoTower(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs | int | None):
        """cfg: the `model` section of a jaxclip config; rngs: an `nnx.Rngs` (its `params`
        stream) or an int seed from which every parameter is drawn. `rngs=None` leaves the random
        parameters at zero: only for shapes (`nnx.eval_shape`) or when a checkpoint's values
        replace them at once."""
        for modality in towers.MODALITIES:
            setattr(self, modality, towers.build(cfg, modality))
        # Heads live outside the towers' subtrees, so a locked tower's head still trains.
        self.image_head = (Head(cfg.image.head, cfg.image.width, cfg.embed_dim,
                                ln_eps=cfg.image.ln_eps, text=False)
                           if cfg.image.head != "none" else None)
        self.text_head = (Head(cfg.text.head, cfg.text.width, cfg.embed_dim,
                               ln_eps=cfg.text.ln_eps, text=True)
                          if cfg.text.head != "none" else None)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32), axes=(),
                                     init=("value",))
        self.logit_bias = (nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32), axes=(),
                                     init=("value",))
                           if cfg.logit_bias_init is not None else None)
        self.dtype = jnp.dtype(cfg.dtype)
        # Each tower's remat policy: its own `remat` when set, else model.remat. attn_impl "auto"
        # is resolved per attention call (layers.resolve_attn_impl: backend, dtype, head dim).
        run = dict(scan=cfg.scan_layers, attn_impl=cfg.attn_impl)
        self.image_run = dict(run, remat=cfg.image.get("remat") or cfg.remat)
        self.text_run = dict(run, remat=cfg.text.get("remat") or cfg.remat)
        self.locked = (cfg.image.locked, cfg.text.locked)
        if rngs is not None:
            draw_params(self, rngs)

    def encode_image(self, images: jax.Array, *, return_tokens: bool = False):
        # The parameters are traced with the step's mesh: activation constraints apply inside.
        with sharding.activation_mesh(self.logit_scale[...]):
            head = self.image_head
            want = return_tokens or (head is not None and head.kind == "patch_mlp")
            emb, tokens = self.image(images, dtype=self.dtype, return_tokens=want,
                                     **self.image_run)
            if self.locked[0]:
                emb, tokens = jax.lax.stop_gradient((emb, tokens))
            if head is not None:
                emb, tokens = head(emb, tokens)
            tokens = tokens if return_tokens else None
            return _embeddings(emb, tokens)

    def encode_text(self, text: jax.Array, *, return_tokens: bool = False):
        with sharding.activation_mesh(self.logit_scale[...]):
            head = self.text_head
            want = return_tokens or (head is not None and head.kind == "patch_mlp")
            emb, tokens, mask = self.text(text, dtype=self.dtype, return_tokens=want,
                                          **self.text_run)
            if self.locked[1]:
                emb, tokens = jax.lax.stop_gradient((emb, tokens))
            if head is not None:
                emb, tokens = head(emb, tokens, mask)
            tokens = tokens if return_tokens else None
            return (*_embeddings(emb, tokens), mask)

    def __call__(self, images: jax.Array, text: jax.Array, *, return_tokens: bool = False):
        img, img_tok = self.encode_image(images, return_tokens=return_tokens)
        txt, txt_tok, mask = self.encode_text(text, return_tokens=return_tokens)
        return Encoded(
            image_emb=img,
            text_emb=txt,
            logit_scale=self.logit_scale[...],
            logit_bias=None if self.logit_bias is None else self.logit_bias[...],
            image_tokens=img_tok,
            text_tokens=txt_tok,
            text_mask=mask if return_tokens else None,
        )
