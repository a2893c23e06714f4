"""QB-Norm / DBNorm / inverted softmax against float64 numpy references, plus behavioural checks.

Embeddings are dyadic (multiples of 2^-6, see test_eval_retrieval.py) where integer results
(activation sets, k-occurrence counts, ranks) are compared exactly: raw scores are then exact in
float32 and ties are real. Normalised scores go through exp/log in float32, so they are compared
with a tolerance of about 8 float32 ulps of the largest score: atol 3e-5 at beta <= 20 (scores up to
~30, ulp 3.8e-6; observed error 1.4e-6) and atol 1e-3 at beta = 1000 (scores up to ~1800, ulp
1.2e-4; observed error 4e-5). The naive exp(beta * s) / sum formula overflows float32 there.
"""

import jax
import numpy as np
import pytest

from jaxclip.evals import hubness, retrieval

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def dyadic(rng, n, d, quantum=2.0**-6):
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x / quantum) * quantum).astype(np.float32)


def mesh8(shape=(4, 2, 1)):
    return jax.make_mesh(
        shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )


def sims(a, b):
    return a.astype(np.float64) @ b.astype(np.float64).T


def ref_lse(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def ref_topk(s, k):
    """Top-k gallery indices per row, stable descending sort (ties: lower index first)."""
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def ref_counts(s, k):
    return np.bincount(ref_topk(s, k).ravel(), minlength=s.shape[1])


def ref_postproc(q, gallery, factors):
    """factors: (bank, beta, k or None); None = plain IS (always on). float64 throughout."""
    s = sims(q, gallery)
    top1 = ref_topk(s, 1)[:, 0]
    scale = sum(beta for _, beta, _ in factors)
    sub = np.zeros_like(s)
    any_on = np.zeros(len(q), bool)
    for bank, beta, k in factors:
        bs = sims(bank, gallery)
        norm = ref_lse(beta * bs, axis=0)
        on = np.ones(len(q), bool) if k is None else np.isin(top1, ref_topk(bs, k))
        sub += on[:, None] * norm[None, :]
        any_on |= on
    return np.where(any_on[:, None], scale * s - sub, s), any_on


def stable_ranks(s, labels_q, labels_g):
    order = np.argsort(-s, axis=1, kind="stable")
    return np.array(
        [np.flatnonzero(labels_g[order[i]] == labels_q[i])[0] + 1 for i in range(len(s))]
    )


@pytest.mark.parametrize("k", [1, 3])
def test_bank_statistics_match_reference(k):
    rng = np.random.default_rng(0)
    bank, gallery = dyadic(rng, 90, 16, 2.0**-3), dyadic(rng, 37, 16, 2.0**-3)
    gallery[20:25] = gallery[:5]  # exact ties between distinct gallery indices
    lse, counts = hubness.bank_statistics(bank, gallery, beta=20.0, k=k, query_chunk=32)
    s = sims(bank, gallery)
    np.testing.assert_allclose(np.asarray(lse), ref_lse(20 * s, axis=0), rtol=0, atol=3e-5)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts(s, k))
    if k == 1:  # a duplicate never wins a top-1: it loses the tie to its lower-index twin
        assert np.asarray(counts)[20:25].sum() == 0 and np.asarray(counts)[:5].sum() > 0


