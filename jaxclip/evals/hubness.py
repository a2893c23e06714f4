"""Hubness reduction for retrieval: inverted softmax, QB-Norm (dynamic IS), DBNorm (dual IS), InvGC.

A "hub" is a gallery item that is close to many queries and so steals their top ranks. The
inverted-softmax family rescores a query row by dividing each gallery item's exp(beta * s) by
how strongly a bank of held-out vectors (training-set queries, and for DBNorm training-set
gallery items) is attracted to it. All arithmetic is in the log domain, which is what makes
large beta usable in float32:

    inverted softmax  s'(q, g) = beta * s(q, g) - LSE_b beta * s(b, g)
    DBNorm dual IS    s'(q, g) = (beta_q + beta_g) * s(q, g)
                                 - LSE_{b in B_q} beta_q * s(b, g)
                                 - LSE_{g' in B_g} beta_g * s(g', g)

QB-Norm's dynamic inverted softmax (DIS) applies the normaliser only to queries whose raw top-1
gallery item is in the activation set A (the union of the bank rows' top-k gallery items) and
keeps the raw row otherwise; dual DIS gates each DBNorm factor with its own bank's set. This follows
QB-Norm (arXiv 2112.12777) and DBNorm (arXiv 2310.11612), implemented from the papers' formulas:
the released DBNorm code scores the query bank against the wrong matrix.

The post-processors are specs (banks + hyper-parameters). For the score normalisers,
`prepare(gallery)` computes, in one chunked pass over each bank on the sharded gallery, the
gallery-sized normaliser vector and activation set, and returns a `retrieval.ScoreNorm` that the
chunked rank kernel applies per score block. InvGC instead moves the gallery embeddings themselves
(`rewrite_gallery`) and leaves the scores plain cosines; see its docstring. Pass them to
`retrieval_metrics(postproc={"t2i": ..., "i2t": ...})`, built with the banks of that direction
(t2i: text query bank, image gallery bank; i2t the other way round).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip.evals import retrieval
from jaxclip.evals.retrieval import DEFAULT_QUERY_CHUNK, ScoreNorm


def _global_topk(s, gids, k: int, axes):
    """Each row's k best (score, global index) pairs over the sharded columns, best first.

    The order is the stable-sort rule (higher score first, lower index among ties): each shard
    proposes its local top-k (lax.top_k puts lower indices first among equal values), and the
    gathered candidates are sorted by the key (-score, index).
    """
    vals, pos = jax.lax.top_k(s, min(k, s.shape[1]))
    vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)
    ids = jax.lax.all_gather(gids[pos], axes, axis=1, tiled=True)
    neg, ids = jax.lax.sort((-vals, ids), dimension=1, num_keys=2)
    return -neg[:, :k], ids[:, :k]


def _topk_count_update(counts, s, gids, qvalid, k: int, axes):
    """Adds 1 to counts[g] for every valid row whose global top-k (`_global_topk`) contains g."""
    n_local = s.shape[1]
    _, ids = _global_topk(s, gids, k, axes)
    local = ids - gids[0]  # this shard holds the contiguous global range gids[0] + [0, n)
    inside = (local >= 0) & (local < n_local) & qvalid[:, None]
    # Out-of-shard hits go to index n_local, which mode="drop" discards.
    return counts.at[jnp.where(inside, local, n_local).reshape(-1)].add(1, mode="drop")


def _bank_body(carry, q, qcols, g, gcols, *, axes, beta, k):
    """One bank chunk: running LSE_b beta*s(b, g) and top-k counts for every local gallery item."""
    lse, counts = carry
    (qvalid,) = qcols
    gids, gvalid = gcols
    s = retrieval.masked_scores(q, g, gvalid, (), (), gids, axes)
    bank_logits = jnp.where(qvalid[:, None], beta * s, -jnp.inf)
    lse = jnp.logaddexp(lse, jax.nn.logsumexp(bank_logits, axis=0))
    if k > 0:
        counts = _topk_count_update(counts, s, gids, qvalid, k, axes)
    return (lse, counts), None


def bank_statistics(
    bank_emb,
    gallery_emb,
    *,
    beta: float,
    k: int,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Per gallery item g: (LSE_b beta * s(b, g), number of bank rows b with g in their top-k).

    Computed in bank chunks against the sharded gallery; returns two (G,) device arrays. k = 0
    skips the top-k pass (counts are then all zero, i.e. an empty activation set).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n_gallery = np.shape(gallery_emb)[0]
    (lse, counts), _ = retrieval.run_chunked(
        _bank_body,
        {"beta": float(beta), "k": int(k)},
        queries=bank_emb,
        query_cols=[],
        gallery=gallery_emb,
        gallery_cols=[],
        carry=[
            (jnp.full((n_gallery,), -jnp.inf, jnp.float32), -jnp.inf),
            (jnp.zeros((n_gallery,), jnp.int32), 0),
        ],
        query_chunk=query_chunk,
        mesh=mesh,
    )
    return lse, counts


def _factor(bank, gallery, beta, k, dynamic, mesh, query_chunk):
    """One ScoreNorm factor: the bank's log-normaliser and activation set on this gallery."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    lse, counts = bank_statistics(
        bank, gallery, beta=beta, k=k if dynamic else 0, mesh=mesh, query_chunk=query_chunk
    )
    # Plain (non-dynamic) inverted softmax normalises every query: an all-True activation set.
    active = counts > 0 if dynamic else jnp.ones_like(counts, dtype=bool)
    return lse, active


