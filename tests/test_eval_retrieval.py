"""Retrieval metrics against a numpy reference, and invariance to chunking and sharding.

Exactness. Most tests use "dyadic" embeddings: entries are multiples of 2^-6, so every product is a
multiple of 2^-12 and every dot product is exact in float32 whatever the summation order. Device
scores then equal the float64 numpy scores bit for bit, ties are real ties (they occur often at
this resolution, which exercises the tie rule), and integer ranks can be compared with ==.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip.evals import retrieval

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def dyadic(rng, n, d, quantum=2.0**-6):
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x / quantum) * quantum).astype(np.float32)


def paired(rng, n_img, t2i, d=32, noise=0.7):
    """Images and captions that are noisy copies of their image, both dyadic."""
    img = dyadic(rng, n_img, d)
    txt = img[t2i] + noise * rng.normal(size=(len(t2i), d))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, (np.round(txt * 64) / 64).astype(np.float32)


def ref_ranks(q, g, qlab, glab):
    """1-based position of the first positive in a stable descending sort (float64 scores)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")
    return np.array([np.flatnonzero(glab[order[i]] == qlab[i])[0] + 1 for i in range(len(q))])


def ref_metrics(img, txt, t2i, ks=(1, 5, 10)):
    out = {}
    for name, ranks in (
        ("i2t", ref_ranks(img, txt, np.arange(len(img)), t2i)),
        ("t2i", ref_ranks(txt, img, t2i, np.arange(len(img)))),
    ):
        for k in ks:
            out[f"{name}_r{k}"] = float(np.mean(ranks <= k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        out[f"{name}_median_rank"] = float(np.median(ranks))
        out[f"{name}_ranks"] = ranks
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for key in want:
        if key.endswith("_ranks"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=0), key


def test_coco_style_five_captions_matches_reference():
    rng = np.random.default_rng(0)
    t2i = np.repeat(np.arange(40), 5)
    img, txt = paired(rng, 40, t2i)
    got = retrieval.retrieval_metrics(img, txt, t2i, query_chunk=16, return_ranks=True)
    assert_same(got, ref_metrics(img, txt, t2i))
    # The data is neither trivial nor hopeless, so the comparison says something.
    assert 0.1 < got["t2i_r1"] < 0.9 and 0.1 < got["i2t_r1"] < 0.95


def test_unequal_caption_counts_shuffled_order_matches_reference():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 8, size=33)
    t2i = rng.permutation(np.repeat(np.arange(33), counts))
    img, txt = paired(rng, 33, t2i)
    got = retrieval.retrieval_metrics(
        jnp.asarray(img), jnp.asarray(txt), t2i, ks=(1, 3), query_chunk=10, return_ranks=True
    )
    assert_same(got, ref_metrics(img, txt, t2i, ks=(1, 3)))


def test_ties_broken_by_gallery_index_like_a_stable_sort():
    # Hand-made: three identical images; every caption scores the same against all of them.
    img = np.tile(np.array([[1.0, 0.0]], np.float32), (3, 1))
    txt = np.array([[0.0, 1.0], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], np.float32)
    t2i = np.array([1, 2, 0, 1])
    m = retrieval.retrieval_metrics(img, txt, t2i, ks=(1,), return_ranks=True)
    # Caption c ranks its image at (image index + 1): images 1, 2, 0, 1.
    np.testing.assert_array_equal(m["t2i_ranks"], [2, 3, 1, 2])
    # Image 1 owns captions 0 and 3; caption 3 scores 1.0 (top); image 0 owns caption 2 (0.6) which
    # ties with caption 1 (0.6), lower index first, behind caption 3.
    np.testing.assert_array_equal(m["i2t_ranks"], [3, 1, 2])


def test_heavy_ties_match_stable_reference():
    # Sign vectors / 4 in d=16: unit norm, scores are multiples of 1/8, so most scores tie.
    rng = np.random.default_rng(2)
    img = (rng.choice([-1.0, 1.0], size=(30, 16)) / 4).astype(np.float32)
    img[10:20] = img[:10]  # duplicated gallery items: exact ties with different indices
    t2i = rng.integers(0, 30, size=120)
    t2i[:30] = np.arange(30)
    txt = img[t2i].copy()
    flip = rng.random(size=txt.shape) < 0.3
    txt[flip] *= -1
    got = retrieval.retrieval_metrics(img, txt, t2i, query_chunk=13, return_ranks=True)
    want = ref_metrics(img, txt, t2i)
    assert_same(got, want)
    # The tie rule is what is being tested: breaking ties the other way changes many ranks.
    s = txt.astype(np.float64) @ img.T.astype(np.float64)
    sp = s[np.arange(len(t2i)), t2i]
    optimistic = (s > sp[:, None]).sum(1) + 1
    assert np.sum(optimistic != want["t2i_ranks"]) > 20


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked(chunk):
    rng = np.random.default_rng(3)
    t2i = rng.permutation(np.repeat(np.arange(50), rng.integers(1, 6, size=50)))
    img, txt = paired(rng, 50, t2i)
    full = retrieval.retrieval_metrics(img, txt, t2i, query_chunk=10_000, return_ranks=True)
    got = retrieval.retrieval_metrics(img, txt, t2i, query_chunk=chunk, return_ranks=True)
    assert_same(got, full)


@needs_8
@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_on_8_devices_equals_single_device(shape):
    rng = np.random.default_rng(4)
    n_img = 61  # not divisible by 8: the padding must be masked
    t2i = rng.permutation(np.repeat(np.arange(n_img), rng.integers(1, 6, size=n_img)))
    img, txt = paired(rng, n_img, t2i)
    mesh = jax.make_mesh(
        shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    single = retrieval.retrieval_metrics(img, txt, t2i, query_chunk=32, return_ranks=True)
    sharded = retrieval.retrieval_metrics(
        img, txt, t2i, query_chunk=9, mesh=mesh, return_ranks=True
    )
    assert_same(sharded, single)
    assert_same(single, ref_metrics(img, txt, t2i))


@needs_8
def test_gallery_smaller_than_device_count():
    rng = np.random.default_rng(5)
    t2i = np.array([0, 1, 2, 0, 1])
    img, txt = paired(rng, 3, t2i)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    got = retrieval.retrieval_metrics(img, txt, t2i, mesh=mesh, return_ranks=True)
    assert_same(got, ref_metrics(img, txt, t2i))


def test_generic_ranks_report_zero_without_positive():
    rng = np.random.default_rng(6)
    q, g = dyadic(rng, 4, 8), dyadic(rng, 6, 8)
    ranks = retrieval.retrieval_ranks(q, g, [0, 1, 7, 2], [0, 1, 2, 0, 1, 2], query_chunk=3)
    assert ranks[2] == 0
    keep = [0, 1, 3]
    want = ref_ranks(q[keep], g, np.array([0, 1, 2]), np.array([0, 1, 2, 0, 1, 2]))
    np.testing.assert_array_equal(ranks[keep], want)


def test_rejects_bad_inputs():
    img = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no caption"):
        retrieval.retrieval_metrics(img, img[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval.retrieval_metrics(img, img, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="postproc keys"):
        retrieval.retrieval_metrics(img, img, np.arange(3), postproc={"t2t": None})


def test_compiled_memory_does_not_grow_with_queries():
    # No queries x gallery matrix: the chunk loop's scratch depends on chunk and gallery only.
    small = retrieval.compiled_memory(2048, 4096, 64, query_chunk=128)
    if small is None:
        pytest.skip("this backend reports no memory analysis")
    big = retrieval.compiled_memory(8192, 4096, 64, query_chunk=128)
    assert big["temp"] == small["temp"]
    assert small["temp"] < 4 * 128 * 4096 * 4  # a few (chunk x gallery) float32 blocks
    assert small["temp"] < 2048 * 4096 * 4 / 4  # far below one queries x gallery matrix
    wider = retrieval.compiled_memory(2048, 8192, 64, query_chunk=128)
    assert 1.5 < wider["temp"] / small["temp"] < 2.5  # linear in the gallery


@needs_8
def test_compiled_memory_splits_over_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    one = retrieval.compiled_memory(1024, 8192, 64, query_chunk=128)
    if one is None:
        pytest.skip("this backend reports no memory analysis")
    eight = retrieval.compiled_memory(1024, 8192, 64, query_chunk=128, mesh=mesh)
    assert eight["temp"] < one["temp"] / 4


# ---- late interaction (FILIP): token sets instead of pooled embeddings ----

def _token_sets(rng, n, tokens, d, pads: bool):
    x = rng.normal(size=(n, tokens, d))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    mask = np.ones((n, tokens), bool)
    if pads:  # 1 to `tokens` real tokens per set, pads at the end as the tokenizer leaves them
        mask = np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, size=n)[:, None]
    return x.astype(np.float32), mask


def _ref_late_ranks(q, q_mask, g, g_mask, qlab, glab):
    """Float64 late interaction (mean over the query's real tokens of the best real gallery
    token), then the stable-sort rank of the first positive."""
    sim = np.einsum("ind,jmd->ijnm", q.astype(np.float64), g.astype(np.float64))
    sim = np.where(g_mask[None, :, None, :], sim, -np.inf).max(-1)
    s = (sim * q_mask[:, None, :]).sum(-1) / q_mask.sum(-1)[:, None]
    order = np.argsort(-s, axis=1, kind="stable")
    return np.array([np.flatnonzero(glab[order[i]] == qlab[i])[0] + 1 for i in range(len(q))])


@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=needs_8)])
def test_late_interaction_ranks_match_a_numpy_reference(devices):
    from jaxclip.losses.tokenwise import pack_token_sets

    rng = np.random.default_rng(5)
    t2i = np.repeat(np.arange(10), 2)[rng.permutation(20)]
    img, img_mask = _token_sets(rng, 10, 4, 8, pads=False)
    txt, txt_mask = _token_sets(rng, 20, 5, 8, pads=True)
    txt = 0.5 * txt + 0.5 * img[t2i, :1]  # captions lean toward their image's first patch
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    mesh = None if devices == 1 else jax.make_mesh(
        (8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    got = retrieval.retrieval_metrics(pack_token_sets(img), pack_token_sets(txt, txt_mask), t2i,
                                      query_chunk=3, mesh=mesh, return_ranks=True)
    ids = np.arange(10)
    np.testing.assert_array_equal(
        got["i2t_ranks"], _ref_late_ranks(img, img_mask, txt, txt_mask, ids, t2i))
    np.testing.assert_array_equal(
        got["t2i_ranks"], _ref_late_ranks(txt, txt_mask, img, img_mask, t2i, ids))
    assert got["i2t_r1"] > 0.3  # the lean is found: not a ranking of noise


def test_late_interaction_of_one_token_per_set_is_the_pooled_cosine():
    from jaxclip.losses.tokenwise import pack_token_sets

    rng = np.random.default_rng(6)
    t2i = np.arange(12)
    img, txt = paired(rng, 12, t2i)
    pooled = retrieval.retrieval_metrics(img, txt, t2i, return_ranks=True)
    late = retrieval.retrieval_metrics(pack_token_sets(img[:, None]), pack_token_sets(txt[:, None]),
                                       t2i, return_ranks=True)
    assert_same(late, pooled)
