"""Evaluator layer on a tiny real model and real data (shapes_small, a Fashion-MNIST subset).

Metrics are checked against references computed independently from the same embeddings: top-k
from a float64 numpy classifier built from the data source's own prompts, retrieval/hubness/
geometry metrics from the numerical core called directly, MRV from numpy.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxclip import config, runtime
from jaxclip.data import build
from jaxclip.data.sources import fashion_mnist
from jaxclip.evals import (
    Evaluators,
    evaluate,
    evaluators,
    geometry,
    hubness,
    intra,
    resolve,
    retrieval,
)
from jaxclip.tokenizer import from_config

RELATIONS = ["above", "below", "to the left of", "to the right of"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker has its own basetemp; their parent is shared by the session, and
    # the builder's file lock makes concurrent builds of one dataset safe.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return str(root / "jaxclip-cache")


@pytest.fixture(autouse=True)
def cache(cache_root, monkeypatch):
    monkeypatch.setenv("JAXCLIP_CACHE", cache_root)


def tiny_cfg(**evals):
    """A small two-tower model with the CLIP tokenizer's vocabulary (the data is real text)."""
    cfg = config.defaults()
    cfg.model.embed_dim = 32
    cfg.model.image.update(image_size=32, patch_size=8, width=32, depth=1, heads=2)
    cfg.model.text.update(context_length=16, width=32, depth=1, heads=2)
    cfg.data.train.dataset = "shapes_small"
    for name, spec in evals.items():
        cfg.evals[name] = spec
    return cfg


@dataclasses.dataclass
class FashionSubset(fashion_mnist.FashionMnistSource):
    """The first `limit` records of each Fashion-MNIST split (the real Debian files)."""

    limit: int = 120

    def describe(self) -> str:
        return f"{super().describe()} first {self.limit}"

    def work_units(self, split):
        return range(min(self.limit, len(self.arrays(split)[1])))

    def num_records(self, split):
        return len(self.work_units(split))


@pytest.fixture(scope="module")
def fashion_dir(cache_root):
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
        pytest.skip("needs the Debian package dataset-fashion-mnist")
    return build.ensure_dataset(FashionSubset(), os.path.join(cache_root, "datasets"),
                                "fashion_subset", num_shards=1)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_cfg()
    lay = runtime.layout(cfg)
    return lay, jax.device_get(runtime.init_params(lay))


def runner(m, cfg):
    return Evaluators(cfg, m, from_config(cfg))


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zeroshot_matches_numpy_reference(fashion_dir, model_and_params):
    m, params = model_and_params
    cfg = tiny_cfg(fm=dict(type="zeroshot", dataset=fashion_dir, split="test",
                           classes="fashion_mnist", templates="fashion_mnist", ks=(1, 3, 5)))
    ev = runner(m, cfg)
    placed = jax.device_put(params, m.param_shardings)
    got = ev.evaluate(placed)
    ctx = ev.context
    data = evaluators.load_eval_set(ctx, fashion_dir, "test")
    img = ctx.embed(ctx.encode_image, placed, data.images, 256)
    # The reference classifier comes from the source's own captions (prompts(c)), not from the
    # evaluator's class/template machinery, so the class-major layout is checked too.
    rows = []
    for c in range(10):
        toks = ctx.tokenizer(fashion_mnist.prompts(c), context_length=16).astype(np.int32)
        rows.append(unit(unit(ctx.embed(ctx.encode_text, placed, toks, 256)).mean(0)))
    scores = unit(img) @ np.stack(rows).T
    labels = data.labels["class"]
    true = scores[np.arange(len(labels)), labels]
    rank = 1 + np.sum(scores > true[:, None], axis=1)
    gaps = np.abs(scores - true[:, None])
    gaps[np.arange(len(labels)), labels] = np.inf
    assert gaps.min() > 1e-6, "near-tied scores: the comparison would depend on rounding"
    for k in (1, 3, 5):
        assert got[f"eval/fm/top{k}"] == np.mean(rank <= k), k
    assert set(got) == {"eval/fm/top1", "eval/fm/top3", "eval/fm/top5", "eval/fm/seconds"}
    assert np.bincount(labels, minlength=10).min() > 0  # every class occurs in the subset


