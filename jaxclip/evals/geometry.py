"""Embedding-geometry diagnostics: modality gap, alignment, uniformity and mean rank variance.

These describe how the two embedding clouds sit on the sphere, independently of any task
(the contrastive-gap terms of "It's Not a Modality Gap", arXiv 2405.18570, and the mean
rank variance of multi-caption retrieval):

    modality gap   ||mean_i x_i - mean_j y_j||
    alignment      (1/B) sum_i ||x_i - y_i||^2                    (x_i, y_i a positive pair)
    uniformity     log mean_{i<j} exp(-t ||x_i - x_j||^2)         (Wang & Isola; t = 2)
    L_U            1/2 uniformity(x) + 1/2 uniformity(y)          (the paper's regulariser)
    MRV            (1/N) sum_i Var_k R_{i,k}                      (or the std, as CCRK prints)

A note on the halves: the paper writes L_U = 1/2 log mean(...) + 1/2 (same for y) and also says an
antipodal pair gives "the single-modality uniformity term = -8". Both hold if the per-modality
term is the Wang & Isola uniformity above (-8 for an antipodal pair) and the halves belong to L_U,
which is how this file defines them.

Uniformity needs all pairs; it runs on the chunked, sharded runner of retrieval.py, so its memory
is O(chunk x N / n_devices) and it never forms the N x N distance matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip.evals import retrieval
from jaxclip.evals.retrieval import DEFAULT_QUERY_CHUNK


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@jax.jit
def _gap(x, y):
    return jnp.linalg.norm(jnp.mean(x, axis=0) - jnp.mean(y, axis=0))


@jax.jit
def _alignment(x, y):
    return jnp.mean(jnp.sum(jnp.square(x - y), axis=1))


def modality_gap(x, y) -> float:
    """||mean x - mean y|| between two embedding sets (N_x, d) and (N_y, d)."""
    return float(_gap(_f32(x), _f32(y)))


def alignment(x, y) -> float:
    """Mean squared distance between paired rows of x and y (both (B, d))."""
    x, y = _f32(x), _f32(y)
    if x.shape != y.shape:
        raise ValueError(f"alignment needs paired rows, got {x.shape} and {y.shape}")
    return float(_alignment(x, y))


def _uniformity_body(carry, q, qcols, g, gcols, *, axes, t):
    """Per query row i: LSE over j > i of -t ||x_i - x_j||^2 across all gallery shards."""
    _, qids = qcols
    gids, gvalid, gsq = gcols
    sq_dist = jnp.sum(q * q, axis=1)[:, None] + gsq[None, :] - 2.0 * retrieval.similarity(q, g)
    sq_dist = jnp.maximum(sq_dist, 0.0)  # the dot-product identity can dip below 0 by rounding
    logits = jnp.where(gvalid[None, :] & (gids[None, :] > qids[:, None]), -t * sq_dist, -jnp.inf)
    top = jax.lax.pmax(jnp.max(logits, axis=1), axes)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # rows with no j > i
    total = jax.lax.psum(jnp.sum(jnp.exp(logits - top[:, None]), axis=1), axes)
    return carry, top + jnp.log(total)


def uniformity(
    x,
    t: float = 2.0,
    *,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||^2) over the rows of x (N >= 2); <= 0, 0 iff collapsed."""
    n = np.shape(x)[0]
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    x = _f32(x)
    _, row_lse = retrieval.run_chunked(
        _uniformity_body,
        {"t": float(t)},
        queries=x,
        query_cols=[(jnp.arange(n, dtype=jnp.int32), np.iinfo(np.int32).max)],
        gallery=x,
        gallery_cols=[(jnp.sum(x * x, axis=1), 0.0)],
        query_chunk=query_chunk,
        mesh=mesh,
    )
    row_lse = np.asarray(row_lse, np.float64)[:-1]  # the last row has no j > i
    top = row_lse.max()
    log_sum = top + np.log(np.sum(np.exp(row_lse - top)))
    return float(log_sum - math.log(n * (n - 1) / 2))


def uniformity_loss(x, y, t: float = 2.0, **kwargs) -> float:
    """The paper's L_U: 1/2 uniformity(x) + 1/2 uniformity(y)."""
    return 0.5 * uniformity(x, t, **kwargs) + 0.5 * uniformity(y, t, **kwargs)


def mean_rank_variance(ranks, reduce: Literal["var", "std"] = "var") -> float:
    """MRV: mean over instances (rows) of the variance (or std) of their K ranks (columns).

    ranks (N, K): R[i, k] is the rank of instance i's ground truth for caption/language k.
    Population statistics (ddof = 0), as in the MRV definition and CCRK's np.std.
    """
    ranks = np.asarray(ranks, np.float64)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (N, K), got shape {ranks.shape}")
    if reduce == "var":
        return float(np.mean(np.var(ranks, axis=1)))
    if reduce == "std":
        return float(np.mean(np.std(ranks, axis=1)))
    raise ValueError(f"reduce must be 'var' or 'std', got {reduce!r}")


def group_ranks(ranks, groups) -> np.ndarray:
    """Arranges per-caption ranks into (n_groups, K) rows, captions kept in their given order.

    For MRV from retrieval_metrics(..., return_ranks=True)["t2i_ranks"] with groups =
    text_to_image. Every group must hold the same number K of captions.
    """
    ranks, groups = np.asarray(ranks), np.asarray(groups)
    counts = np.bincount(groups)
    if counts.size == 0 or np.any(counts != counts[0]):
        raise ValueError("every group needs the same number of ranks")
    order = np.argsort(groups, kind="stable")
    return ranks[order].reshape(counts.size, counts[0])


def geometry_metrics(
    image_emb,
    text_emb,
    text_to_image: Sequence[int] | np.ndarray | None = None,
    *,
    t: float = 2.0,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> dict[str, float]:
    """gap, alignment (over caption-image pairs), per-modality uniformity and L_U in one dict.

    Without text_to_image, row i of text_emb is paired with row i of image_emb.
    """
    image_emb, text_emb = _f32(image_emb), _f32(text_emb)
    paired = image_emb if text_to_image is None else image_emb[jnp.asarray(text_to_image)]
    u_img = uniformity(image_emb, t, mesh=mesh, query_chunk=query_chunk)
    u_txt = uniformity(text_emb, t, mesh=mesh, query_chunk=query_chunk)
    return {
        "modality_gap": modality_gap(image_emb, text_emb),
        "alignment": alignment(paired, text_emb),
        "uniformity_image": u_img,
        "uniformity_text": u_txt,
        "uniformity_loss": 0.5 * (u_img + u_txt),
    }