@needs_8
def test_bank_statistics_sharded_equal_single_device():
    rng = np.random.default_rng(1)
    bank, gallery = dyadic(rng, 70, 16, 2.0**-3), dyadic(rng, 61, 16, 2.0**-3)
    gallery[40:50] = gallery[:10]
    lse1, c1 = hubness.bank_statistics(bank, gallery, beta=3.0, k=4, query_chunk=16)
    lse8, c8 = hubness.bank_statistics(bank, gallery, beta=3.0, k=4, query_chunk=16, mesh=mesh8())
    np.testing.assert_array_equal(np.asarray(c8), np.asarray(c1))
    np.testing.assert_allclose(np.asarray(lse8), np.asarray(lse1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(c1), ref_counts(sims(bank, gallery), 4))


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_k_occurrence_matches_reference(mesh_shape):
    if mesh_shape is not None and jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    rng = np.random.default_rng(2)
    q, gallery = dyadic(rng, 80, 16, 2.0**-3), dyadic(rng, 45, 16, 2.0**-3)
    mesh = None if mesh_shape is None else mesh8(mesh_shape)
    got = hubness.k_occurrence(q, gallery, 10, query_chunk=24, mesh=mesh)
    np.testing.assert_array_equal(got, ref_counts(sims(q, gallery), 10))
    assert got.sum() == 80 * 10


def test_qbnorm_dis_scores_match_reference():
    rng = np.random.default_rng(3)
    q, gallery, bank = dyadic(rng, 50, 32), dyadic(rng, 40, 32), dyadic(rng, 30, 32)
    want, on = ref_postproc(q, gallery, [(bank, 20.0, 1)])
    assert 0 < on.sum() < len(q)  # both gated and raw rows occur
    got = hubness.postprocessed_scores(q, gallery, hubness.QBNorm(bank), query_chunk=16)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)
    np.testing.assert_array_equal(got[~on], sims(q, gallery)[~on])  # raw rows stay raw

    want_is, _ = ref_postproc(q, gallery, [(bank, 20.0, None)])
    got_is = hubness.postprocessed_scores(q, gallery, hubness.QBNorm(bank, dynamic=False))
    np.testing.assert_allclose(got_is, want_is, rtol=0, atol=3e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dbnorm_scores_match_reference(dynamic):
    rng = np.random.default_rng(4)
    q, gallery = dyadic(rng, 60, 32), dyadic(rng, 40, 32)
    qbank, gbank = dyadic(rng, 25, 32), dyadic(rng, 15, 32)
    k = 1 if dynamic else None
    want, _ = ref_postproc(q, gallery, [(qbank, 1 / 1.99, k), (gbank, 3.0, k)])
    spec = hubness.DBNorm(qbank, gbank, dynamic=dynamic)
    got = hubness.postprocessed_scores(q, gallery, spec, query_chunk=16)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)
    if dynamic:
        # All four gate combinations occur, so each factor's own activation set is exercised.
        top1 = ref_topk(sims(q, gallery), 1)[:, 0]
        on_q = np.isin(top1, ref_topk(sims(qbank, gallery), 1))
        on_g = np.isin(top1, ref_topk(sims(gbank, gallery), 1))
        combos = {(a, b) for a, b in zip(on_q, on_g)}
        assert combos == {(False, False), (False, True), (True, False), (True, True)}


@needs_8
@pytest.mark.parametrize(
    "spec_fn",
    [
        lambda qb, gb: hubness.QBNorm(qb, k=2),
        lambda qb, gb: hubness.DBNorm(qb, gb, dynamic=True),
        lambda qb, gb: hubness.DBNorm(qb, gb, beta_q=2.0, beta_g=5.0),
    ],
)
def test_ranks_with_postproc_follow_scores_and_shard(spec_fn):
    rng = np.random.default_rng(5)
    n_img = 45
    t2i = rng.permutation(np.repeat(np.arange(n_img), rng.integers(1, 4, size=n_img)))
    img = dyadic(rng, n_img, 32)
    txt = dyadic(rng, len(t2i), 32) + img[t2i]
    txt = (np.round(txt / np.linalg.norm(txt, axis=1, keepdims=True) * 64) / 64).astype(np.float32)
    spec = spec_fn(dyadic(rng, 50, 32), dyadic(rng, 30, 32))
    score_norm = spec.prepare(img)
    single = retrieval.retrieval_ranks(txt, img, t2i, np.arange(n_img), score_norm=score_norm)
    dense = hubness.postprocessed_scores(txt, img, spec)
    np.testing.assert_array_equal(single, stable_ranks(dense, t2i, np.arange(n_img)))
    sharded = retrieval.retrieval_ranks(
        txt, img, t2i, np.arange(n_img), score_norm=spec.prepare(img, mesh=mesh8()),
        mesh=mesh8(), query_chunk=7,
    )  # fmt: skip
    np.testing.assert_array_equal(sharded, single)
    # The post-processing does change rankings here, so the comparisons above are not vacuous.
    raw = retrieval.retrieval_ranks(txt, img, t2i, np.arange(n_img))
    assert np.any(raw != single)


