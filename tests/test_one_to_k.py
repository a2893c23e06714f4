"""1-to-K contrastive learning: the loss (jaxclip.losses.one_to_k_loss), the data layer's K
captions per image (data.caption = "all"), and the trainer running both with config lines."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import config, losses, sharding, train
from jaxclip.data import build, pipeline
from jaxclip.metrics import read_metrics
from jaxclip.models.two_tower import l2_normalize
from tests.helpers import random_tokens, run_steps
from tests.test_accumulate import TINY
from tests.test_pipeline import WordTokenizer

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")


def _unit(rng, *shape):
    return np.asarray(l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32)))


def _reference(img, txt, present, log_scale):
    """The 1-to-K loss in float64 by loops: per image one softmax over every present caption
    with all its own present captions as targets; per present caption a softmax over images."""
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    B, K, _ = txt.shape
    t = np.exp(log_scale)
    captions = [(i, k) for i in range(B) for k in range(K) if present[i, k]]
    i2t = t2i = 0.0
    for i in range(B):
        row = np.array([t * img[i] @ txt[j, k] for j, k in captions])
        lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        i2t += sum(lse - row[n] for n, (j, _) in enumerate(captions) if j == i)
    for j, k in captions:
        col = t * img @ txt[j, k]
        t2i += np.log(np.sum(np.exp(col - col.max()))) + col.max() - col[j]
    return 0.5 * (i2t + t2i) / len(captions)


def _mask(rng, B, K):
    present = rng.random((B, K)) < 0.6
    present[:, 0] = True  # every image has at least one caption
    present[1, 1:] = False  # and one has exactly one
    return present


def test_one_caption_per_image_is_clip():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 12, 8), _unit(rng, 12, 8)
    clip = losses.clip_loss(img, txt, 2.5)
    np.testing.assert_allclose(losses.one_to_k_loss(img, txt[:, None], 2.5), clip, rtol=1e-6)
    np.testing.assert_allclose(losses.one_to_k_loss(img, txt, 2.5), clip, rtol=1e-6)  # (B, D)
    # A K = 2 batch whose second captions are all masked is the same CLIP loss.
    pair = np.stack([txt, _unit(rng, 12, 8)], axis=1)
    mask = np.stack([np.ones(12, bool), np.zeros(12, bool)], axis=1)
    np.testing.assert_allclose(losses.one_to_k_loss(img, pair, 2.5, mask), clip, rtol=1e-6)


def test_matches_a_numpy_reference_with_absent_captions():
    rng = np.random.default_rng(1)
    img, txt = _unit(rng, 6, 5), _unit(rng, 6, 3, 5)
    present = _mask(rng, 6, 3)
    assert not present.all()
    got = losses.one_to_k_loss(img, txt, 1.7, present)
    np.testing.assert_allclose(got, _reference(img, txt, present, 1.7), rtol=1e-5)
    # All K positives share one row: this differs from K separate one-positive (CLIP) rows.
    full = losses.one_to_k_loss(img, txt, 1.7)
    separate = np.mean([losses.clip_loss(img, txt[:, k], 1.7) for k in range(3)])
    assert abs(float(full) - float(separate)) > 1e-3


def test_an_appended_absent_caption_changes_nothing():
    rng = np.random.default_rng(2)
    img, txt = _unit(rng, 8, 6), _unit(rng, 8, 2, 6)
    present = _mask(rng, 8, 2)
    extra = np.concatenate([txt, _unit(rng, 8, 1, 6)], axis=1)
    extra_present = np.concatenate([present, np.zeros((8, 1), bool)], axis=1)

    def value_and_grads(i, t, m):
        return jax.value_and_grad(lambda a, b, s: losses.one_to_k_loss(a, b, s, m),
                                  argnums=(0, 1, 2))(i, t, jnp.float32(2.0))

    v, (gi, gt, gs) = value_and_grads(img, txt, present)
    v2, (gi2, gt2, gs2) = value_and_grads(img, extra, extra_present)
    np.testing.assert_allclose(v2, v, rtol=1e-6)
    np.testing.assert_allclose(gi2, gi, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gt2[:, :2], gt, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gs2, gs, rtol=1e-5)
    assert not np.any(gt2[:, 2])  # an absent caption gets no gradient
    # Masked slots already in the batch get none either, whatever their embedding.
    assert not np.any(np.asarray(gt)[~present])


@pytest.mark.parametrize("impl", ["all_gather", "dense"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_loss_and_grads_equal_single_device(impl, shape):
    rng = np.random.default_rng(3)
    img, txt = _unit(rng, 16, 8), _unit(rng, 16, 3, 8)
    present = _mask(rng, 16, 3)
    scale = jnp.float32(2.2)

    def value_and_grads(mesh, put):
        fn = jax.value_and_grad(
            lambda a, b, s: losses.one_to_k_loss(a, b, s, put(present), impl=impl, mesh=mesh),
            argnums=(0, 1, 2))
        return fn(put(img), put(txt), scale)

    ref_v, ref_g = value_and_grads(None, lambda x: x)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    v, g = value_and_grads(mesh, lambda x: jax.device_put(x, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(v, ref_v, rtol=1e-6)
    for name, a, b in zip(("image", "text", "scale"), g, ref_g):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)
    assert abs(float(g[2])) > 1e-3  # no factor of the device count hides in the scale's


# ---- the data layer: K captions per image ----

@dataclasses.dataclass(frozen=True)
class CaptionSets:
    """A toy source: record i of `train` has 1 + i % 5 captions ("n<i> c<j>"), so with K = 3
    some images have fewer captions than K and some more; `val` records have exactly 3."""

    train_records: int = 40

    def describe(self):
        return f"caption sets x{self.train_records}"

    def splits(self):
        return ("train", "val")

    def num_records(self, split):
        return self.train_records if split == "train" else 16

    def work_units(self, split):
        return range(self.num_records(split))

    def default_num_shards(self, split):
        return 1

    def info(self):
        return {}

    def read(self, split, units):
        import io

        from PIL import Image

        for i in units:
            buf = io.BytesIO()
            colour = ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)
            Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
            count = 1 + i % 5 if split == "train" else 3
            words = [f"n{i} " + " ".join(["w"] * (j + 1)) for j in range(count)]
            yield {"image": buf.getvalue(), "captions": words, "id": f"{split}{i}"}


@pytest.fixture(scope="module")
def caption_sets(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("caption_sets"))
    build.build_dataset(CaptionSets(), out, num_shards={"train": 2, "val": 1}, progress=False)
    return out


def _k_batches(dataset, *, start=0, n=3, k=3):
    transform = pipeline.ElementTransform(image_size=8, caption="all", captions_per_image=k,
                                          seed=5)
    it = pipeline.train_batches([(dataset, "train", 1.0)], transform=transform,
                                tokenizer=WordTokenizer(), context_length=6, global_batch=8,
                                start_step=start, host_index=0, host_count=1, seed=5)
    return [next(it) for _ in range(n)]


def test_k_caption_batches_shapes_mask_determinism_and_resume(caption_sets):
    full = _k_batches(caption_sets, n=12)  # 96 elements: more than two epochs of 40 records
    again = _k_batches(caption_sets, n=12)
    resumed = _k_batches(caption_sets, start=7, n=5)
    for a, b in zip(full, again):
        for key in ("image", "text", "text_mask"):
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(full[7:], resumed):
        for key in ("image", "text", "text_mask"):
            np.testing.assert_array_equal(a[key], b[key])
    first = full[0]
    assert first["text"].shape == (8, 3, 6) and first["text"].dtype == np.int32
    assert first["text_mask"].shape == (8, 3) and first["text_mask"].dtype == bool
    chosen = {}
    for batch in full:
        for tokens, mask in zip(batch["text"], batch["text_mask"]):
            # WordTokenizer: token 0 is len("n<i>"), then one 1 per "w": caption j has j + 1.
            caption = (tokens[:, 1:] == 1).sum(1)
            n_real = int(mask.sum())
            assert list(mask) == [True] * n_real + [False] * (3 - n_real)  # present first
            real = list(caption[:n_real])
            assert real == sorted(set(real)), real  # distinct, in record order
            if n_real < 3:  # fewer captions than K: all of them
                assert real == list(range(1, n_real + 1))
            # Absent slots repeat the first caption (a well-formed text), masked out.
            assert all(caption[n_real:] == caption[0])
            chosen.setdefault(n_real, set()).add(tuple(real))
    assert set(chosen) == {1, 2, 3}
    # Records with 4 or 5 captions give different 3-subsets in different draws.
    assert len(chosen[3]) > 2


def test_preflight_refuses_k_captions_for_objectives_that_read_one():
    base = [*TINY, "data.caption=all", "data.captions_per_image=3", "data.train.dataset=/x"]
    with pytest.raises(config.ConfigError, match="does not read"):
        train.preflight(config.load(DEMO, base))
    with pytest.raises(config.ConfigError, match="captions_per_image >= 1"):
        train.preflight(config.load(DEMO, [*TINY, "data.caption=all", "loss.name=one_to_k"]))
    with pytest.raises(config.ConfigError, match="auxiliary terms"):
        train.preflight(config.load(DEMO, [*base, "loss.name=one_to_k",
                                           "loss.aux.uniformity=0.1"]))


def test_microbatches_give_the_full_batchs_k_caption_step():
    """train.microbatches with K captions per image: two steps with k=2 update like k=1."""
    rng = np.random.default_rng(4)
    lines = [*TINY, "loss.name=one_to_k", "data.caption=all", "data.captions_per_image=3"]
    cfg = config.load(DEMO, lines)
    B, K, T = cfg.train.batch_size, 3, cfg.model.text.context_length
    host = {"image": rng.integers(0, 256, (B, 16, 16, 3), dtype=np.uint8),
            "text": random_tokens(rng, B * K, T, cfg.model.text.eot_id,
                                  cfg.model.text.vocab_size).reshape(B, K, T),
            "text_mask": _mask(rng, B, K)}
    results = []
    for k in (1, 2):
        cfg = config.load(DEMO, [*lines, f"train.microbatches={k}"])
        mesh = sharding.make_mesh(cfg.mesh)
        m = train.build(cfg, mesh)
        batch = sharding.global_batch(host, mesh)
        results.append(run_steps(train.make_train_step(m), train.init_state(m), batch))
    (loss1, params1), (loss2, params2) = results
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    assert loss1[0] != loss1[1]
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_lines_train_and_evaluate_mrv(caption_sets, tmp_path):
    """loss.name = one_to_k with data.caption = all trains through jaxclip.train.train, and a
    retrieval evaluator on a split with 3 captions per image reports the Mean Rank Variance."""
    cfg = config.load(DEMO, [
        "model.embed_dim=32", "model.image.image_size=16", "model.image.patch_size=8",
        "model.image.width=32", "model.image.depth=1", "model.image.heads=2",
        "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
        f"data.train.dataset={caption_sets}", "data.caption=all", "data.captions_per_image=3",
        "loss.name=one_to_k", "train.steps=3", "train.batch_size=16", "train.microbatches=2",
        "train.log_every=1", "train.progress=false", "train.ckpt_every=0",
        f"evals={{'v': {{'type': 'retrieval', 'dataset': '{caption_sets}', 'split': 'val', "
        "'every_steps': 0}}"])
    train.train(cfg, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"))
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3 and all(np.isfinite(r["loss"]) for r in logged)
    assert logged[0]["loss"] != logged[-1]["loss"]
    # Train records have 1-5 captions: some images in each batch have fewer than 3.
    assert all(1.0 < r["captions_per_image"] < 3.0 for r in logged)
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/v/")}
    assert "eval/v/t2i_mrv" in evals and evals["eval/v/t2i_mrv"] >= 0.0


@pytest.mark.slow
def test_emoji_one_to_k_config_runs_and_reports_mrv(tmp_path, monkeypatch):
    """configs/emoji_one_to_k.py as written, shortened: builds emoji_captions (four phrasings of
    each emoji) from the Debian packages, trains with K = 4 and reports MRV on the eval split."""
    from jaxclip.data.sources import emoji

    for pkg, path in {"fonts-noto-color-emoji": emoji.FONT_FILE,
                      "unicode-data": emoji.EMOJI_TEST_FILE}.items():
        if not os.path.exists(path):
            pytest.skip(f"needs the Debian package {pkg} (apt-get install -y {pkg})")
    monkeypatch.setenv("JAXCLIP_CACHE", os.environ.get("JAXCLIP_CACHE") or str(tmp_path))
    cfg = config.load(os.path.join(os.path.dirname(DEMO), "emoji_one_to_k.py"), [
        "train.steps=3", "train.batch_size=32", "train.log_every=1", "train.ckpt_every=0",
        "train.progress=false", "evals.eval.every_steps=0", "evals.eval.max_examples=64",
        "evals.names.every_steps=0", "evals.names.max_examples=64"])
    train.train(cfg, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run"))
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 3 and all(np.isfinite(r["loss"]) for r in logged)
    assert all(r["captions_per_image"] == 4.0 for r in logged)  # four phrasings each
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    assert "eval/eval/t2i_mrv" in evals and "eval/names/t2i_mrv" not in evals  # 1 name each