@dataclasses.dataclass(frozen=True, eq=False)
class QBNorm:
    """QB-Norm: inverted softmax over a query bank, dynamic (DIS) by default.

    query_bank (M, d): held-out queries of the direction's query modality (training captions for
    t2i). beta: inverse temperature (paper default 20). k: top-k per bank query that forms the
    activation set (default 1; 0 gives an empty set, i.e. the identity). dynamic=False is the plain
    inverted softmax (every query normalised).
    """

    query_bank: Any
    beta: float = 20.0
    k: int = 1
    dynamic: bool = True

    def prepare(self, gallery_emb, *, mesh=None, query_chunk=DEFAULT_QUERY_CHUNK) -> ScoreNorm:
        lse, active = _factor(
            self.query_bank, gallery_emb, self.beta, self.k, self.dynamic, mesh, query_chunk
        )
        return ScoreNorm(betas=(float(self.beta),), log_norms=lse[None], active=active[None])


@dataclasses.dataclass(frozen=True, eq=False)
class DBNorm:
    """DBNorm: dual inverted softmax over a query bank and a gallery bank.

    query_bank (M_q, d): held-out queries (query modality); gallery_bank (M_g, d): held-out
    gallery items (gallery modality), compared with the test gallery in that modality. Defaults
    follow the released code: beta_q = 1/1.99, beta_g = 3, k = 1, dynamic=False (dual IS);
    dynamic=True is dual DIS, each factor gated by its own bank's activation set.
    """

    query_bank: Any
    gallery_bank: Any
    beta_q: float = 1 / 1.99
    beta_g: float = 3.0
    k: int = 1
    dynamic: bool = False

    def prepare(self, gallery_emb, *, mesh=None, query_chunk=DEFAULT_QUERY_CHUNK) -> ScoreNorm:
        factors = [
            _factor(bank, gallery_emb, beta, self.k, self.dynamic, mesh, query_chunk)
            for bank, beta in ((self.query_bank, self.beta_q), (self.gallery_bank, self.beta_g))
        ]
        return ScoreNorm(
            betas=(float(self.beta_q), float(self.beta_g)),
            log_norms=jnp.stack([f[0] for f in factors]),
            active=jnp.stack([f[1] for f in factors]),
        )


def _local_adj_body(carry, q, qcols, g, gcols, *, axes, k):
    """One chunk of gallery items q against the sharded bank g: (1/k) sum_{b in top-k} s(q, b) b.

    The top-k is the global one of `_global_topk`: a bank row is in it iff it beats the k-th
    (score, index) pair, so each shard sums its own members and a psum adds the shards up.
    """
    gids, gvalid = gcols
    s = retrieval.masked_scores(q, g, gvalid, (), (), gids, axes)
    vals, ids = _global_topk(s, gids, k, axes)
    kth, kth_id = vals[:, -1:], ids[:, -1:]
    chosen = (s > kth) | ((s == kth) & (gids[None, :] <= kth_id))
    weights = jnp.where(chosen, s, 0.0)
    message = jnp.matmul(weights, g, precision=jax.lax.Precision.HIGHEST)
    return carry, jax.lax.psum(message, axes) / k


def _l2_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inverse_convolution(gallery, bank, r, local_adj, pool_rate, mesh, query_chunk):
    """normalize(g - r * message(g)) for every gallery row g, against one bank (InvGC)."""
    bank = jnp.asarray(bank, jnp.float32)
    if local_adj:
        # LocalAdj: only the gallery item's k nearest bank rows, weighted by their similarity.
        k = max(1, int(pool_rate * bank.shape[0]))
        _, message = retrieval.run_chunked(
            _local_adj_body, {"k": k}, queries=gallery, query_cols=[], gallery=bank,
            gallery_cols=[], query_chunk=query_chunk, mesh=mesh)
    else:
        # The full graph weighs every bank row by s(g, b) minus the mean similarity m of the
        # gallery x bank matrix. Both sums factor through d-sized statistics of the bank,
        #     (1/|B|) sum_b (s(g, b) - m) b = M g - m * mean(B),   M = B^T B / |B|,
        # and m = mean(G) . mean(B), so no gallery x bank matrix is formed.
        hi = jax.lax.Precision.HIGHEST
        bank_mean = bank.mean(0)
        second_moment = jnp.matmul(bank.T, bank, precision=hi) / bank.shape[0]
        m = jnp.dot(gallery.mean(0), bank_mean, precision=hi)
        message = jnp.matmul(gallery, second_moment, precision=hi) - m * bank_mean
    return _l2_normalize(gallery - r * message)


