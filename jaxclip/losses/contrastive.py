"""Softmax (CLIP / ALIGN) and sigmoid (SigLIP) contrastive objectives, all_gather and ring forms.

all_gather  each shard gathers the other tower's embeddings and computes its own rows of the
            logits: b x B per shard (open_clip's --local-loss --gather-with-grad, but with a single
            correct gradient path). Memory O(b·B) per device.
ring        the other tower's blocks travel around the mesh with `ppermute`; each step computes a
            b x b block and folds it into running statistics (a log-sum-exp per row for the
            softmax loss, a softplus sum for the sigmoid loss), Inf-CL / SigLIP-chunked style.
            The step is rematerialised, so the backward pass keeps only the carried blocks and the
            O(b) statistics: memory O(b·d + b²) per step instead of O(b·B).
dense       `axis=None`: the whole batch in one matrix; the reference the others are tested against.

Formulas and test values: shared/specs/losses.md §1-§5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip.losses.core import (
    gather,
    mean_over,
    register,
    ring_shift,
    scale_value,
    shard_index,
)


def _direction_factor(cfg) -> float:
    return 0.5 if cfg.direction_reduce == "mean" else 1.0


def _smoothed_ce(logits: jax.Array, labels: jax.Array, eps: float) -> jax.Array:
    """Per-row cross entropy against (1 - eps)·onehot + eps / num_columns."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    pos = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return -(1.0 - eps) * pos - eps * logp.mean(axis=-1)


def _batch_stats(logits: jax.Array, labels: jax.Array, axis) -> dict[str, jax.Array]:
    pos_mask = jnp.arange(logits.shape[1])[None, :] == labels[:, None]
    n_neg = jnp.maximum(pos_mask.size - pos_mask.sum(), 1)
    return {
        "i2t_acc": mean_over(jnp.mean(jnp.argmax(logits, -1) == labels), axis),
        "pos_logit": mean_over(jnp.sum(jnp.where(pos_mask, logits, 0)) / pos_mask.sum(), axis),
        "neg_logit": mean_over(jnp.sum(jnp.where(pos_mask, 0, logits)) / n_neg, axis),
    }


def _clip_all_gather(enc, cfg, axis):
    scale = scale_value(enc.logit_scale, cfg)
    img, txt = enc.image_emb, enc.text_emb
    b = img.shape[0]
    labels = jnp.arange(b) + b * shard_index(axis)
    logits_i2t = scale * img @ gather(txt, axis).T  # (b, B): this shard's images vs all texts
    logits_t2i = scale * txt @ gather(img, axis).T  # (b, B): this shard's texts vs all images
    eps = cfg.label_smoothing
    per_row = _smoothed_ce(logits_i2t, labels, eps) + _smoothed_ce(logits_t2i, labels, eps)
    loss = mean_over(per_row.mean(), axis) * _direction_factor(cfg)
    metrics = _batch_stats(logits_i2t, labels, axis)
    metrics["t2i_acc"] = mean_over(jnp.mean(jnp.argmax(logits_t2i, -1) == labels), axis)
    return loss, metrics


def _ring_rows(rows: jax.Array, blocks: jax.Array, scale, axis, n: int, step_fn, init):
    """Folds `step_fn(stats, block_logits, is_own_block)` over every block of the other tower.

    Shard k starts with its own block (which holds its positives on the diagonal) and receives
    the block of shard k-1 at every step, so after n - 1 shifts it has seen all of them.
    """

    def fold(stats, block, own):
        return step_fn(stats, scale * rows @ block.T, own)

    stats = fold(init, blocks, True)

    @jax.checkpoint
    def body(carry, _):
        stats, block = carry
        block = ring_shift(block, axis, n)
        return (fold(stats, block, False), block), None

    if n > 1:
        (stats, _), _ = jax.lax.scan(body, (stats, blocks), None, length=n - 1)
    return stats


def _clip_ring(enc, cfg, axis):
    scale = scale_value(enc.logit_scale, cfg)
    n = 1 if axis is None else jax.lax.axis_size(axis)
    eps = cfg.label_smoothing
    b = enc.image_emb.shape[0]
    B = b * n

    def step(stats, logits, own):
        lse, row_sum, pos = stats
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(logits, axis=-1))
        row_sum = row_sum + logits.sum(-1)
        if own:
            pos = jnp.diagonal(logits)
        return lse, row_sum, pos

    init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.zeros((b,)))

    def direction(rows, others):
        lse, row_sum, pos = _ring_rows(rows, others, scale, axis, n, step, init)
        # -(1-eps)·log p_pos - eps·mean_j log p_j, with log p = logit - lse
        return lse - (1.0 - eps) * pos - eps * row_sum / B

    per_row = direction(enc.image_emb, enc.text_emb) + direction(enc.text_emb, enc.image_emb)
    return mean_over(per_row.mean(), axis) * _direction_factor(cfg), {}


@register("clip", impls=("all_gather", "ring", "dense"))
def clip(enc, cfg, axis):
    """Symmetric InfoNCE (CLIP); with scale_param=temperature and label_smoothing, ALIGN."""
    if cfg.impl == "ring":
        return _clip_ring(enc, cfg, axis)
    return _clip_all_gather(enc, cfg, axis)


def _sigmoid_terms(logits: jax.Array, own: bool) -> jax.Array:
    """Per-row sum of -log σ(z·logit): z = +1 on the diagonal of the own block, else -1."""
    neg = jax.nn.softplus(logits).sum(-1)  # -log σ(-x) = softplus(x)
    if not own:
        return neg
    diag = jnp.diagonal(logits)
    # Replace the diagonal's negative term by its positive one: -log σ(x) = softplus(-x).
    return neg - jax.nn.softplus(diag) + jax.nn.softplus(-diag)


@register("siglip", impls=("all_gather", "ring", "dense"))
def siglip(enc, cfg, axis):
    """Pairwise sigmoid loss (SigLIP): sum over texts, mean over images."""
    scale = scale_value(enc.logit_scale, cfg)
    bias = jnp.float32(0.0) if enc.logit_bias is None else enc.logit_bias.astype(jnp.float32)
    img, txt = enc.image_emb, enc.text_emb
    b = img.shape[0]
    if cfg.impl == "ring":
        n = 1 if axis is None else jax.lax.axis_size(axis)

        def step(acc, logits, own):
            return acc + _sigmoid_terms(logits + bias, own)

        per_row = _ring_rows(img, txt, scale, axis, n, step, jnp.zeros((b,)))
        return mean_over(per_row.mean(), axis), {}
    labels = jnp.arange(b) + b * shard_index(axis)
    logits = scale * img @ gather(txt, axis).T + bias  # (b, B)
    z = jnp.where(jnp.arange(logits.shape[1])[None, :] == labels[:, None], 1.0, -1.0)
    per_row = jax.nn.softplus(-z * logits).sum(-1)
    return mean_over(per_row.mean(), axis), _batch_stats(logits, labels, axis)
