"""Cross-modal retrieval metrics computed on device, chunked over queries and sharded over a mesh.

This file is the numerical core of retrieval evaluation. Every metric here reduces to one question
per query: at which position of the similarity-sorted gallery does the first positive appear? That
position is computed by counting, not sorting:

    rank0(p) = #{j : s_j > s_p} + #{j < p : s_j == s_p}

which is exactly the position of gallery item p in a *stable* descending sort of the query's scores
(ties broken by gallery index, lower index first). With several positives (an image and its five
COCO captions) the best rank is that of the positive with the highest score, lowest index among
equal scores, because the stable-sort position is ordered by the key (-score, index).

Layout. The gallery is padded to a multiple of the device count and split over *every* axis of the
mesh (eval does not care about the model's tensor axis, so all devices share the work). Queries are
replicated and processed in chunks inside one compiled `lax.scan`, so the largest intermediate on a
device is one (query_chunk x gallery/n_devices) score block; no queries x gallery matrix exists
anywhere. Cross-shard quantities (the positive's score, top-1 items, counts) are combined with
pmax/pmin/psum, so the integer ranks do not depend on the number of devices or the chunk size as
long as the matmul returns the same float for the same pair (always true for exactly representable
products; see tests/test_eval_retrieval.py).

The same chunked runner serves the hubness post-processing (`hubness.py`: bank normalisers and
k-occurrence counts), zero-shot classification (`zeroshot.py`) and uniformity (`geometry.py`).
Score normalisation is applied per score block through `ScoreNorm`, prepared once per gallery.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import P

from jaxclip.losses.tokenwise import late_interaction, unpack_token_sets

DEFAULT_QUERY_CHUNK = 512
# Sentinel larger than any gallery index; pmin over it means "no such item".
_NONE = np.iinfo(np.int32).max
_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class ScoreNorm:
    """Hubness normalisation of a score block, prepared for one test gallery (see hubness.py).

    For F factors f with inverse temperatures betas[f], per-gallery log-normalisers
    log_norms[f, g] and activation sets active[f, g], a query row s(q, .) becomes

        s'(q, g) = (sum_f betas[f]) * s(q, g) - sum_{f : on_f(q)} log_norms[f, g]

    where on_f(q) = active[f, top1(q)] and top1(q) is the query's top-1 gallery item under the raw
    scores (lowest index among ties). A gated-off factor keeps its exp(beta * s) numerator and drops
    its denominator, which orders the row exactly like the raw similarity. A row with no factor on
    is left as the raw similarity itself (QB-Norm's "raw row"). Plain inverted softmax is the case
    where `active` is all True.
    """

    betas: tuple[float, ...]
    log_norms: Any  # (F, G) float32
    active: Any  # (F, G) bool

    def __post_init__(self):
        if len(self.betas) == 0:
            raise ValueError("ScoreNorm needs at least one factor")
        if any(b <= 0 for b in self.betas):
            raise ValueError(f"betas must be positive, got {self.betas}")

    def prepare(self, gallery_emb, *, mesh=None, query_chunk=DEFAULT_QUERY_CHUNK) -> ScoreNorm:
        """Already prepared: returned as is, so a ScoreNorm can stand in for a post-processor."""
        del mesh, query_chunk
        if np.shape(self.log_norms)[1] != np.shape(gallery_emb)[0]:
            raise ValueError("ScoreNorm was prepared for a gallery of a different size")
        return self


# ----------------------------------------------------------------------------------------------
# Mesh, padding and the chunked runner shared by all evals.


def eval_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
    """The mesh evals run on: the given one, or a 1-device mesh so there is a single code path."""
    if mesh is not None:
        return mesh
    return jax.sharding.Mesh(
        np.array(jax.devices()[:1]), ("gallery",), axis_types=(jax.sharding.AxisType.Auto,)
    )


def _pad_rows(x, n: int, value) -> jax.Array:
    """Pads axis 0 of x to length n with `value`."""
    x = jnp.asarray(x)
    extra = n - x.shape[0]
    if extra == 0:
        return x
    pad = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=value)


def late_interaction_scores(q: jax.Array, g: jax.Array) -> jax.Array:
    """FILIP's late interaction of packed token sets (`losses.tokenwise.pack_token_sets`): for
    each query set, the mean over its real tokens of their best similarity with any real token of
    the gallery set (`late_interaction`, the function FILIP trains with). (c, G) scores."""
    (q, q_mask), (g, g_mask) = unpack_token_sets(q), unpack_token_sets(g)
    scores = late_interaction(q, q_mask, g, g_mask)
    # A padded query row has no real token (0/0); its row is cut off later, keep it finite.
    return jnp.where(jnp.any(q_mask, axis=-1)[:, None], scores, _NEG_INF)


def similarity(q: jax.Array, g: jax.Array) -> jax.Array:
    """Cosine scores q @ g.T of (already normalised) embedding blocks, in full float32; for
    packed token sets (3-d blocks) the late-interaction scores."""
    if q.ndim == 3:
        return late_interaction_scores(q, g)
    # HIGHEST keeps accelerators from computing eval scores in bf16/tf32 passes; on CPU it is f32.
    return jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=128)
def _program(body: Callable, static: tuple, mesh: jax.sharding.Mesh, gallery_ys: bool):
    """Compiles body into: for each query chunk (scan), run body against the local gallery shard.

    body(carry, q, qcols, g, gcols, *, axes, **static) -> (carry, ys). carry holds gallery-sized
    accumulators (sharded like the gallery); ys are per-query outputs, replicated (body makes them
    identical on all devices with psum/pmax/pmin) unless gallery_ys, in which case ys is a
    (chunk, gallery) block sharded like the gallery.
    """
    axes = tuple(mesh.axis_names)
    kwargs = dict(static)

    def per_device(qs, qcols, g, gcols, carry):
        def step(c, x):
            q, qc = x
            return body(c, q, qc, g, gcols, axes=axes, **kwargs)

        return jax.lax.scan(step, carry, (qs, qcols))

    gspec = P(axes)
    ys_spec = P(None, None, axes) if gallery_ys else P()
    # check_vma=False: all_gather results are typed as device-varying even though they are
    # replicated; the bodies guarantee replication of per-query outputs themselves.
    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), gspec, gspec, gspec),
        out_specs=(gspec, ys_spec),
        check_vma=False,
    )
    return jax.jit(fn)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Padded sizes for one (queries, gallery) pair on one mesh."""

    n_query: int
    n_gallery: int
    chunk: int
    n_chunks: int
    gallery_padded: int


def _layout(n_query: int, n_gallery: int, query_chunk: int, mesh) -> _Layout:
    if n_query <= 0 or n_gallery <= 0:
        raise ValueError(f"empty queries ({n_query}) or gallery ({n_gallery})")
    if query_chunk <= 0:
        raise ValueError(f"query_chunk must be positive, got {query_chunk}")
    chunk = min(query_chunk, n_query)
    n_chunks = math.ceil(n_query / chunk)
    n_dev = mesh.devices.size
    return _Layout(n_query, n_gallery, chunk, n_chunks, math.ceil(n_gallery / n_dev) * n_dev)


def run_chunked(
    body: Callable,
    static: dict,
    *,
    queries,
    query_cols: Sequence[tuple[Any, Any]],
    gallery,
    gallery_cols: Sequence[tuple[Any, Any]],
    carry: Sequence[tuple[Any, Any]] = (),
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    mesh: jax.sharding.Mesh | None = None,
    gallery_ys: bool = False,
):
    """Runs a chunk body over all queries against the sharded gallery (the shared eval runner).

    queries (Nq, d) and gallery (Ng, d) are cast to float32 (or packed token sets (Nq, Tq, d+1)
    and (Ng, Tg, d+1), scored by late interaction: losses.tokenwise.pack_token_sets).
    query_cols / gallery_cols / carry are (array, pad_value) pairs with the query / gallery on
    axis 0; they are padded (queries to a multiple of the chunk, gallery to a multiple of the
    device count) with their pad value. The body always receives the gallery indices (int32,
    padded entries >= Ng) and a validity mask as the first two gallery columns, and a query
    validity mask as the first query column.

    Returns (carry, ys) as jax arrays, carry cut back to Ng rows and ys to Nq rows (or, with
    gallery_ys, to (Nq, Ng)).
    """
    mesh = eval_mesh(mesh)
    queries = jnp.asarray(queries, jnp.float32)
    gallery = jnp.asarray(gallery, jnp.float32)
    if queries.ndim not in (2, 3) or gallery.ndim != queries.ndim or \
            queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"need (Nq, d), (Ng, d) embeddings or (Nq, Tq, d), (Ng, Tg, d) token "
                         f"sets, got {queries.shape}, {gallery.shape}")
    lay = _layout(queries.shape[0], gallery.shape[0], query_chunk, mesh)
    nq_pad = lay.n_chunks * lay.chunk

    def chunked(x, value):
        x = _pad_rows(x, nq_pad, value)
        return x.reshape((lay.n_chunks, lay.chunk, *x.shape[1:]))

    qvalid = jnp.arange(nq_pad) < lay.n_query
    qs = chunked(queries, 0.0)
    qcols = (qvalid.reshape(lay.n_chunks, lay.chunk), *(chunked(a, v) for a, v in query_cols))
    gids = jnp.arange(lay.gallery_padded, dtype=jnp.int32)
    gcols = (
        gids,
        gids < lay.n_gallery,
        *(_pad_rows(a, lay.gallery_padded, v) for a, v in gallery_cols),
    )
    init = tuple(_pad_rows(a, lay.gallery_padded, v) for a, v in carry)

    replicated = jax.NamedSharding(mesh, P())
    sharded = jax.NamedSharding(mesh, P(tuple(mesh.axis_names)))
    qs, qcols = jax.device_put((qs, qcols), replicated)
    g, gcols, init = jax.device_put(
        (_pad_rows(gallery, lay.gallery_padded, 0.0), gcols, init), sharded
    )
    fn = _program(body, tuple(sorted(static.items())), mesh, gallery_ys)
    out_carry, ys = fn(qs, qcols, g, gcols, init)
    out_carry = tuple(c[: lay.n_gallery] for c in out_carry)
    if gallery_ys:
        ys = ys.reshape((nq_pad, lay.gallery_padded))[: lay.n_query, : lay.n_gallery]
    else:
        ys = jax.tree.map(lambda y: y.reshape((nq_pad, *y.shape[2:]))[: lay.n_query], ys)
    return out_carry, ys