def test_constant_bank_normaliser_leaves_metrics_unchanged():
    rng = np.random.default_rng(6)
    d = 32
    t2i = np.repeat(np.arange(30), 3)
    img = np.zeros((30, d), np.float32)
    img[:, :16] = dyadic(rng, 30, 16)
    txt = np.zeros((90, d), np.float32)
    txt[:, :16] = dyadic(rng, 90, 16) + img[t2i, :16]
    txt = np.round(txt / np.linalg.norm(txt, axis=1, keepdims=True) * 64) / 64
    # Banks live in the orthogonal half: s(b, g) = 0 for all pairs, so LSE_b is log(M) for every g.
    bank_t, bank_i = np.zeros((40, d), np.float32), np.zeros((20, d), np.float32)
    bank_t[:, 16:], bank_i[:, 16:] = dyadic(rng, 40, 16), dyadic(rng, 20, 16)
    postproc = {
        "t2i": hubness.QBNorm(bank_t, dynamic=False),
        "i2t": hubness.DBNorm(bank_i, bank_t[:25]),
    }
    norm = postproc["t2i"].prepare(img)
    np.testing.assert_allclose(np.asarray(norm.log_norms), np.log(40.0), rtol=1e-6)
    raw = retrieval.retrieval_metrics(img, txt, t2i, return_ranks=True)
    got = retrieval.retrieval_metrics(img, txt, t2i, postproc=postproc, return_ranks=True)
    for key in raw:
        np.testing.assert_array_equal(got[key], raw[key], err_msg=key)


def test_empty_activation_set_is_identity():
    rng = np.random.default_rng(7)
    q, gallery, bank = dyadic(rng, 40, 32), dyadic(rng, 50, 32), dyadic(rng, 60, 32)
    raw = sims(q, gallery)
    for spec in (hubness.QBNorm(bank, k=0), hubness.DBNorm(bank, bank, k=0, dynamic=True)):
        norm = spec.prepare(gallery)
        assert not np.asarray(norm.active).any()
        np.testing.assert_array_equal(hubness.postprocessed_scores(q, gallery, spec), raw)
    # With the default k = 1 the same bank does normalise some rows.
    assert np.any(hubness.postprocessed_scores(q, gallery, hubness.QBNorm(bank)) != raw)


def _hub_setup(seed):
    """Captions share a common direction u; a planted hub (their mean) steals many top-1s."""
    rng = np.random.default_rng(seed)
    d, n = 32, 200
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)

    def draw(m):
        img = rng.normal(size=(m, d))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img + 0.3 * rng.normal(size=(m, d)) + u
        return img.astype(np.float32), (txt / np.linalg.norm(txt, axis=1, keepdims=True))

    img, txt = draw(n)
    bank_img, bank_txt = draw(400)  # "training" captions and images from the same distribution
    hub = txt.mean(0) / np.linalg.norm(txt.mean(0))
    gallery = np.concatenate([img, hub[None]]).astype(np.float32)
    return txt.astype(np.float32), gallery, bank_txt.astype(np.float32), bank_img