def test_streamed_images_equal_cached(fashion_dir, model_and_params, monkeypatch):
    m, params = model_and_params
    spec = dict(type="zeroshot", dataset=fashion_dir, split="test", classes="fashion_mnist",
                templates=["a photo of a {}."], max_examples=50)
    cached = evaluate(tiny_cfg(z=spec), params, layout=m)
    monkeypatch.setattr(evaluators, "IMAGE_CACHE_BYTES", 0)
    ev = runner(m, tiny_cfg(z=spec))
    placed = jax.device_put(params, m.param_shardings)
    streamed = ev.evaluate(placed)
    data = evaluators.load_eval_set(ev.context, fashion_dir, "test", 50)
    assert data.images is None and data.n == 50
    chunks = list(data.image_chunks(16))
    assert [len(c) for c in chunks] == [16, 16, 16, 2]
    assert {k: v for k, v in streamed.items() if "seconds" not in k} == \
        {k: v for k, v in cached.items() if "seconds" not in k}


def test_classifier_and_embeddings_cached_within_one_call(model_and_params):
    m, params = model_and_params
    zs = dict(type="zeroshot", dataset="shapes_small", split="val", label="relation",
              classes=RELATIONS, templates=["a shape {} a shape", "{}"], max_examples=64)
    cfg = tiny_cfg(a=zs, b=dict(zs, ks=(1, 2)), r=dict(type="retrieval", dataset="shapes_small",
                                                        split="val", max_examples=64))
    ev = runner(m, cfg)
    calls = {"text": 0, "image": 0}
    enc_txt, enc_img = ev.context.encode_text, ev.context.encode_image

    def count(kind, fn):
        def wrapped(*args):
            calls[kind] += 1
            return fn(*args)
        return wrapped

    ev.context.encode_text, ev.context.encode_image = count("text", enc_txt), count("image", enc_img)
    placed = jax.device_put(params, m.param_shardings)
    out = ev.evaluate(placed)
    # One batch of 8 prompts for both zero-shot evaluators, one of 64 captions for retrieval;
    # one batch of the 64 images shared by all three.
    assert calls == {"text": 2, "image": 1}
    assert out["eval/a/top1"] == out["eval/b/top1"]
    assert ev.context.call_cache == {}  # embeddings do not outlive the call (params change)
    ev.evaluate(placed, ["a"])
    assert calls == {"text": 3, "image": 2}
    # Zero-shot on the relation label: chance is 1/4 for an untrained model, top-4 is everything.
    assert out["eval/b/top2"] >= out["eval/b/top1"]