# ----------------------------------------------------------------------------------------------
# Pieces of chunk bodies (they run per device inside shard_map; `axes` = all mesh axes).


def global_top1(s: jax.Array, gids: jax.Array, axes) -> jax.Array:
    """Global index of each row's top-1 gallery item (lowest index among ties); s masked at pads."""
    best = jax.lax.pmax(jnp.max(s, axis=1), axes)
    local = jnp.min(jnp.where(s == best[:, None], gids[None, :], _NONE), axis=1)
    return jax.lax.pmin(local, axes)


def apply_score_norm(s, gids, log_norms, active, betas: tuple[float, ...], axes):
    """The ScoreNorm transform of a masked raw score block (see ScoreNorm for the formula).

    log_norms and active are the local gallery shard's (G_local, F) columns.
    """
    top1 = global_top1(s, gids, axes)
    is_top1 = gids[None, :] == top1[:, None]  # (c, G_local): one True per row, on one device
    on = jnp.stack(
        [jnp.sum(is_top1 & active[None, :, f], axis=1) for f in range(len(betas))], axis=1
    )
    on = jax.lax.psum(on, axes) > 0  # (c, F)
    subtract = sum(jnp.where(on[:, f, None], log_norms[None, :, f], 0.0) for f in range(len(betas)))
    normalised = float(sum(betas)) * s - subtract
    return jnp.where(jnp.any(on, axis=1)[:, None], normalised, s)