def test_planted_hub_is_demoted():
    txt, gallery, bank_txt, bank_img = _hub_setup(0)
    hub = len(gallery) - 1
    labels_q, labels_g = np.arange(len(txt)), np.arange(len(gallery))
    qb = hubness.QBNorm(bank_txt)
    raw_r1 = np.mean(retrieval.retrieval_ranks(txt, gallery, labels_q, labels_g) == 1)
    qb_ranks = retrieval.retrieval_ranks(
        txt, gallery, labels_q, labels_g, score_norm=qb.prepare(gallery)
    )
    raw_n1 = hubness.k_occurrence(txt, gallery, 1)[hub]
    raw_n10 = hubness.k_occurrence(txt, gallery, 10)
    qb_n10 = hubness.k_occurrence(txt, gallery, 10, postproc=qb)
    assert raw_n1 > 40  # the hub really steals top-1s before post-processing
    assert hubness.k_occurrence(txt, gallery, 1, postproc=qb)[hub] < 5
    assert qb_n10[hub] < raw_n10[hub] / 2
    assert hubness.skewness(qb_n10) < hubness.skewness(raw_n10) / 2
    assert np.mean(qb_ranks == 1) > raw_r1 + 0.1
    # DBNorm at its (gentle) defaults also pushes the hub down.
    db = hubness.DBNorm(bank_txt, bank_img)
    assert hubness.k_occurrence(txt, gallery, 1, postproc=db)[hub] < 0.8 * raw_n1


def test_large_beta_is_finite_and_matches_float64():
    rng = np.random.default_rng(8)
    q, gallery, bank = dyadic(rng, 30, 32), dyadic(rng, 40, 32), dyadic(rng, 50, 32)
    with np.errstate(over="ignore"):  # the naive float32 formula overflows in this regime
        assert np.isinf(np.exp(np.float32(1000) * sims(bank, gallery).astype(np.float32))).any()
    for spec, factors in (
        (hubness.QBNorm(bank, beta=1000.0, dynamic=False), [(bank, 1000.0, None)]),
        (hubness.QBNorm(bank, beta=1000.0), [(bank, 1000.0, 1)]),
        (hubness.DBNorm(bank, gallery, beta_q=1000.0, beta_g=500.0), [(bank, 1000.0, None),
                                                                      (gallery, 500.0, None)]),
    ):  # fmt: skip
        got = hubness.postprocessed_scores(q, gallery, spec)
        assert np.isfinite(got).all()
        want, _ = ref_postproc(q, gallery, factors)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_skewness_hand_values():
    assert hubness.skewness([0, 0, 3]) == pytest.approx(2 / 2**1.5, rel=1e-12)
    assert hubness.skewness([5, 5, 5]) == 0.0
    assert hubness.skewness([3, 0, 0, 0, 0, 0]) > hubness.skewness([1, 1, 0, 1, 0, 0])


# ----------------------------------------------------------------------------------------------
# InvGC: the gallery moves away from its neighbours in two banks (float64 references).


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_inverse_convolution(g, bank, r, local_adj, pool_rate):
    s = sims(g, bank)
    if local_adj:
        k = max(1, int(pool_rate * len(bank)))
        top = ref_topk(s, k)
        w = np.zeros_like(s)
        np.put_along_axis(w, top, np.take_along_axis(s, top, axis=1), axis=1)
        message = w @ bank / k
    else:
        message = (s - s.mean()) @ bank / len(bank)
    return unit(g - r * message)


def ref_invgc(g, query_bank, gallery_bank, r_q, r_g, local_adj=True, pool_rate=0.01):
    g = g.astype(np.float64)
    moved_g = ref_inverse_convolution(g, gallery_bank.astype(np.float64), r_g, local_adj, pool_rate)
    moved_q = ref_inverse_convolution(g, query_bank.astype(np.float64), r_q, local_adj, pool_rate)
    return unit(0.5 * moved_g + 0.5 * moved_q)


def cone(rng, n, d=16, spread=1.0, axis=None):
    """Unit vectors crowded around a shared direction (the degenerate cone InvGC is for)."""
    axis = np.ones(d) / np.sqrt(d) if axis is None else axis
    return unit(rng.normal(size=(n, d)) * spread / np.sqrt(d) + axis).astype(np.float32)


