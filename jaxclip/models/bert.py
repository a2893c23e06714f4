"""A BERT-style text tower (`model.text.kind = "bert"`), e.g. for a pretrained sentence encoder.

Differences from the CLIP text tower (text.py), all as in HF `BertModel`:
  * embeddings: token + position + token-type embedding of segment 0 (every caption is a single
    segment, so only row 0 of BERT's token-type table is kept), then a LayerNorm;
  * post-LN blocks: x = LN1(x + attn(x)); x = LN2(x + mlp(x)), bidirectional attention with
    padding keys (tokens equal to pad_id, at the right) masked out;
  * no final LayerNorm; pooling is the mean over real tokens (sentence-transformers' pooling)
    or the first token ([CLS]), per `model.text.pool`.
Activation and LayerNorm eps come from the config (`act`, `ln_eps`), which an importer fills from
the checkpoint's config.json (MiniLM: exact GELU, eps 1e-12).

Parameters use the same names and stacked layout as the CLIP blocks (`blocks/attn/query/kernel`
(L, w, heads, head_dim), `blocks/ln_1`, ...), so sharding rules, locking regexes and layer-wise
lr decay apply unchanged. The call signature is TextTower's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import sharding
from jaxclip.models import layers as L
from jaxclip.models.text import check_context_length

_STD = 0.02  # BERT's initializer_range, for towers trained from scratch


class PostLNTransformer(nnx.Module):
    """`depth` post-LN residual blocks, stacked on a leading layers axis."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_ratio: float, act: str,
                 ln_eps: float):
        self.attn = L.Attention(width, heads, std=_STD, out_std=_STD, layers=depth)
        self.ln_1 = L.LayerNorm(width, eps=ln_eps, layers=depth)
        self.mlp = L.MLP(width, int(width * mlp_ratio), std=_STD, out_std=_STD, layers=depth)
        self.ln_2 = L.LayerNorm(width, eps=ln_eps, layers=depth)
        self.act = act
        self.eps = ln_eps

    def __call__(self, x: jax.Array, *, kv_lengths: jax.Array | None, scan: bool = True,
                 remat: str = "none", attn_impl: str = "xla") -> jax.Array:
        act = L.activation(self.act)
        eps = self.eps

        def block(x, p):
            x = x + L.attention(p["attn"], x, x, kv_lengths=kv_lengths, impl=attn_impl)
            x = L.layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], eps)
            x = x + L.mlp(p["mlp"], x, act)
            return L.layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], eps)

        return L.run_blocks(block, self, x, scan=scan, remat=remat)


class BertTower(nnx.Module):
    def __init__(self, cfg, embed_dim: int):
        w = cfg.width
        self.token_embed = L.param(L.normal(_STD), (cfg.vocab_size, w), ("vocab", "embed"))
        self.pos_embed = L.param(L.normal(_STD), (cfg.context_length, w), (None, "embed"))
        self.type_embed = L.param(L.normal(_STD), (w,), ("embed",))
        self.ln_embed = L.LayerNorm(w, eps=cfg.ln_eps)
        self.blocks = PostLNTransformer(width=w, depth=cfg.depth, heads=cfg.heads,
                                        mlp_ratio=cfg.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps)
        # Without a separate head the tower projects itself, like the CLIP text tower.
        self.proj = (L.param(L.normal(w**-0.5), (w, embed_dim), ("embed", "joint"))
                     if cfg.head == "none" else None)
        if cfg.proj_bias:
            raise ValueError("model.text.proj_bias is not supported by the bert text tower; "
                             "use model.text.head='linear' for a biased projection")
        self.pool = cfg.pool
        self.pad_id = cfg.pad_id
        self.context_length = cfg.context_length

    def __call__(self, tokens: jax.Array, *, dtype=jnp.float32, scan=True, remat="none",
                 attn_impl="xla", return_tokens=False):
        """tokens: (B, T) int32, right-padded with pad_id. Returns (pooled, tokens, mask)."""
        T = check_context_length(tokens, self.context_length)
        mask = tokens != self.pad_id
        x = jnp.take(self.token_embed[...], tokens, axis=0)
        x = x + self.pos_embed[...][:T] + self.type_embed[...]
        x = sharding.constrain(self.ln_embed(x.astype(dtype)), L.ACT)
        x = self.blocks(x, kv_lengths=mask.sum(-1).astype(jnp.int32), scan=scan, remat=remat,
                        attn_impl=attn_impl)
        pooled = x[:, 0] if self.pool == "first" else L.masked_mean(x, mask, axis=1)
        if self.proj is None:
            return pooled, x if return_tokens else None, mask
        proj = self.proj[...].astype(dtype)
        return pooled @ proj, x @ proj if return_tokens else None, mask
