"""Softmax (CLIP / ALIGN) and sigmoid (SigLIP) contrastive objectives, all_gather and ring forms.

all_gather  each shard gathers the other tower's embeddings and computes its own rows of the
            logits: b x B per shard (open_clip's --local-loss --gather-with-grad, but with a single
            correct gradient path). Memory O(b·B) per device.
ring        the text blocks travel around the mesh with `ppermute` and each step folds a b x b
            block (in b x tile tiles, `loss.tile`) into O(b) statistics: the row and column
            log-sum-exp for softmax (one pass for both directions), the softplus row sums for
            sigmoid. A custom VJP keeps only those statistics and recomputes the blocks in the
            backward pass while texts and their gradients travel the ring again (ring.py):
            memory O(b·d + b·tile) per device, flat in the device count.
dense       `axis=None`: the whole batch in one matrix; the reference the others are tested against.

Formulas: CLIP (Radford et al. 2021), ALIGN (Jia et al. 2021), SigLIP (Zhai et al. 2023); the
ring follows Inf-CL (Cheng et al. 2024).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxclip.losses import ring
from jaxclip.losses.core import (
    after,
    gather,
    mean_over,
    register,
    scale_value,
    shard_index,
    sum_over,
)


def _direction_factor(cfg) -> float:
    return 0.5 if cfg.clip.direction_reduce == "mean" else 1.0


def smoothed_ce(logits: jax.Array, labels: jax.Array, eps: float) -> jax.Array:
    """Per-row cross entropy against (1 - eps)·onehot + eps / num_columns."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    pos = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return -(1.0 - eps) * pos - eps * logp.mean(axis=-1)


def batch_stats(logits: jax.Array, labels: jax.Array, axis) -> dict[str, jax.Array]:
    pos_mask = jnp.arange(logits.shape[1])[None, :] == labels[:, None]
    n_neg = jnp.maximum(pos_mask.size - pos_mask.sum(), 1)
    return {
        "i2t_acc": mean_over(jnp.mean(jnp.argmax(logits, -1) == labels), axis),
        "pos_logit": mean_over(jnp.sum(jnp.where(pos_mask, logits, 0)) / pos_mask.sum(), axis),
        "neg_logit": mean_over(jnp.sum(jnp.where(pos_mask, 0, logits)) / n_neg, axis),
    }


def _clip_all_gather(enc, cfg, axis):
    scale = scale_value(enc.logit_scale, cfg)
    img, txt = enc.x, enc.y
    b = img.shape[0]
    labels = jnp.arange(b) + b * shard_index(axis)
    logits_i2t = scale * img @ gather(txt, axis).T  # (b, B): this shard's images vs all texts
    logits_t2i = scale * txt @ gather(img, axis).T  # (b, B): this shard's texts vs all images
    eps = cfg.clip.label_smoothing
    per_row = smoothed_ce(logits_i2t, labels, eps) + smoothed_ce(logits_t2i, labels, eps)
    loss = mean_over(per_row.mean(), axis) * _direction_factor(cfg)
    metrics = batch_stats(logits_i2t, labels, axis)
    metrics["t2i_acc"] = mean_over(jnp.mean(jnp.argmax(logits_t2i, -1) == labels), axis)
    return loss, metrics


class _Ring(NamedTuple):
    scale: jax.Array  # replicated, for the metrics
    scale_v: jax.Array  # the same, varying over the batch axes, for the loss terms
    bias_v: jax.Array
    x: jax.Array
    y: jax.Array
    rows: tuple  # (row log-sum-exp | softplus sum, max, first argmax) over the global batch
    cols: tuple  # the same per text (softmax only)
    pos: jax.Array  # s·x_r·y_r
    sums: tuple  # (Σ x, Σ y) over the global batch
    labels: jax.Array  # global index of each row (float32, as the argmaxes)
    B: int