@needs_8
@pytest.mark.parametrize("local_adj", [True, False], ids=["local_adj", "full_graph"])
def test_invgc_matches_reference_and_shards(local_adj):
    rng = np.random.default_rng(11)
    gallery, qbank, gbank = cone(rng, 37), unit(rng.normal(size=(90, 16))), cone(rng, 70)
    spec = hubness.InvGC(qbank.astype(np.float32), gbank, r_q=0.7, r_g=0.4, local_adj=local_adj,
                         pool_rate=0.05)  # k = 4 of 90 query-bank rows, 3 of 70 gallery-bank rows
    want = ref_invgc(gallery, qbank, gbank, 0.7, 0.4, local_adj, 0.05)
    got = np.asarray(spec.rewrite_gallery(gallery, query_chunk=8))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=1e-6)
    sharded = np.asarray(spec.rewrite_gallery(gallery, mesh=mesh8(), query_chunk=5))
    np.testing.assert_allclose(sharded, got, rtol=0, atol=1e-6)
    # Scores are plain cosines against the moved gallery.
    q = unit(rng.normal(size=(20, 16))).astype(np.float32)
    np.testing.assert_allclose(hubness.postprocessed_scores(q, gallery, spec), sims(q, want),
                               rtol=0, atol=2e-6)


def test_invgc_with_rates_zero_is_the_identity():
    rng = np.random.default_rng(12)
    n_img = 40
    t2i = np.repeat(np.arange(n_img), 2)
    img = cone(rng, n_img)
    txt = unit(img[t2i] + 0.5 * rng.normal(size=(2 * n_img, 16))).astype(np.float32)
    banks = cone(rng, 60), unit(rng.normal(size=(50, 16))).astype(np.float32)
    for local_adj in (True, False):
        spec = hubness.InvGC(*banks, r_q=0.0, r_g=0.0, local_adj=local_adj)
        np.testing.assert_array_equal(np.asarray(spec.rewrite_gallery(img)), img)
        raw = retrieval.retrieval_metrics(img, txt, t2i, return_ranks=True)
        got = retrieval.retrieval_metrics(img, txt, t2i, return_ranks=True,
                                          postproc={"t2i": spec, "i2t": spec})
        for key in raw:
            np.testing.assert_array_equal(got[key], raw[key], err_msg=key)
    # With one rate at zero only the other bank moves the gallery (the zero side stays g).
    only_g = hubness.InvGC(*banks, r_q=0.0, r_g=0.8)
    want = unit(0.5 * ref_inverse_convolution(img.astype(np.float64), banks[1], 0.8, True, 0.01)
                + 0.5 * img)
    np.testing.assert_allclose(np.asarray(only_g.rewrite_gallery(img)), want, rtol=0, atol=2e-6)


def test_invgc_at_rate_one_removes_the_neighbour_component():
    # One bank row b and k = 1: g' = normalize(g - r (g.b) b), so r = 1 projects b out of every g.
    rng = np.random.default_rng(13)
    gallery = cone(rng, 25)
    b = unit(rng.normal(size=(1, 16)) + 0.5).astype(np.float32)
    assert np.all(np.abs(gallery @ b.T) > 0.05)  # every item has a component along b
    spec = hubness.InvGC(b, b, r_q=1.0, r_g=1.0, pool_rate=1.0)
    moved = np.asarray(spec.rewrite_gallery(gallery))
    np.testing.assert_allclose(moved @ b.T, 0.0, atol=1e-6)
    # What is left of g is its part orthogonal to b.
    rest = gallery - (gallery @ b.T) * b
    np.testing.assert_allclose(moved, unit(rest), atol=2e-6)


def test_invgc_spreads_a_crowded_gallery():
    # The representation degeneration InvGC targets: items in a narrow cone. Banks drawn from the
    # same distributions as the test gallery and its queries. This holds for LocalAdj (the
    # default). The full graph's mean-centred weights do not spread a cone: its message is
    # Cov_B g + mean(B) mean(B).(g - mean(G)), which shrinks how items differ and keeps what they
    # share (here the mean cosine rises by about 0.01 at r = 1).
    rng = np.random.default_rng(14)
    axis = unit(rng.normal(size=16))
    gallery, gbank = cone(rng, 80, spread=0.8, axis=axis), cone(rng, 300, spread=0.8, axis=axis)
    qbank = cone(rng, 300, spread=1.5, axis=unit(axis + 0.5 * unit(rng.normal(size=16))))

    def mean_offdiag_cosine(x):
        s = sims(x, x)
        return s[~np.eye(len(x), dtype=bool)].mean()

    before = mean_offdiag_cosine(gallery)
    moved = np.asarray(hubness.InvGC(qbank, gbank, r_q=1.0, r_g=1.0, pool_rate=0.05)
                       .rewrite_gallery(gallery))
    assert mean_offdiag_cosine(moved) < before - 0.2