def test_retrieval_options_match_the_numerical_core(model_and_params):
    m, params = model_and_params
    base = dict(type="retrieval", dataset="shapes_small", split="val", max_examples=96,
                ks=(1, 5))
    cfg = tiny_cfg(
        q=dict(base, postproc="qbnorm", bank_size=160, geometry=True, skew_k=5, beta=10.0,
               intra_label="relation"),
        d=dict(base, postproc="dbnorm", bank_split="train", bank_size=160, dynamic=True),
    )
    ev = runner(m, cfg)
    placed = jax.device_put(params, m.param_shardings)
    got = ev.evaluate(placed)
    ctx = ev.context
    data = evaluators.load_eval_set(ctx, "shapes_small", "val", 96)
    bank = evaluators.load_eval_set(ctx, "shapes_small", "train", 160)
    emb = lambda d: (ctx.embed(ctx.encode_image, placed, d.images, 256),
                     ctx.embed(ctx.encode_text, placed, evaluators.tokens_of(ctx, d), 256))
    img, txt = emb(data)
    bimg, btxt = emb(bank)
    t2i = np.arange(96)  # one caption per shapes record
    raw = retrieval.retrieval_metrics(img, txt, t2i, ks=(1, 5))
    qb = retrieval.retrieval_metrics(img, txt, t2i, ks=(1, 5), postproc={
        "t2i": hubness.QBNorm(btxt, beta=10.0), "i2t": hubness.QBNorm(bimg, beta=10.0)})
    db = retrieval.retrieval_metrics(img, txt, t2i, ks=(1, 5), postproc={
        "t2i": hubness.DBNorm(btxt, bimg, dynamic=True),
        "i2t": hubness.DBNorm(bimg, btxt, dynamic=True)})
    geo = geometry.geometry_metrics(img, txt, t2i)
    for name in ("q", "d"):
        for k, v in raw.items():
            assert got[f"eval/{name}/{k}"] == v, (name, k)
    for k, v in qb.items():
        assert got[f"eval/q/qbnorm_{k}"] == v, k
    for k, v in db.items():
        assert got[f"eval/d/dbnorm_{k}"] == v, k
    for k, v in geo.items():
        assert got[f"eval/q/{k}"] == pytest.approx(v, rel=1e-6), k
    intra_metrics = intra.same_label_precision(img, data.label("relation", "test"), (1, 5))
    assert {k: got[f"eval/q/{k}"] for k in intra_metrics} == intra_metrics
    assert "eval/d/i2i_p1" not in got
    n5 = hubness.k_occurrence(txt, img, 5)
    assert got["eval/q/t2i_skew5"] == pytest.approx(hubness.skewness(n5), rel=1e-9)
    qn5 = hubness.k_occurrence(txt, img, 5, postproc=hubness.QBNorm(btxt, beta=10.0))
    assert got["eval/q/qbnorm_t2i_skew5"] == pytest.approx(hubness.skewness(qn5), rel=1e-9)
    # The corrections really change something here, so the equalities above are not vacuous.
    assert any(got[f"eval/q/qbnorm_{k}"] != v for k, v in raw.items())
    assert any(got[f"eval/d/dbnorm_{k}"] != v for k, v in raw.items())
    assert "eval/d/modality_gap" not in got and "eval/q/t2i_mrv" not in got  # 1 caption each


def test_mrv_over_multiple_captions(fashion_dir, model_and_params):
    m, params = model_and_params
    cfg = tiny_cfg(r=dict(type="retrieval", dataset=fashion_dir, split="test", max_examples=40),
                   s=dict(type="retrieval", dataset=fashion_dir, split="test", max_examples=40,
                          mrv_reduce="std"),
                   off=dict(type="retrieval", dataset=fashion_dir, split="test", max_examples=40,
                            mrv=False))
    got = evaluate(cfg, params, layout=m)
    ev = runner(m, cfg)
    placed = jax.device_put(params, m.param_shardings)
    data = evaluators.load_eval_set(ev.context, fashion_dir, "test", 40)
    ctx = ev.context
    img = ctx.embed(ctx.encode_image, placed, data.images, 256)
    txt = ctx.embed(ctx.encode_text, placed, evaluators.tokens_of(ctx, data), 256)
    assert txt.shape[0] == 200  # 5 captions per record, record-major
    ranks = retrieval.retrieval_metrics(img, txt, np.repeat(np.arange(40), 5),
                                        return_ranks=True)["t2i_ranks"].reshape(40, 5)
    assert got["eval/r/t2i_mrv"] == pytest.approx(np.var(ranks, axis=1).mean(), rel=1e-12)
    assert got["eval/s/t2i_mrv"] == pytest.approx(np.std(ranks, axis=1).mean(), rel=1e-12)
    assert np.var(ranks, axis=1).mean() > 0
    assert "eval/off/t2i_mrv" not in got