def masked_scores(q, g, gvalid, norm_cols, betas, gids, axes):
    """Raw scores with padded gallery entries at -inf, then the optional ScoreNorm transform."""
    s = jnp.where(gvalid[None, :], similarity(q, g), _NEG_INF)
    if betas:
        log_norms, active = norm_cols
        s = apply_score_norm(s, gids, log_norms, active, betas, axes)
    return s


def _rank_body(carry, q, qcols, g, gcols, *, axes, betas):
    """Per query: 0-based stable-sort position of its best positive, or -1 without positives."""
    _, qlab = qcols
    gids, gvalid, glab, *norm_cols = gcols
    s = masked_scores(q, g, gvalid, norm_cols, betas, gids, axes)
    pos = (qlab[:, None] == glab[None, :]) & gvalid[None, :]
    sp = jax.lax.pmax(jnp.max(jnp.where(pos, s, _NEG_INF), axis=1), axes)
    tied_pos = pos & (s == sp[:, None])
    pidx = jax.lax.pmin(jnp.min(jnp.where(tied_pos, gids[None, :], _NONE), axis=1), axes)
    before = (s > sp[:, None]) | ((s == sp[:, None]) & (gids[None, :] < pidx[:, None]))
    count = jax.lax.psum(jnp.sum(before, axis=1, dtype=jnp.int32), axes)
    return carry, jnp.where(pidx == _NONE, -1, count)


