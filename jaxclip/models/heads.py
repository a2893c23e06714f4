"""Projection heads: trainable maps from a tower's features to the joint embedding space.

With `model.{image,text}.head = "none"` a tower projects with its own `proj` matrix (the CLIP
layout, exportable to HF/open_clip, locked together with the tower). Any other head replaces
that matrix by a separate module, `image_head` / `text_head` at the top of the parameter tree,
so locking a tower (`^image/`, `^text/`) leaves its head trainable: LiT's "locked image tower,
text tower with a linear head", or the frozen-encoders-plus-projectors recipe of "Harnessing
Frozen Unimodal Encoders" (arXiv 2409.19425, reference code mayug/freeze-align).

  linear     y = W x + b
  mlp        freeze-align's ProjectionHead: p = W1 x + b1; y = LN(p + W2 gelu(p) + b2)
  patch_mlp  freeze-align's per-token projector P(t) = A(LN t) + B gelu(C(LN t)), applied to every
             token. Image: P(CLS) + mean over patches of P(patch). Text: the masked mean of
             P(token), followed by the `mlp` head above.
The reference applies dropout 0.1 inside these heads; jaxclip has no dropout anywhere (its
steps are deterministic functions of the batch), so the heads here are dropout-free. The hidden
width of the per-token MLP is embed_dim.
"""

from __future__ import annotations

import itertools

import jax
from flax import nnx

from jaxclip.models import layers as L

HEADS = ("none", "linear", "mlp", "patch_mlp")


def _dense(n_in: int, n_out: int, in_axis: str | None) -> L.Dense:
    # "joint" is replicated (sharding.RULES); the input side follows the tower's "embed" axis.
    return L.Dense((n_in,), (n_out,), (in_axis, "joint"), std=n_in**-0.5)


class _ProjectionHead(nnx.Module):
    def __init__(self, width: int, embed_dim: int, in_axis: str | None):
        self.proj = _dense(width, embed_dim, in_axis)
        self.fc = _dense(embed_dim, embed_dim, None)
        self.ln = L.LayerNorm(embed_dim, eps=1e-5)

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.proj(x)
        return self.ln(p + self.fc(jax.nn.gelu(p, approximate=False)))


class _TokenProjector(nnx.Module):
    def __init__(self, width: int, embed_dim: int, ln_eps: float):
        self.ln = L.LayerNorm(width, eps=ln_eps)
        self.linear = _dense(width, embed_dim, "embed")
        self.fc1 = _dense(width, embed_dim, "embed")
        self.fc2 = _dense(embed_dim, embed_dim, None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.ln(x)
        return self.linear(y) + self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))


class Head(nnx.Module):
    """`kind` head from `width`-dim tower features to `embed_dim`.

    Called with the tower's pooled features (B, width), its token features (B, T, width) or None,
    and for text the (B, T) mask of real tokens. Returns (pooled (B, E), tokens (B, T, E) or
    None). `patch_mlp` needs the tokens: for images the pooled input must be the CLS token and
    the tokens the patches.
    """

    def __init__(self, kind: str, width: int, embed_dim: int, *, ln_eps: float, text: bool):
        if kind not in HEADS[1:]:
            raise ValueError(f"unknown projection head {kind!r}; expected one of {HEADS[1:]}")
        self.kind = kind
        self.text = text
        if kind == "linear":
            self.proj = _dense(width, embed_dim, "embed")
        elif kind == "mlp":
            self.mlp = _ProjectionHead(width, embed_dim, "embed")
        else:
            self.tokens = _TokenProjector(width, embed_dim, ln_eps)
            if text:
                self.mlp = _ProjectionHead(embed_dim, embed_dim, None)

    def __call__(self, pooled: jax.Array, tokens: jax.Array | None, mask: jax.Array | None = None):
        if self.kind == "linear":
            return self.proj(pooled), None if tokens is None else self.proj(tokens)
        if self.kind == "mlp":
            return self.mlp(pooled), None if tokens is None else self.mlp(tokens)
        if tokens is None:
            raise ValueError("the patch_mlp head needs the tower's token features")
        per_token = self.tokens(tokens)
        if not self.text:
            return self.tokens(pooled) + per_token.mean(axis=1), per_token
        return self.mlp(L.masked_mean(per_token, mask, axis=1)), per_token


class ViewHead(nnx.Module):
    """The projection head of an image-image contrastive term (SimCLR, Chen et al. 2020, arXiv
    2002.05709; SLIP, Mu et al. 2021, arXiv 2112.12750): an MLP of `depth` linear layers on the
    image tower's pooled features (before the image-text projection), `hidden` wide, `out` out.

    SLIP's head is 3 layers, 4096 hidden, 256 out, with BatchNorm + ReLU between the layers.
    Batch statistics would couple the rows of a step (and the micro-batches of an accumulated
    one, whose passes must be the same function of each row), so LayerNorm takes BatchNorm's
    place here."""

    def __init__(self, width: int, hidden: int, out: int, depth: int):
        if depth < 1 or out < 1 or (depth > 1 and hidden < 1):
            raise ValueError(f"view head: needs depth >= 1, out >= 1 and hidden >= 1 with "
                             f"depth > 1; got depth={depth}, hidden={hidden}, out={out}")
        dims = [width, *[hidden] * (depth - 1), out]
        # Named attributes (fc0, ln0, fc1, ...), not a list: parameter paths stay string keys.
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            setattr(self, f"fc{i}", _dense(a, b, "embed" if i == 0 else None))
            if i < depth - 1:
                setattr(self, f"ln{i}", L.LayerNorm(b, eps=1e-5))
        self.depth = depth

    def __call__(self, pooled: jax.Array) -> jax.Array:
        x = pooled
        for i in range(self.depth):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth - 1:
                x = jax.nn.relu(getattr(self, f"ln{i}")(x))
        return x