def test_schedule_at_start_every_and_final():
    cfg = tiny_cfg(a=dict(type="retrieval", every_steps=100, at_start=True),
                   b=dict(type="retrieval", every_steps=0),
                   c=dict(type="zeroshot", classes="cifar10", every_steps=30))
    ev = Evaluators(cfg, runtime.layout(cfg), tokenizer=None)
    assert ev.due(0, at_start=True) == ["a"]
    assert ev.due(30) == ["c"]
    assert ev.due(100) == ["a"]
    assert ev.due(300) == ["a", "c"]
    assert ev.due(7) == []
    assert ev.due(7, final=True) == ["a", "b", "c"]
    assert ev.run(None, 7) == {}  # nothing due: no parameters are even touched


@pytest.mark.parametrize("spec, message", [
    (dict(type="zeroshot", clases="cifar10"), r"unknown keys \['clases'\].*valid keys"),
    (dict(type="zeroshot", classes="cifar1000"), r"evals.x: unknown class list 'cifar1000'"),
    (dict(type="zeroshot", classes="cifar10", templates="openai81"), r"unknown template set"),
    (dict(type="zeroshot", classes="cifar10", templates=["a photo"]), r"no \{\} or \{c\}"),
    (dict(type="zeroshot", classes=[], templates="openai8"), r"non-empty list"),
    (dict(type="zeroshot", ks=(0, 1)), r"ks must be"),
    (dict(type="retrieval", postproc="qb"), r"postproc must be one of"),
    (dict(type="retrieval", mrv_reduce="mean"), r"mrv_reduce"),
    (dict(type="retrieval", beta=0), r"beta must be a positive number"),
    (dict(type="retrieval", geometry="maybe"), r"geometry must be true or false"),
    (dict(type="retrieval", max_examples=-1), r"max_examples"),
    (dict(type="retrival"), r"unknown type 'retrival'"),
])
def test_config_errors_name_the_evaluator_and_key(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve("x", spec)


def test_boolean_words_from_the_command_line():
    # Overrides of keys the config file did not set reach the evaluator as strings.
    spec = resolve("x", dict(type="retrieval", geometry="true", mrv="False", at_start="yes"))
    assert (spec["geometry"], spec["mrv"], spec["at_start"]) == (True, False, True)


def test_data_dependent_errors(fashion_dir, model_and_params):
    m, params = model_and_params
    cases = [
        (dict(type="zeroshot", dataset=fashion_dir, split="test", classes=["a", "b"],
              templates="openai8"), r"goes up to 9, but the class list has 2 names"),
        (dict(type="zeroshot", dataset=fashion_dir, split="test", label="group"),
         r"no label 'group'; they have \['class'\]"),
        (dict(type="zeroshot", dataset="shapes_small", split="val", label="relation"),
         r"manifest has no info.class_names"),
        (dict(type="retrieval", dataset=fashion_dir, split="test", postproc="qbnorm",
              bank_split="test"), r"bank .* is the evaluation split itself"),
        (dict(type="retrieval", dataset=fashion_dir, split="validation"), r"no split"),
    ]
    for spec, message in cases:
        with pytest.raises((ValueError, KeyError), match=message):
            evaluate(tiny_cfg(x=dict(spec, max_examples=20)), params, layout=m)
    # classes="" takes the dataset's own names (Fashion-MNIST's manifest stores them).
    out = evaluate(tiny_cfg(x=dict(type="zeroshot", dataset=fashion_dir, split="test",
                                   templates="openai8", max_examples=20)), params, layout=m)
    assert 0 <= out["eval/x/top1"] <= out["eval/x/top5"] <= 1


def test_evaluate_checks_the_parameter_tree(model_and_params):
    m, params = model_and_params
    cfg = tiny_cfg(v=dict(type="retrieval", dataset="shapes_small", max_examples=8))
    broken = jax.tree.map(lambda x: x, params)
    broken["text"]["extra"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected \['text/extra'\]"):
        evaluate(cfg, broken, layout=m)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["logit_scale"] = np.zeros((2,))
    with pytest.raises(ValueError, match=r"logit_scale: \(2,\) != \(\)"):
        evaluate(cfg, wrong, layout=m)
    with pytest.raises(ValueError, match="no evaluator named"):
        evaluate(cfg, params, ["nope"], layout=m)