def score_norm_columns(score_norm: ScoreNorm | None):
    """ScoreNorm arrays as gallery columns (gallery on axis 0) plus the static betas."""
    if score_norm is None:
        return (), ()
    log_norms = jnp.asarray(score_norm.log_norms, jnp.float32).T
    active = jnp.asarray(score_norm.active, bool).T
    return ((log_norms, 0.0), (active, False)), tuple(float(b) for b in score_norm.betas)


def retrieval_ranks(
    query_emb,
    gallery_emb,
    query_labels,
    gallery_labels,
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    mesh: jax.sharding.Mesh | None = None,
    score_norm: ScoreNorm | None = None,
) -> np.ndarray:
    """1-based rank of the best positive for every query (0 where a query has no positive).

    Gallery item g is a positive of query q iff gallery_labels[g] == query_labels[q] (labels are
    non-negative ints), so one-to-one, one-to-many and many-to-one retrieval all use this. Ties
    are broken by gallery index as a stable descending sort would (see the module docstring).
    score_norm, if given, is a ScoreNorm prepared for this gallery (hubness.py).
    """
    qlab = jnp.asarray(query_labels, jnp.int32)
    glab = jnp.asarray(gallery_labels, jnp.int32)
    if qlab.shape != (np.shape(query_emb)[0],) or glab.shape != (np.shape(gallery_emb)[0],):
        raise ValueError("need one label per query and per gallery item")
    norm_cols, betas = score_norm_columns(score_norm)
    _, rank0 = run_chunked(
        _rank_body,
        {"betas": betas},
        queries=query_emb,
        query_cols=[(qlab, -1)],
        gallery=gallery_emb,
        gallery_cols=[(glab, -2), *norm_cols],
        query_chunk=query_chunk,
        mesh=mesh,
    )
    return np.asarray(rank0).astype(np.int64) + 1


def apply_postproc(postproc, gallery_emb, mesh, query_chunk) -> tuple[Any, ScoreNorm | None]:
    """(the gallery to score against, its ScoreNorm or None) for a post-processor spec.

    A score normaliser (QB-Norm, DBNorm, a ScoreNorm) keeps the gallery and returns
    postproc.prepare(gallery); a gallery rewriter (InvGC) returns postproc.rewrite_gallery(gallery)
    and plain scores. None leaves both as they are.
    """
    if postproc is None:
        return gallery_emb, None
    if hasattr(postproc, "rewrite_gallery"):
        return postproc.rewrite_gallery(gallery_emb, mesh=mesh, query_chunk=query_chunk), None
    return gallery_emb, postproc.prepare(gallery_emb, mesh=mesh, query_chunk=query_chunk)


