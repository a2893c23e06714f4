"""Auxiliary geometry terms (alignment, uniformity, cross-uniformity) added to a main objective.

From "It's Not a Modality Gap" (arXiv 2405.18570, reference code abrar-fahim/contrastive-gap).
Use them as `loss.aux.align = 1.0`, `loss.aux.uniformity = 1.0`,
`loss.aux.cross_uniformity = 1.0`.
Like every objective they are written in the local view and reduce over the mesh.
`modality_gap` is the distance they are meant to close, logged at every step of every objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip.losses.core import gather, mean_over, register, shard_index, sum_over

_T = 2.0  # uniformity temperature t of the paper


@register("align", impls=("all_gather", "ring", "dense"))
def align(enc, cfg, axis):
    """Mean squared distance between matched image and text embeddings."""
    d2 = jnp.sum(jnp.square(enc.x - enc.y), axis=-1)
    return mean_over(d2.mean(), axis), {}


def _log_mean_offdiag_kernel(rows: jax.Array, cols_all: jax.Array, axis, exclude_diag: bool):
    """log mean_{i != j} exp(-t·||r_i - c_j||²) over the global batch."""
    b = rows.shape[0]
    B = cols_all.shape[0]
    d2 = jnp.sum(rows * rows, -1)[:, None] + jnp.sum(cols_all * cols_all, -1)[None, :]
    d2 = jnp.maximum(d2 - 2 * rows @ cols_all.T, 0.0)
    logk = -_T * d2
    if exclude_diag:
        own = jnp.arange(B)[None, :] == (jnp.arange(b) + b * shard_index(axis))[:, None]
        logk = jnp.where(own, -jnp.inf, logk)
    # A global log-sum-exp: subtract the global max so the psum of exponentials cannot underflow.
    m = jax.lax.stop_gradient(jnp.max(logk))
    m = m if axis is None else jax.lax.pmax(m, axis)
    total = sum_over(jnp.sum(jnp.exp(logk - m)), axis)
    count = B * (B - 1) if exclude_diag else B * B
    return jnp.log(total / count) + m


@register("uniformity", impls=("all_gather", "ring", "dense"))
def uniformity(enc, cfg, axis):
    """½·log E exp(-2||x_i - x_j||²) for images plus the same for texts (i != j)."""
    terms = [_log_mean_offdiag_kernel(e, gather(e, axis), axis, True)
             for e in (enc.x, enc.y)]
    return 0.5 * (terms[0] + terms[1]), {}


@register("cross_uniformity", impls=("all_gather", "ring", "dense"))
def cross_uniformity(enc, cfg, axis):
    """log E exp(-2||x_i - y_j||²) over unmatched image-text pairs."""
    return _log_mean_offdiag_kernel(enc.x, gather(enc.y, axis), axis, True), {}


def modality_gap(x: jax.Array, y: jax.Array, axis=None, x_present=None, y_present=None):
    """||mean x - mean y|| over the global batch: the distance between the two modalities'
    centroids, which "Mind the Gap" (Liang et al., 2022) measures in CLIP and the alignment and
    uniformity terms above are meant to shrink.

    Embeddings are (B, D), or (B, K, D) with K inputs per row and a (B, K) `present` mask (the
    absent ones are left out). One psum of the two tower sums and counts, so no shard needs
    another's rows. A diagnostic: callers pass stop-gradient inputs.
    """

    def sum_and_count(e, present):
        e = e.astype(jnp.float32).reshape(-1, e.shape[-1])
        w = (jnp.ones(e.shape[0], jnp.float32) if present is None
             else present.reshape(-1).astype(jnp.float32))
        return jnp.concatenate([w @ e, w.sum()[None]])

    total = sum_over(jnp.stack([sum_and_count(x, x_present), sum_and_count(y, y_present)]), axis)
    centroids = total[:, :-1] / jnp.maximum(total[:, -1:], 1.0)
    return jnp.linalg.norm(centroids[0] - centroids[1])
