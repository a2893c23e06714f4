"""The step-indexed input pipeline: determinism, host-count independence, resume, bad records."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from jaxclip.data import build, builtin, images, pipeline, records
from jaxclip.data.sources.shapes import ShapesSource


class WordTokenizer:
    """A deterministic stand-in tokenizer for pipeline tests: word lengths as token ids."""

    def __call__(self, texts, context_length=8):
        out = np.zeros((len(texts), context_length), np.int32)
        for i, t in enumerate(texts):
            ids = [len(w) for w in t.split()][:context_length]
            out[i, :len(ids)] = ids
        return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    build.build_dataset(ShapesSource(train=96, val=8, novel=8), out,
                        num_shards={"train": 3, "val": 1, "novel": 1}, progress=False)
    return out


def _batches(dataset, *, start=0, host_index=0, host_count=1, n=3, batch=16, workers=0,
             augment="none", views=1):
    transform = pipeline.ElementTransform(image_size=32, augment=augment, seed=3, views=views)
    it = pipeline.train_batches([(dataset, "train", 1.0)], transform=transform,
                                tokenizer=WordTokenizer(), context_length=8, global_batch=batch,
                                start_step=start, host_index=host_index, host_count=host_count,
                                seed=3, workers=workers)
    return [next(it) for _ in range(n)]


def test_batches_are_deterministic_and_shaped(dataset):
    a, b = _batches(dataset), _batches(dataset)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])
    assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["text"].shape == (16, 8) and a[0]["text"].dtype == np.int32
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_two_hosts_see_disjoint_halves_of_the_same_global_batch(dataset):
    whole = _batches(dataset, augment="rrc")
    halves = [_batches(dataset, host_index=h, host_count=2, augment="rrc") for h in (0, 1)]
    for s in range(3):
        joined = np.concatenate([halves[0][s]["image"], halves[1][s]["image"]])
        np.testing.assert_array_equal(joined, whole[s]["image"])


def test_resuming_at_a_step_continues_the_same_stream(dataset):
    full = _batches(dataset, n=8)  # 8 x 16 = 128 > 96 records: crosses an epoch boundary
    resumed = _batches(dataset, start=5, n=3)
    for x, y in zip(full[5:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])


def test_views_are_independent_crops_that_resume_and_split_over_hosts_exactly(dataset):
    """data.views = 2: view 0 is the one-view batch's image, view 1 another crop of the same
    image, each a function of (seed, stream index, view): a resumed run and a second host see
    the same views."""
    one = _batches(dataset, n=6, augment="rrc")
    two = _batches(dataset, n=6, augment="rrc", views=2)
    assert two[0]["image"].shape == (16, 2, 32, 32, 3) and two[0]["image"].dtype == np.uint8
    for x, y in zip(one, two):
        np.testing.assert_array_equal(y["image"][:, 0], x["image"])
        np.testing.assert_array_equal(y["text"], x["text"])
    # The second view is a different crop (almost surely: scale 0.3-1 and a coin-flip mirror).
    differ = [not np.array_equal(v[0], v[1]) for b in two for v in b["image"]]
    assert np.mean(differ) > 0.9
    resumed = _batches(dataset, start=4, n=2, augment="rrc", views=2)
    for x, y in zip(two[4:], resumed):
        np.testing.assert_array_equal(x["image"], y["image"])
    halves = [_batches(dataset, host_index=h, host_count=2, n=1, augment="rrc", views=2)[0]
              for h in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), two[0]["image"])


def test_a_view_is_the_crop_and_flip_its_generator_draws():
    """ViewAugment on a known picture: the crop box and the flip come from the generator."""
    img = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    aug = pipeline.ViewAugment(scale=(0.5, 0.5), ratio=(1.0, 1.0), flip=1.0)
    out = aug(buf.getvalue(), (40, 30), img, np.random.default_rng(0), 21)
    box = images.random_resized_box(40, 30, np.random.default_rng(0), (0.5, 0.5), (1.0, 1.0))
    np.testing.assert_array_equal(out, images.crop_resize(img, box, 21)[:, ::-1])
    assert not np.array_equal(out, images.crop_resize(img, box, 21))


def test_epochs_are_reshuffled_and_cover_every_record(dataset):
    # 96 records, batch 16: steps 0-5 are epoch 0, steps 6-11 epoch 1.
    batches = _batches(dataset, n=12, batch=16)
    def ids(bs):
        return [tuple(img.reshape(-1)[:64]) for b in bs for img in b["image"]]
    e0, e1 = ids(batches[:6]), ids(batches[6:])
    assert len(set(e0)) == 96 and set(e0) == set(e1) and e0 != e1


def test_weighted_mixture_draws_each_source_in_proportion(dataset):
    # train (96 records) at weight 3 and val (8 records) at weight 1: a quarter of the stream is
    # val, cycling through its 8 records, and the stream is the same when built again.
    mix = [(dataset, "train", 3.0), (dataset, "val", 1.0)]
    stream = pipeline.record_stream(mix, seed=3)
    ids = [records.decode_record(stream[i])["id"] for i in range(800)]
    val = [i for i in ids if i.startswith("val-")]
    assert abs(len(val) / len(ids) - 0.25) < 0.02, len(val)
    assert len(set(val)) == 8 and len({i for i in ids if i.startswith("train-")}) == 96
    again = pipeline.record_stream(mix, seed=3)
    assert ids == [records.decode_record(again[i])["id"] for i in range(800)]
    # Through the batching: resuming at a step gives the mixture's batches too.
    transform = pipeline.ElementTransform(image_size=32, seed=3)

    def batches(start, n):
        it = pipeline.train_batches(mix, transform=transform, tokenizer=WordTokenizer(),
                                    context_length=8, global_batch=16, start_step=start,
                                    host_index=0, host_count=1, seed=3, workers=0)
        return [next(it)["image"] for _ in range(n)]

    for x, y in zip(batches(0, 6)[4:], batches(4, 2)):
        np.testing.assert_array_equal(x, y)


def test_mixture_from_the_config_and_its_errors(dataset):
    from jaxclip import config
    from jaxclip.data import stream

    cfg = config.defaults()
    cfg.data.train.mixture = [dict(dataset=dataset, split="train", weight=3),
                              dict(dataset=dataset, split="val")]
    assert stream.mixture(cfg) == [(dataset, "train", 3.0), (dataset, "val", 1.0)]
    cfg.data.train.mixture = [dict(dataset=dataset, wieght=2)]
    with pytest.raises(config.ConfigError, match="unknown keys \\['wieght'\\]"):
        stream.mixture(cfg)


def test_worker_processes_give_the_same_batches(dataset):
    inproc = _batches(dataset, n=4)
    workers = _batches(dataset, n=4, workers=2)
    for x, y in zip(inproc, workers):
        np.testing.assert_array_equal(x["image"], y["image"])


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_an_undecodable_record_is_replaced_from_later_in_the_stream_and_counted():
    import grain

    raw = [records.encode_record({"image": _png((i, 0, 0)), "captions": ["x"], "id": str(i)})
           for i in range(12)]
    raw[2] = records.encode_record({"image": b"\x89PNG broken", "captions": ["x"], "id": "2"})
    raw[5] = b"\xc1 not msgpack"
    stream = grain.MapDataset.source(raw)  # unshuffled: stream index = record index
    batches = pipeline.StepBatches(stream, pipeline.ElementTransform(image_size=8),
                                   WordTokenizer(), global_batch=4, host_index=0, host_count=1,
                                   context_length=4)
    b0, b1 = batches[0], batches[1]
    # Slot 2's replacement is index 2 + B + 1 = 7; slot 5 (batch 1, slot 1) takes 5 + 4 + 1 = 10.
    assert [int(x[0, 0, 0]) for x in b0["image"]] == [0, 1, 7, 3]
    assert [int(x[0, 0, 0]) for x in b1["image"]] == [4, 10, 6, 7]
    assert int(b0["skipped"]) == 1 and int(b1["skipped"]) == 1


def test_corrupt_records_in_a_dataset_never_reach_a_batch(tmp_path):
    recs = [{"image": _png((200, 10, 10)), "captions": [f"red {i}"], "id": str(i)}
            for i in range(8)]
    recs[3]["image"] = b"\x89PNG this is not an image"
    name = records.shard_name("train", 0, 1)
    records.write_shard(os.path.join(tmp_path, name), recs)
    records.write_manifest(str(tmp_path), records.Manifest(splits={
        "train": {"num_records": 8, "shards": [{"file": name, "count": 8}]}}))
    transform = pipeline.ElementTransform(image_size=8, seed=0)
    it = pipeline.train_batches([(str(tmp_path), "train", 1.0)], transform=transform,
                                tokenizer=WordTokenizer(), context_length=4, global_batch=4,
                                start_step=0, host_index=0, host_count=1, seed=0)
    batches = [next(it) for _ in range(6)]  # three epochs
    assert sum(int(b["skipped"]) for b in batches) >= 3  # met at least once per epoch
    for b in batches:
        assert b["image"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(b["image"][..., 0], 200)


def test_missing_dataset_pieces_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        pipeline.record_source(str(tmp_path), "train")
    with pytest.raises(ValueError, match="neither a dataset directory nor a built-in"):
        builtin.dataset_dir("no_such_dataset", str(tmp_path))


def test_large_jpegs_decode_at_reduced_scale_with_the_same_picture():
    # A 512 x 384 smooth JPEG cropped to 64 px: its 384 px centre square is 6x the output, so
    # libjpeg decodes at 1/4 scale. The picture must match a full decode + resize to within
    # 3 grey levels on average (JPEG's DCT scaling vs OpenCV's area filter; a misplaced box or a
    # swapped channel is far beyond that).
    y, x = np.mgrid[0:384, 0:512].astype(np.float32)
    img = np.stack([x / 2, y / 1.5, 255 - (x + y) / 3.5], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert images.jpeg_dims(data) == (512, 384)
    exif = Image.Exif()
    exif[0x0112] = 1  # an orientation tag: an APP1 segment before the frame header
    for extra in (dict(progressive=True), dict(exif=exif, subsampling=0)):
        other = io.BytesIO()
        Image.fromarray(img[:300, :200]).save(other, format="JPEG", **extra)
        assert images.jpeg_dims(other.getvalue()) == (200, 300), extra
    for box in (images.center_box(512, 384), (40, 30, 400, 370)):
        small, small_box = images.decode_for_box(data, box, 64)
        assert small.shape == (96, 128, 3)  # decoded at 1/4
        reduced = images.crop_resize(small, small_box, 64)
        full = images.crop_resize(images.decode_array(data), box, 64)
        assert np.abs(reduced.astype(int) - full).mean() < 3, box
    # A box too small to shrink 2x, or a PNG, decodes at full size.
    assert images.decode_for_box(data, (0, 0, 100, 100), 64)[0].shape == (384, 512, 3)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    assert images.jpeg_dims(png.getvalue()) is None
    assert images.decode_for_box(png.getvalue(), (0, 0, 384, 384), 64)[0].shape[:2] == (384, 512)


def test_training_crops_agree_with_the_evaluation_resize():
    # A smooth image, so resampling filters differ only slightly: the OpenCV training path
    # (decode, centre box, bicubic) and the Pillow evaluation path (antialiased bicubic) must
    # give the same picture in the same channel order. Tolerance: 3 grey levels mean, which a
    # swapped channel, an off-by-one crop or a wrong filter scale would all exceed.
    y, x = np.mgrid[0:90, 0:120].astype(np.float32)
    img = np.stack([x * 2, y * 2.5, 255 - x - y], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    arr = images.decode_array(buf.getvalue())
    np.testing.assert_array_equal(arr, img)  # lossless, RGB order
    train = images.crop_resize(arr, images.center_box(120, 90), 64)
    evaluation = np.asarray(images.resize_center(Image.fromarray(img), 64))
    assert train.shape == evaluation.shape == (64, 64, 3)
    assert np.abs(train.astype(int) - evaluation).mean() < 3
    # Shrinking more than 2x averages (no aliasing): a 1-pixel checkerboard becomes flat grey.
    board = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    small = images.crop_resize(board, (0, 0, 128, 128), 32)
    assert np.abs(small.astype(int) - 127).max() <= 1
    box = images.random_resized_box(60, 40, np.random.default_rng(0), scale=(0.3, 1.0))
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 40 and (x1 - x0) * (y1 - y0) >= 0.3 * 2400 - 60
    assert images.crop_resize(arr, box, 16).shape == (16, 16, 3)


# ---------------------------------------------------------------------------------------------
# Damaged shards: a record the storage cannot give back is skipped like an undecodable one.


def record_chunks(path):
    """(offset, data size) of each record chunk in the first 64 KiB block of an ArrayRecord file.

    Riegeli's layout: a 24-byte block header every 64 KiB, the file signature chunk up to byte 64,
    then chunks, each a 40-byte header (header hash, data size, data hash, a type byte and a
    7-byte record count, decoded size) followed by its data. The writer puts one record per chunk.
    """
    import struct

    with open(path, "rb") as f:
        block = f.read(1 << 16)
    chunks, pos = [], 64
    while pos + 40 <= len(block):
        size, _, kind = struct.unpack_from("<QQQ", block, pos + 8)
        if kind & 0xFF != ord("r") or pos + 40 + size > len(block):
            break
        assert kind >> 8 == 1, "expected one record per chunk"
        chunks.append((pos, size))
        pos += 40 + size
    return chunks


def read_each(path):
    """Every record of a shard, read one at a time, or the error reading it raised."""
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(path)
    out = []
    for i in range(reader.num_records()):
        try:
            out.append(reader.read([i])[0])
        except RuntimeError as e:
            out.append(e)
    reader.close()
    return out


def copy_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_build"))
    return str(dst)


def test_a_corrupt_shard_chunk_is_skipped_counted_and_logged_once(dataset, tmp_path, caplog):
    import logging

    from array_record.python import array_record_module

    bad = copy_dataset(dataset, tmp_path / "bad")
    shard = os.path.join(bad, records.shard_name("train", 1, 3))
    k = 5  # flip 64 bytes in the middle of the sixth record's chunk
    pos, size = record_chunks(shard)[k]
    assert size > 400
    with open(shard, "r+b") as f:
        f.seek(pos + 40 + 200)
        flipped = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(pos + 40 + 200)
        f.write(flipped)
    # Read directly, exactly that record fails its chunk's hash (so the test is not vacuous).
    direct = read_each(shard)
    failed = [i for i, r in enumerate(direct) if isinstance(r, Exception)]
    assert failed == [k] and "chunk data hash mismatch" in str(direct[k])
    # Its twin: the same dataset with that record intact on disk but undecodable. Skipping must
    # treat the two alike, so they give the same batches and the same skipped counts.
    twin = copy_dataset(dataset, tmp_path / "twin")
    twin_shard = os.path.join(twin, records.shard_name("train", 1, 3))
    raw = read_each(os.path.join(dataset, records.shard_name("train", 1, 3)))
    raw[k] = b"\xc1 not msgpack"
    writer = array_record_module.ArrayRecordWriter(twin_shard, "group_size:1")
    for r in raw:
        writer.write(r)
    writer.close()

    with caplog.at_level(logging.WARNING):
        got = _batches(bad, n=12)  # 96 records, batch 16: two epochs, the record met in each
    # Logged once, naming the shard, however often the record is met.
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and shard in warnings[0] and f"record {k}" in warnings[0]
    again, expected = _batches(bad, n=12), _batches(twin, n=12)
    halves = [_batches(bad, host_index=h, host_count=2, n=12) for h in (0, 1)]
    skipped = [int(b["skipped"]) for b in got]
    assert sum(skipped) >= 2 and skipped == [int(b["skipped"]) for b in expected]
    for s, (x, y, z) in enumerate(zip(got, again, expected)):
        assert x["image"].shape == (16, 32, 32, 3)
        for key in ("image", "text"):
            np.testing.assert_array_equal(x[key], y[key])
            np.testing.assert_array_equal(x[key], z[key])
        joined = np.concatenate([halves[0][s]["image"], halves[1][s]["image"]])
        np.testing.assert_array_equal(joined, x["image"])


def test_a_shard_that_cannot_be_opened_reads_as_unreadable_records(dataset, tmp_path, caplog):
    import logging

    copy = copy_dataset(dataset, tmp_path / "copy")
    shards = records.split_shards(copy, "train")
    # Shard 0 loses its tail (the index ArrayRecord keeps at the end), shard 2 disappears after
    # the start; shard 1 is intact. grain's own source would count shard 0 as empty and shift
    # every later record; here the indices hold and only the damaged shards' records are lost.
    path0 = shards[0][0]
    os.truncate(path0, os.path.getsize(path0) - 70_000)
    os.remove(shards[2][0])
    source = records.ShardSource(shards)
    with caplog.at_level(logging.WARNING):
        got = [source[i] for i in range(len(source))] + [source[0]]
    n0, n1 = shards[0][1], shards[1][1]
    assert all(isinstance(r, records.Unreadable) for r in got[:n0] + got[n0 + n1:])
    assert got[n0:n0 + n1] == read_each(shards[1][0])
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 2 and path0 in warnings[0] and shards[2][0] in warnings[1]
    assert "No such file" in warnings[1]
    # Loader processes get a pickled copy: the same records, readers opened afresh there.
    import pickle

    assert [pickle.loads(pickle.dumps(source))[i] for i in range(len(source))] == got[:-1]


def test_a_batch_with_nothing_readable_is_a_clear_error(dataset, tmp_path):
    copy = copy_dataset(dataset, tmp_path / "copy")
    for path, _ in records.split_shards(copy, "train"):
        with open(path, "r+b") as f:
            f.truncate(1000)  # the index is gone: no record of any shard can be found
    with pytest.raises(RuntimeError, match="records in a row, from stream index 0 on, could "
                       "not be read or decoded .*train-0000.-of-00003.arrayrecord: cannot open"):
        _batches(copy, n=1)


def test_a_dataset_without_usable_records_is_a_config_error_at_startup(dataset, tmp_path):
    from jaxclip import config
    from jaxclip.data import stream

    cfg = config.defaults()
    cfg.data.train.dataset = dataset
    assert stream.check_sources(cfg) == [(dataset, "train", 1.0)]
    # What an earlier builder wrote when every input was skipped: a manifest with no records.
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    name = records.shard_name("train", 0, 1)
    records.write_shard(os.path.join(empty, name), [])
    records.write_manifest(empty, records.Manifest(splits={
        "train": {"num_records": 0, "shards": [{"file": name, "count": 0}]}}))
    cfg.data.train.dataset = empty
    with pytest.raises(config.ConfigError, match=f"'{empty}' split 'train' has no records"):
        stream.check_sources(cfg)
    with pytest.raises(ValueError, match="has no records"):  # not a ZeroDivisionError
        pipeline.record_stream([(empty, "train", 1.0)], seed=0)
    cases = [
        (str(tmp_path / "gone"), "train", "gone.* neither a dataset directory"),
        (str(tmp_path), "train", "manifest.json is missing"),
        (dataset, "test", r"has no split 'test'; it has \['novel', 'train', 'val'\]"),
    ]
    for directory, split, message in cases:
        cfg.data.train.update(dataset=directory, split=split)
        with pytest.raises(config.ConfigError, match=message) as e:
            stream.check_sources(cfg)
        assert directory in str(e.value) and "\n" not in str(e.value)
    os.remove(os.path.join(empty, name))
    cfg.data.train.update(dataset=empty, split="train")
    with pytest.raises(config.ConfigError, match="lacks shards"):
        stream.check_sources(cfg)
    cfg.data.train.mixture = [dict(dataset=dataset, weight=0)]
    with pytest.raises(config.ConfigError, match="weight 0.0; weights must be positive"):
        stream.check_sources(cfg)