def rank_summary(ranks: np.ndarray, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """R@k (fraction of ranks <= k), mean and median of 1-based ranks."""
    ranks = np.asarray(ranks)
    out = {f"{prefix}_r{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics(
    image_emb,
    text_emb,
    text_to_image,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    mesh: jax.sharding.Mesh | None = None,
    postproc: Mapping[str, Any] | None = None,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Image<->text retrieval metrics: R@k, mean and median rank in both directions.

    image_emb (N_img, d), text_emb (N_txt, d): L2-normalised embeddings (numpy or jax).
    text_to_image (N_txt,): the image index of each caption; any number (>= 1) of captions per
    image.
    i2t: an image's rank is the best rank among its captions (hit at k if any caption is in the
    top k); t2i: the rank of the caption's image. Ranks are 1-based, ties broken by gallery index
    (stable descending sort). R@k are fractions in [0, 1].
    postproc: optional {"i2t": pp, "t2i": pp}; each pp has prepare(gallery_emb, *, mesh,
    query_chunk) -> ScoreNorm (hubness.QBNorm, hubness.DBNorm, or a ScoreNorm) or
    rewrite_gallery(gallery_emb, *, mesh, query_chunk) -> gallery (hubness.InvGC), and is built
    with banks of that direction's modalities (t2i: a text query bank, an image gallery bank).
    return_ranks adds "i2t_ranks" (per image) and "t2i_ranks" (per caption) as numpy arrays.
    """
    postproc = dict(postproc or {})
    unknown = set(postproc) - {"i2t", "t2i"}
    if unknown:
        raise ValueError(f"postproc keys must be 'i2t' and/or 't2i', got {sorted(unknown)}")
    n_img, n_txt = np.shape(image_emb)[0], np.shape(text_emb)[0]
    t2i = np.asarray(text_to_image).astype(np.int64)
    if t2i.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape ({n_txt},), got {t2i.shape}")
    if n_txt and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError("text_to_image holds indices outside [0, N_img)")
    uncaptioned = np.flatnonzero(np.bincount(t2i, minlength=n_img) == 0)
    if uncaptioned.size:
        raise ValueError(f"{uncaptioned.size} images have no caption, e.g. {uncaptioned[:5]}")

    img_ids = np.arange(n_img)
    text_gallery, text_norm = apply_postproc(postproc.get("i2t"), text_emb, mesh, query_chunk)
    i2t_ranks = retrieval_ranks(
        image_emb, text_gallery, img_ids, t2i, query_chunk=query_chunk, mesh=mesh,
        score_norm=text_norm,
    )  # fmt: skip
    image_gallery, image_norm = apply_postproc(postproc.get("t2i"), image_emb, mesh, query_chunk)
    t2i_ranks = retrieval_ranks(
        text_emb, image_gallery, t2i, img_ids, query_chunk=query_chunk, mesh=mesh,
        score_norm=image_norm,
    )  # fmt: skip
    out: dict[str, Any] = rank_summary(i2t_ranks, ks, "i2t") | rank_summary(t2i_ranks, ks, "t2i")
    if return_ranks:
        out["i2t_ranks"] = i2t_ranks
        out["t2i_ranks"] = t2i_ranks
    return out


def compiled_memory(
    n_query: int,
    n_gallery: int,
    dim: int,
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, int] | None:
    """Compiled per-device memory of the rank program (bytes), or None where XLA does not say.

    Lowers the same program retrieval_ranks runs, on abstract shapes, so it costs a compile and no
    compute. temp is the scratch the chunk loop needs: it should scale with
    query_chunk x n_gallery / n_devices and not with n_query.
    """
    mesh = eval_mesh(mesh)
    lay = _layout(n_query, n_gallery, query_chunk, mesh)
    rep = jax.NamedSharding(mesh, P())
    shd = jax.NamedSharding(mesh, P(tuple(mesh.axis_names)))
    sds = jax.ShapeDtypeStruct
    qs = sds((lay.n_chunks, lay.chunk, dim), jnp.float32, sharding=rep)
    qcols = (
        sds((lay.n_chunks, lay.chunk), jnp.bool_, sharding=rep),
        sds((lay.n_chunks, lay.chunk), jnp.int32, sharding=rep),
    )
    g = sds((lay.gallery_padded, dim), jnp.float32, sharding=shd)
    gcols = tuple(
        sds((lay.gallery_padded,), dt, sharding=shd) for dt in (jnp.int32, jnp.bool_, jnp.int32)
    )
    fn = _program(_rank_body, (("betas", ()),), mesh, False)
    analysis = fn.lower(qs, qcols, g, gcols, ()).compile().memory_analysis()
    if analysis is None:
        return None
    return {
        "temp": int(analysis.temp_size_in_bytes),
        "argument": int(analysis.argument_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
    }