@dataclasses.dataclass(frozen=True, eq=False)
class InvGC:
    """InvGC: inverse graph convolution of the test gallery against two banks.

    Representations of a retrieval set crowd into a narrow cone, so nearest neighbours are hard
    to tell apart and a few items become hubs. InvGC (Jian & Wang, "InvGC: Robust Cross-Modal
    Retrieval by Inverse Graph Convolution", EMNLP Findings 2023) runs one graph convolution step
    backwards: each gallery item g moves away from its neighbours in a bank,

        g' = normalize(g - r * (1/|B|) sum_b w(g, b) b),

    once against gallery_bank (held-out items of the gallery modality, rate r_g) and once against
    query_bank (held-out queries, rate r_q), and the gallery becomes
    normalize(g'_G / 2 + g'_Q / 2); scores are then plain cosines against it. local_adj=True
    (LocalAdj, the paper's default) keeps only b in g's top-k bank rows with w = s(g, b) and
    divides by k = pool_rate * |B| instead of |B|; local_adj=False uses every bank row with
    w = s(g, b) - mean(S). r_g = r_q = 0 is the identity. The rates have no universal default:
    tune them on validation data.
    """

    query_bank: Any
    gallery_bank: Any
    r_q: float
    r_g: float
    local_adj: bool = True
    pool_rate: float = 0.01

    def __post_init__(self):
        if not 0 < self.pool_rate <= 1:
            raise ValueError(f"pool_rate must be in (0, 1], got {self.pool_rate}")

    def rewrite_gallery(self, gallery_emb, *, mesh=None, query_chunk=DEFAULT_QUERY_CHUNK):
        """The (G, d) gallery after inverse convolution (retrieval scores against it)."""
        gallery = jnp.asarray(gallery_emb, jnp.float32)
        if self.r_g == 0 and self.r_q == 0:
            return gallery
        moved = [
            _inverse_convolution(gallery, bank, float(r), self.local_adj, self.pool_rate, mesh,
                                 query_chunk) if r else _l2_normalize(gallery)
            for bank, r in ((self.gallery_bank, self.r_g), (self.query_bank, self.r_q))
        ]
        return _l2_normalize(0.5 * moved[0] + 0.5 * moved[1])


def _dense_body(carry, q, qcols, g, gcols, *, axes, betas):
    gids, gvalid, *norm_cols = gcols
    return carry, retrieval.masked_scores(q, g, gvalid, norm_cols, betas, gids, axes)


def postprocessed_scores(
    query_emb,
    gallery_emb,
    postproc=None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> np.ndarray:
    """The full (Nq, G) post-processed score matrix, for inspection and tests on small sets.

    Runs the same per-block transform as the rank kernel. This is the one function here that
    materialises queries x gallery (on the host); the metrics never do.
    """
    gallery, score_norm = retrieval.apply_postproc(postproc, gallery_emb, mesh, query_chunk)
    norm_cols, betas = retrieval.score_norm_columns(score_norm)
    _, dense = retrieval.run_chunked(
        _dense_body,
        {"betas": betas},
        queries=query_emb,
        query_cols=[],
        gallery=gallery,
        gallery_cols=norm_cols,
        query_chunk=query_chunk,
        mesh=mesh,
        gallery_ys=True,
    )
    return np.asarray(dense)


def _occurrence_body(carry, q, qcols, g, gcols, *, axes, k, betas):
    (counts,) = carry
    (qvalid,) = qcols
    gids, gvalid, *norm_cols = gcols
    s = retrieval.masked_scores(q, g, gvalid, norm_cols, betas, gids, axes)
    return (_topk_count_update(counts, s, gids, qvalid, k, axes),), None


def k_occurrence(
    query_emb,
    gallery_emb,
    k: int = 10,
    *,
    postproc=None,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> np.ndarray:
    """N_k: for each gallery item, how many queries have it in their top k (after postproc).

    Hubs are items with a large N_k; the skewness of N_k (see `skewness`) measures hubness.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    gallery, score_norm = retrieval.apply_postproc(postproc, gallery_emb, mesh, query_chunk)
    norm_cols, betas = retrieval.score_norm_columns(score_norm)
    n_gallery = np.shape(gallery_emb)[0]
    (counts,), _ = retrieval.run_chunked(
        _occurrence_body,
        {"k": int(k), "betas": betas},
        queries=query_emb,
        query_cols=[],
        gallery=gallery,
        gallery_cols=norm_cols,
        carry=[(jnp.zeros((n_gallery,), jnp.int32), 0)],
        query_chunk=query_chunk,
        mesh=mesh,
    )
    return np.asarray(counts).astype(np.int64)


def skewness(counts) -> float:
    """Population skewness E[(x - mu)^3] / sigma^3 of the k-occurrence counts (0 if constant)."""
    x = np.asarray(counts, np.float64)
    centred = x - x.mean()
    var = np.mean(centred**2)
    if var == 0:
        return 0.0
    return float(np.mean(centred**3) / var**1.5)
