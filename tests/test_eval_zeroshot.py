"""Zero-shot classification: prompt formatting, classifier ensembling, top-k against numpy.

Top-k uses dyadic embeddings (multiples of 2^-6; see test_eval_retrieval.py), so float32 device
scores equal float64 numpy scores exactly and accuracies can be compared with ==.
"""

import jax
import numpy as np
import pytest

from jaxclip.evals import zeroshot

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def dyadic(rng, n, d, quantum=2.0**-6):
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x / quantum) * quantum).astype(np.float32)


def ref_topk(img, classifier, labels, ks):
    s = img.astype(np.float64) @ classifier.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")
    rank = np.array([np.flatnonzero(order[i] == labels[i])[0] + 1 for i in range(len(img))])
    return {f"top{k}": float(np.mean(rank <= k)) for k in ks}, rank


def test_format_prompts_class_major_with_both_placeholders():
    prompts = zeroshot.format_prompts(
        ["cat", "red fox"], ["a photo of a {}.", "{c} and {c}", lambda c: f"art of {c}"]
    )
    assert prompts == [
        "a photo of a cat.",
        "cat and cat",
        "art of cat",
        "a photo of a red fox.",
        "red fox and red fox",
        "art of red fox",
    ]
    # Literal braces survive, and braces inside a class name are not re-interpreted.
    assert zeroshot.format_prompts(["{x}"], ["{{{}}}"]) == ["{{x}}"]


@pytest.mark.parametrize("bad", ["no placeholder", "a {name}", "a {0}", "a {:>5}", "a {!r}"])
def test_format_prompts_rejects_bad_templates(bad):
    with pytest.raises(ValueError):
        zeroshot.format_prompts(["cat"], [bad])


def test_build_classifier_matches_numpy():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 5, 16)).astype(np.float32)
    emb[3] *= 10  # unnormalised inputs are normalised per prompt first
    got = np.asarray(zeroshot.build_classifier(emb))
    e = emb.astype(np.float64)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    want = e.mean(1)
    want /= np.linalg.norm(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # One template: the classifier row is the (normalised) prompt embedding itself.
    one = np.asarray(zeroshot.build_classifier(emb[:, :1]))
    np.testing.assert_allclose(one, e[:, 0], atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 512])
def test_topk_matches_reference_with_ties(chunk):
    rng = np.random.default_rng(1)
    classifier = dyadic(rng, 20, 16, 2.0**-3)
    classifier[15:] = classifier[:5]  # duplicate classes: exact ties, the lower index wins
    labels = rng.integers(0, 20, size=90)
    img = classifier[labels] + 0.9 * rng.normal(size=(90, 16))
    img = (np.round(img / np.linalg.norm(img, axis=1, keepdims=True) * 8) / 8).astype(np.float32)
    got = zeroshot.classification_metrics(
        img, classifier, labels, ks=(1, 3, 5), query_chunk=chunk, return_ranks=True
    )
    want, rank = ref_topk(img, classifier, labels, (1, 3, 5))
    np.testing.assert_array_equal(got.pop("ranks"), rank)
    assert got == want
    assert 0.1 < want["top1"] < 0.9
    assert np.all(rank[labels >= 15] >= 2)  # a duplicate class never ranks above its twin


@needs_8
def test_topk_sharded_equals_single_device():
    rng = np.random.default_rng(2)
    classifier = dyadic(rng, 13, 32)  # 13 classes on 8 devices: padding is masked
    labels = rng.integers(0, 13, size=70)
    img = dyadic(rng, 70, 32) + classifier[labels]
    img = (np.round(img / np.linalg.norm(img, axis=1, keepdims=True) * 64) / 64).astype(np.float32)
    mesh = jax.make_mesh(
        (4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    single = zeroshot.classification_metrics(img, classifier, labels, return_ranks=True)
    sharded = zeroshot.classification_metrics(
        img, classifier, labels, mesh=mesh, query_chunk=16, return_ranks=True
    )
    np.testing.assert_array_equal(sharded.pop("ranks"), single.pop("ranks"))
    assert sharded == single == ref_topk(img, classifier, labels, (1, 5))[0]


def test_fewer_classes_than_k_and_bad_labels():
    rng = np.random.default_rng(3)
    classifier = dyadic(rng, 3, 8)
    img = dyadic(rng, 10, 8)
    labels = rng.integers(0, 3, size=10)
    assert zeroshot.classification_metrics(img, classifier, labels)["top5"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        zeroshot.classification_metrics(img, classifier, np.full(10, 3))