def _leaning_hubs(seed, n=200, d=32, n_hubs=10, lean=2.0):
    """Captions share a direction u; a few images lean towards u and so are close to every
    caption (hubs). The training banks have the same make-up: most images do not lean."""
    rng = np.random.default_rng(seed)
    u = unit(rng.normal(size=d))

    def draw(m, m_lean):
        z = unit(rng.normal(size=(m, d)))
        txt = unit(z + 0.3 * rng.normal(size=(m, d)) + u)
        img = unit(z + np.where(np.arange(m) < m_lean, lean, 0.0)[:, None] * u)
        return img.astype(np.float32), txt.astype(np.float32)

    img, txt = draw(n, n_hubs)
    bank_img, bank_txt = draw(400, 2 * n_hubs)
    return img, txt, bank_img, bank_txt


def test_invgc_demotes_gallery_hubs():
    # A hub sits in a crowded region of the gallery distribution: its nearest gallery-bank rows
    # are close, so LocalAdj pushes it away hardest, while an ordinary item's neighbours are
    # far and it barely moves. The paper's claim: fewer hubs, higher recall.
    img, txt, bank_img, bank_txt = _leaning_hubs(0)
    hubs, ids = np.arange(10), np.arange(len(img))
    spec = hubness.InvGC(bank_txt, bank_img, r_q=2.0, r_g=2.0)
    raw_n1 = hubness.k_occurrence(txt, img, 1)
    inv_n1 = hubness.k_occurrence(txt, img, 1, postproc=spec)
    assert raw_n1[hubs].sum() > 60  # ten images take more than 60 of the 200 top-1s
    assert inv_n1[hubs].sum() < raw_n1[hubs].sum() / 4
    raw_n10 = hubness.k_occurrence(txt, img, 10)
    inv_n10 = hubness.k_occurrence(txt, img, 10, postproc=spec)
    assert hubness.skewness(inv_n10) < hubness.skewness(raw_n10) - 1
    raw_r1 = np.mean(retrieval.retrieval_ranks(txt, img, ids, ids) == 1)
    gallery = spec.rewrite_gallery(img)
    assert np.mean(retrieval.retrieval_ranks(txt, gallery, ids, ids) == 1) > raw_r1 + 0.05


def test_invgc_is_a_retrieval_evaluator_option():
    from jaxclip.evals import evaluators
    from jaxclip.evals.registry import resolve

    spec = resolve("x", dict(type="retrieval", postproc="invgc", r_g=0.5))
    assert (spec["r_g"], spec["r_q"], spec["local_adj"], spec["pool_rate"]) == (0.5, 0.1, True,
                                                                               0.01)
    bank_img, bank_txt = np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32)
    built = evaluators._postprocessors(spec, bank_img, bank_txt)
    # t2i moves the image gallery against training captions (queries) and training images.
    assert built["t2i"].query_bank is bank_txt and built["t2i"].gallery_bank is bank_img
    assert built["i2t"].query_bank is bank_img and built["i2t"].gallery_bank is bank_txt
    assert (built["t2i"].r_g, built["t2i"].r_q, built["t2i"].pool_rate) == (0.5, 0.1, 0.01)
    for bad, message in ((dict(r_q=-1.0), "r_q must be a number >= 0"),
                         (dict(pool_rate=0.0), r"pool_rate must be in \(0, 1\]"),
                         (dict(local_adj="maybe"), "local_adj must be true or false")):
        with pytest.raises(ValueError, match=message):
            resolve("x", dict(type="retrieval", postproc="invgc", **bad))
