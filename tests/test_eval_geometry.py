"""Geometry diagnostics: hand-computed values (antipodal pairs, identical pairs, collapsed
embeddings, rank variance of known rankings) and float64 numpy references.

Tolerances: gap and alignment are float32 means of O(1) terms (rtol 1e-5). Uniformity uses the
dot-product identity ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b in float32, whose cancellation error is
~1e-6 absolute; after exp/log that is ~1e-5 on the result (atol 5e-5; observed ~1e-6).
"""

import itertools

import jax
import numpy as np
import pytest

from jaxclip.evals import geometry, intra, retrieval

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ref_uniformity(x, t):
    x = x.astype(np.float64)
    vals = [-t * np.sum((x[i] - x[j]) ** 2) for i, j in itertools.combinations(range(len(x)), 2)]
    vals = np.array(vals)
    return float(vals.max() + np.log(np.mean(np.exp(vals - vals.max()))))


def test_antipodal_pair_uniformity_is_minus_8():
    x = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    assert geometry.uniformity(x) == pytest.approx(-8.0, abs=1e-6)
    # L_U = 1/2 u(x) + 1/2 u(y): antipodal in both modalities is also -8.
    assert geometry.uniformity_loss(x, x[:, ::-1]) == pytest.approx(-8.0, abs=1e-6)


def test_collapsed_embeddings_have_zero_uniformity_and_identical_pairs_zero_alignment():
    rng = np.random.default_rng(0)
    x = np.tile(unit_rows(rng, 1, 16), (10, 1))
    assert geometry.uniformity(x) == pytest.approx(0.0, abs=1e-6)
    y = unit_rows(rng, 12, 16)
    assert geometry.alignment(y, y) == 0.0
    assert geometry.modality_gap(y, y) == pytest.approx(0.0, abs=1e-6)


def test_gap_and_alignment_hand_values():
    x = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    y = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32)
    assert geometry.modality_gap(x, y) == pytest.approx(1.0)  # means (1, 0) and (0, 0)
    assert geometry.alignment(x, y) == pytest.approx(2.0)  # each pair at squared distance 2


@pytest.mark.parametrize("t", [2.0, 5.0])
@pytest.mark.parametrize("chunk", [7, 512])
def test_random_data_matches_numpy(t, chunk):
    rng = np.random.default_rng(1)
    x, y = unit_rows(rng, 41, 16), unit_rows(rng, 41, 16)
    y = (y + 2 * x) / np.linalg.norm(y + 2 * x, axis=1, keepdims=True)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    gap = np.linalg.norm(x64.mean(0) - y64.mean(0))
    assert geometry.modality_gap(x, y) == pytest.approx(gap, rel=1e-5)
    align = np.mean(np.sum((x64 - y64) ** 2, axis=1))
    assert geometry.alignment(x, y) == pytest.approx(align, rel=1e-5)
    got = geometry.uniformity(x, t, query_chunk=chunk)
    assert got == pytest.approx(ref_uniformity(x, t), abs=5e-5)


@needs_8
def test_uniformity_sharded_matches_numpy():
    rng = np.random.default_rng(2)
    x = unit_rows(rng, 61, 8)
    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    got = geometry.uniformity(x, mesh=mesh, query_chunk=9)
    assert got == pytest.approx(ref_uniformity(x, 2.0), abs=5e-5)


def test_geometry_metrics_with_multiple_captions():
    rng = np.random.default_rng(3)
    img = unit_rows(rng, 12, 8)
    t2i = np.repeat(np.arange(12), 3)
    txt = unit_rows(rng, 36, 8)
    got = geometry.geometry_metrics(img, txt, t2i)
    assert got["alignment"] == pytest.approx(
        np.mean(np.sum((img[t2i].astype(np.float64) - txt) ** 2, axis=1)), rel=1e-5
    )
    assert got["uniformity_image"] == pytest.approx(ref_uniformity(img, 2.0), abs=5e-5)
    assert got["uniformity_text"] == pytest.approx(ref_uniformity(txt, 2.0), abs=5e-5)
    assert got["uniformity_loss"] == pytest.approx(
        0.5 * (got["uniformity_image"] + got["uniformity_text"]), rel=1e-12
    )
    assert got["modality_gap"] == pytest.approx(
        np.linalg.norm(img.mean(0, dtype=np.float64) - txt.mean(0, dtype=np.float64)), rel=1e-5
    )


def test_mrv_hand_values():
    assert geometry.mean_rank_variance([[3, 3, 3], [1, 1, 1]]) == 0.0
    assert geometry.mean_rank_variance([[0, 4]]) == 4.0
    assert geometry.mean_rank_variance([[0, 4]], reduce="std") == 2.0
    # Mean over instances: var 4 and var 0 -> 2.
    assert geometry.mean_rank_variance([[0, 4], [7, 7]]) == 2.0
    with pytest.raises(ValueError):
        geometry.mean_rank_variance([[0, 4]], reduce="mad")


def test_mrv_random_matches_loop_reference():
    rng = np.random.default_rng(4)
    ranks = rng.integers(1, 50, size=(30, 4))
    var = np.mean([np.mean((r - r.mean()) ** 2) for r in ranks.astype(np.float64)])
    assert geometry.mean_rank_variance(ranks) == pytest.approx(var, rel=1e-12)
    assert geometry.mean_rank_variance(ranks, "std") == pytest.approx(
        np.mean([np.sqrt(np.mean((r - r.mean()) ** 2)) for r in ranks.astype(np.float64)]),
        rel=1e-12,
    )


def test_mrv_from_retrieval_ranks_with_shuffled_captions():
    rng = np.random.default_rng(5)
    k = 4
    t2i = rng.permutation(np.repeat(np.arange(15), k))
    img = unit_rows(rng, 15, 16)
    txt = img[t2i] + 0.8 * unit_rows(rng, len(t2i), 16)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ranks = retrieval.retrieval_metrics(img, txt, t2i, return_ranks=True)["t2i_ranks"]
    grouped = geometry.group_ranks(ranks, t2i)
    for i in range(15):  # row i holds image i's captions' ranks, in caption order
        np.testing.assert_array_equal(grouped[i], ranks[t2i == i])
    want = np.mean([np.var(ranks[t2i == i]) for i in range(15)])
    assert geometry.mean_rank_variance(grouped) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="same number"):
        geometry.group_ranks(ranks[:-1], t2i[:-1])


def test_same_label_precision_matches_a_loop_reference():
    """Intra-modal P@k (evals/intra.py) against a per-query full sort, in several chunks."""
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 4, 50)
    got = intra.same_label_precision(emb, labels, (1, 5), chunk=16)
    for k in (1, 5):
        want = []
        for q in range(50):
            s = (emb @ emb[q]).astype(np.float64)
            s[q] = -np.inf
            want.append(np.mean(labels[np.argsort(-s)[:k]] == labels[q]))
        assert got[f"i2i_p{k}"] == pytest.approx(np.mean(want), rel=1e-9)
    same = labels[:, None] == labels[None, :]
    assert got["i2i_chance"] == pytest.approx((same.sum() - 50) / (50 * 49), rel=1e-9)
    # Embeddings that are their label (one-hot): every neighbour shares it.
    perfect = intra.same_label_precision(np.eye(4)[labels], labels, (1, 5))
    assert perfect["i2i_p1"] == perfect["i2i_p5"] == 1.0
