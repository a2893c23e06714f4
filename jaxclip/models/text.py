"""The text tower: token + position embedding, a pre-LN transformer, final LN, pool, projection.

Pooling and masking follow the tokenizer's conventions (`model.text.pool`):
  eot    the first end-of-text token (CLIP; open_clip's argmax and HF's first-EOS agree, since EOT
         49407 is the largest id). Tokens after it are padding.
  last   the last position (big_vision SigLIP with "sticky" EOS padding; no padding mask).
  first  the first position (BERT-style [CLS]); tokens equal to pad_id are padding.
  mean   mean over tokens that are not pad_id.
Padding is always at the right, so it is masked by per-example key lengths, which is also the form
the fused cuDNN kernel accepts. With a causal mask and EOT pooling the padding cannot reach the
pooled token anyway; the key lengths make non-causal towers padding-invariant too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import sharding
from jaxclip.models import layers as L


def valid_mask(tokens: jax.Array, pool: str, eot_id: int, pad_id: int) -> jax.Array:
    """(B, T) bool: which positions hold real tokens."""
    T = tokens.shape[-1]
    pos = jnp.arange(T)
    if pool == "eot":
        is_eot = tokens == eot_id
        # A sequence without EOT (not produced by our tokenizers) is treated as all valid.
        eot_pos = jnp.where(is_eot.any(-1), jnp.argmax(is_eot, axis=-1), T - 1)
        return pos[None, :] <= eot_pos[:, None]
    if pool == "last":
        return jnp.ones(tokens.shape, bool)
    return tokens != pad_id


def check_context_length(tokens: jax.Array, context_length: int) -> int:
    """The length T of (B, T) tokens, which the position table must cover."""
    T = tokens.shape[1]
    if context_length < T:
        raise ValueError(f"text of length {T} exceeds the context length {context_length} of "
                         "the text tower")
    return T


class TextTower(nnx.Module):
    def __init__(self, cfg, embed_dim: int):
        w = cfg.width
        self.token_embed = L.param(L.normal(0.02), (cfg.vocab_size, w), ("vocab", "embed"))
        self.pos_embed = L.param(L.normal(0.01), (cfg.context_length, w), (None, "embed"))
        self.blocks = L.Transformer(width=w, depth=cfg.depth, heads=cfg.heads,
                                    mlp_ratio=cfg.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps)
        self.ln_final = L.LayerNorm(w, eps=cfg.ln_eps)
        # With a separate head (models/heads.py) the tower returns unprojected features.
        own = cfg.head == "none"
        self.proj = L.param(L.normal(w**-0.5), (w, embed_dim), ("embed", "joint")) if own else None
        self.proj_bias = (L.param(L.zeros, (embed_dim,), ("joint",))
                          if cfg.proj_bias and own else None)
        self.causal = cfg.causal
        self.pool = cfg.pool
        self.eot_id = cfg.eot_id
        self.pad_id = cfg.pad_id
        self.context_length = cfg.context_length

    def __call__(self, tokens: jax.Array, *, dtype=jnp.float32, scan=True, remat="none",
                 attn_impl="xla", return_tokens=False):
        """tokens: (B, T) int32, T <= context_length. Returns (pooled, token features, mask)."""
        T = check_context_length(tokens, self.context_length)
        mask = valid_mask(tokens, self.pool, self.eot_id, self.pad_id)
        # The table is gathered out of its FSDP shards (in the compute dtype) before the lookup,
        # so the lookup runs on each device's own rows; a lookup into the fsdp-split table
        # all-gathered the token ids of the whole global batch instead.
        table = sharding.gather_weight(self.token_embed[...], ("vocab", "embed"), dtype)
        x = jnp.take(table, tokens, axis=0)
        x = sharding.constrain(x + self.pos_embed[...][:T].astype(dtype), L.ACT)
        kv_lengths = None if self.pool == "last" else mask.sum(-1).astype(jnp.int32)
        x = self.blocks(x, causal=self.causal, kv_lengths=kv_lengths, scan=scan, remat=remat,
                        attn_impl=attn_impl)
        x = self.ln_final(x)
        if self.pool == "eot":
            # take_along_axis keeps batch a batching dimension of the gather, so each device
            # pools its own rows; x[arange(B), idx] was partitioned as a global-batch all-reduce.
            last = (mask.sum(-1) - 1).astype(jnp.int32)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        elif self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "first":
            pooled = x[:, 0]
        else:
            pooled = L.masked_mean(x, mask, axis=1)
        if self.proj is None:
            return pooled, x if return_tokens else None, mask
        proj = self.proj[...].astype(dtype)

        def project(h):
            y = h @ proj
            return y if self.proj_bias is None else y + self.proj_bias[...].astype(dtype)

        tokens_out = project(x) if return_tokens else None
        return project(pooled), tokens_out, mask