def _ring_common(enc, cfg, axis, kind, bias):
    """Runs the ring kernel and returns what both ring losses need: the statistics, the positive
    logits s·x_r·y_r, the global sums of each tower (for the smoothing term and the mean negative
    logit, which need no ring: Σ_j s·x_r·y_j = s·x_r·Σ_j y_j), the labels and the sizes."""
    scale = scale_value(enc.logit_scale, cfg)
    n = 1 if axis is None else jax.lax.axis_size(axis)
    x, y = enc.x.astype(jnp.float32), enc.y.astype(jnp.float32)
    b = x.shape[0]
    tile = int(cfg.get("tile", 0) or 0)
    # One varying copy of the scale / bias serves every per-shard use: each shard's cotangent is
    # its own partial sum, which shard_map's transpose of the cast adds up once (no factor of the
    # device count), in an all-reduce that waits for the ring's backward pass.
    scale_v, bias_v = ring.vary(scale, axis), ring.vary(bias, axis)
    # Every other collective has a data path to or from the ring's loops, so none can run while
    # a loop's permutes wait (core.after): the tower sums before the forward loop, the positive
    # logits (and the metrics reduced from them) after it.
    sums = sum_over(x.sum(0), axis), sum_over(y.sum(0), axis)
    xr, yr = after((x, y), jax.lax.stop_gradient(sums), axis)
    rows, cols = ring.ring_stats(kind, axis, n, tile, xr, yr, scale_v, bias_v)
    pos = after(scale_v * jnp.sum(x * y, axis=-1), jax.lax.stop_gradient(rows[0]), axis)
    labels = (jnp.arange(b) + b * shard_index(axis)).astype(jnp.float32)
    return _Ring(scale, scale_v, bias_v, x, y, rows, cols, pos, sums, labels, b * n)


def _ring_metrics(r: _Ring, axis, bias=0.0):
    """The all_gather path's batch statistics from the ring's argmaxes and the closed-form sums."""
    total = r.scale * jnp.dot(r.sums[0], r.sums[1])  # Σ over all B² logits of s·x·y
    neg = (total - sum_over(r.pos.sum(), axis)) / float(max(r.B * r.B - r.B, 1))  # B² > int32
    metrics = {"i2t_acc": mean_over(jnp.mean(r.rows[2] == r.labels), axis),
               "pos_logit": mean_over(r.pos.mean(), axis) + bias, "neg_logit": neg + bias}
    if r.cols:
        metrics["t2i_acc"] = mean_over(jnp.mean(r.cols[2] == r.labels), axis)
    return jax.tree.map(jax.lax.stop_gradient, metrics)


def _clip_ring(enc, cfg, axis):
    r = _ring_common(enc, cfg, axis, "softmax", jnp.float32(0.0))
    eps = cfg.clip.label_smoothing
    # -(1-eps)·log p_pos - eps·mean_j log p_j per row, with log p = logit - lse; the column
    # log-sum-exp is the text -> image direction.
    i2t = r.rows[0] - (1.0 - eps) * r.pos - eps * r.scale_v * (r.x @ r.sums[1]) / r.B
    t2i = r.cols[0] - (1.0 - eps) * r.pos - eps * r.scale_v * (r.y @ r.sums[0]) / r.B
    loss = mean_over((i2t + t2i).mean(), axis) * _direction_factor(cfg)
    return loss, _ring_metrics(r, axis)


# label_smoothing: the target row is (1 - eps)·onehot + eps/B (ALIGN uses 0.1).
# direction_reduce: the two directions' losses are averaged (CLIP) or summed (some ALIGN
# reproductions), which doubles the effective learning rate of the loss.
@register("clip", impls=("all_gather", "ring", "dense"),
          config=dict(label_smoothing=0.0, direction_reduce="mean"),
          choices=dict(direction_reduce=("mean", "sum")))
def clip(enc, cfg, axis):
    """Symmetric InfoNCE (CLIP); with scale_param=temperature and label_smoothing, ALIGN."""
    if cfg.impl == "ring":
        return _clip_ring(enc, cfg, axis)
    return _clip_all_gather(enc, cfg, axis)


@register("siglip", impls=("all_gather", "ring", "dense"))
def siglip(enc, cfg, axis):
    """Pairwise sigmoid loss (SigLIP): sum over texts, mean over images."""
    scale = scale_value(enc.logit_scale, cfg)
    bias = jnp.float32(0.0) if enc.logit_bias is None else enc.logit_bias.astype(jnp.float32)
    img, txt = enc.x, enc.y
    b = img.shape[0]
    if cfg.impl == "ring":
        r = _ring_common(enc, cfg, axis, "sigmoid", bias)
        # rows[0] sums softplus(logit) = -log σ(-logit) over every column; the own diagonal's
        # term is swapped for the positive one, -log σ(logit) = softplus(-logit).
        diag = r.pos + r.bias_v
        per_row = r.rows[0] - jax.nn.softplus(diag) + jax.nn.softplus(-diag)
        return mean_over(per_row.mean(), axis), _ring_metrics(r, axis, bias)
    labels = jnp.arange(b) + b * shard_index(axis)
    logits = scale * img @ gather(txt, axis).T + bias  # (b, B)
    z = jnp.where(jnp.arange(logits.shape[1])[None, :] == labels[:, None], 1.0, -1.0)
    per_row = jax.nn.softplus(-z * logits).sum(-1)
    return mean_over(per_row.mean(), axis), batch_stats(logits, labels, axis)
