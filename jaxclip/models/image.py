"""The image tower: a pre-LN Vision Transformer (open_clip's `VisionTransformer` layout).

patchify (a stride-p convolution without bias, written as a reshape + einsum over an HWIO kernel)
-> [class token] + learned position embedding -> ln_pre -> blocks -> ln_post on every token
-> pool (CLS token, mean of patch tokens, or a MAP attention-pooling head) -> projection (no bias).

`ln_post` is applied to all tokens before pooling; for CLS pooling that equals HF's
`post_layernorm` on the pooled token, because LayerNorm acts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import sharding
from jaxclip.models import layers as L


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, act: str, ln_eps: float):
        std = width**-0.5
        self.probe = L.param(L.normal(0.02), (1, width), (None, "embed"))
        self.attn = L.Attention(width, heads, std=std, out_std=std)
        self.ln = L.LayerNorm(width, eps=ln_eps)
        self.mlp = L.MLP(width, int(width * mlp_ratio), std=(2 * width) ** -0.5, out_std=std)
        self.act = act

    def __call__(self, x: jax.Array, attn_impl: str) -> jax.Array:
        p = nnx.to_pure_dict(nnx.state(self))
        probe = jnp.broadcast_to(p["probe"].astype(x.dtype), (x.shape[0], *p["probe"].shape))
        y = L.attention(p["attn"], probe, x, impl=attn_impl)
        y = y + L.mlp(p["mlp"], self.ln(y), L.activation(self.act))
        return y[:, 0]


class ImageTower(nnx.Module):
    def __init__(self, cfg, embed_dim: int):
        w, p = cfg.width, cfg.patch_size
        grid = cfg.image_size // p
        n_tokens = grid * grid + int(cfg.class_token)
        self.patch_embed = L.param(L.normal((3 * p * p) ** -0.5), (p, p, 3, w),
                                   (None, None, None, "embed"))
        self.cls_token = L.param(L.normal(w**-0.5), (w,), ("embed",)) if cfg.class_token else None
        self.pos_embed = L.param(L.normal(w**-0.5), (n_tokens, w), (None, "embed"))
        self.ln_pre = L.LayerNorm(w, eps=cfg.ln_eps)
        self.blocks = L.Transformer(width=w, depth=cfg.depth, heads=cfg.heads,
                                    mlp_ratio=cfg.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps)
        self.ln_post = L.LayerNorm(w, eps=cfg.ln_eps)
        self.map_head = (MAPHead(w, cfg.heads, cfg.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps)
                         if cfg.pool == "map" else None)
        # With a separate head (models/heads.py) the tower returns unprojected features.
        self.proj = (L.param(L.normal(w**-0.5), (w, embed_dim), ("embed", "joint"))
                     if cfg.head == "none" else None)
        self.patch_size = p
        self.image_size = cfg.image_size
        self.pool = cfg.pool
        if cfg.pool == "cls" and not cfg.class_token:
            raise ValueError("model.image.pool='cls' needs model.image.class_token=True")

    def __call__(self, images: jax.Array, *, dtype=jnp.float32, scan=True, remat="none",
                 attn_impl="xla", return_tokens=False, project=True):
        """images: (B, H, W, 3) float, normalised. Returns (pooled (B, E), patch tokens or None).
        `project=False` returns the features before the tower's own projection (width F), for
        a head that reads them (the view head of an image-image term); `project` maps them."""
        B, H, W, C = images.shape
        if (self.image_size, self.image_size, 3) != (H, W, C):
            raise ValueError(f"image tower expects (B, {self.image_size}, {self.image_size}, 3) "
                             f"images, got {images.shape}")
        p = self.patch_size
        x = images.astype(dtype).reshape(B, H // p, p, W // p, p, C)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (H // p) * (W // p), p, p, C)
        x = jnp.einsum("bnhwc,hwcd->bnd", x, self.patch_embed[...].astype(dtype))
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (B, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.pos_embed[...].astype(dtype)
        x = sharding.constrain(self.ln_pre(x), L.ACT)
        x = self.blocks(x, scan=scan, remat=remat, attn_impl=attn_impl)
        x = self.ln_post(x)
        patches = x[:, 1:] if self.cls_token is not None else x
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "mean":
            pooled = patches.mean(axis=1)
        else:
            pooled = self.map_head(x, attn_impl)
        features = pooled, patches if return_tokens else None
        return self.project(*features, dtype=dtype) if project else features

    def project(self, pooled: jax.Array, tokens: jax.Array | None, *, dtype=jnp.float32):
        """The tower's own projection (none with a separate head) of pooled and token features."""
        if self.proj is None:
            return pooled, tokens
        proj = self.proj[...].astype(dtype)
        return pooled @ proj, None if tokens is None else tokens @ proj
