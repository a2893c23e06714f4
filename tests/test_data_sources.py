"""Tests of the dataset sources: each converts, round-trips through the builder, skips bad items.

All inputs are made here (Pillow images, tarfile archives, a tiny tfds dataset prepared offline);
Fashion-MNIST and emoji use the real Debian files and skip, naming the package, when they are
absent. The full emoji set is rendered once per session (`emoji_dataset`).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from jaxclip import cli
from jaxclip.data import build, builtin, records
from jaxclip.data.sources import Skip, emoji, fashion_mnist, tfds, webdataset
from jaxclip.data.sources.folder import FolderSource
from jaxclip.data.sources.webdataset import WebDatasetSource, expand_braces


def image_bytes(color=(200, 30, 30), size=(20, 16), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def read_split(directory: str, split: str) -> list[dict]:
    return list(records.iter_records(records.shard_paths(directory, split)))


def build_quietly(source, out, **kwargs) -> records.Manifest:
    return build.build_dataset(source, str(out), progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Folder + CSV/TSV/JSONL


@pytest.fixture
def folder(tmp_path):
    """images/ with 3 good JPEGs, 1 truncated JPEG; a TSV naming them plus two bad rows."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(image_bytes((60 * i, 100, 20)))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(image_bytes((9, 9, 9), fmt="PNG"))
    rows = [
        ("images/0.jpg", "a red square", "5"),
        ("images/1.jpg", "a green square", "6"),
        ("images/missing.jpg", "no such file", "7"),
        ("images/2.jpg", "   ", "8"),  # blank caption
        ("images/truncated.jpg", "half a jpeg", "9"),
        (str(absolute), "an absolute path", "10"),
    ]
    lines = ["filepath\ttitle\tlabel"] + ["\t".join(r) for r in rows]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_folder_tsv_reads_rows_and_skips_bad_ones(folder):
    source = FolderSource(str(folder / "train.tsv"), label_keys=("label",))
    items = list(source.read("train", source.work_units("train")))
    assert len(items) == 6
    assert items[0]["captions"] == ["a red square"]
    assert items[0]["image"] == (folder / "images/0.jpg").read_bytes()
    assert items[0]["labels"] == {"label": 5}
    assert items[0]["id"] == "row0" and items[0]["meta"] == {"path": "images/0.jpg"}
    assert items[2] == Skip("missing_image_file", str(folder / "images/missing.jpg"))
    assert items[3].reason == "missing_caption"
    assert isinstance(items[4], dict)  # truncated bytes are the builder's job to catch
    assert items[5]["captions"] == ["an absolute path"]


def test_folder_round_trip_counts_skips(folder, tmp_path):
    source = FolderSource(str(folder / "train.tsv"), label_keys=("label",))
    manifest = build_quietly(source, tmp_path / "out", num_shards=2)
    assert manifest.skipped == {
        "missing_image_file": 1,
        "missing_caption": 1,
        "undecodable_image": 1,
    }
    assert manifest.num_records("train") == 3
    got = read_split(str(tmp_path / "out"), "train")
    assert [r["captions"][0] for r in got] == ["a red square", "a green square", "an absolute path"]
    assert [r["labels"]["label"] for r in got] == [5, 6, 10]
    assert got[0]["image"] == (folder / "images/0.jpg").read_bytes()  # stored untouched
    assert "truncated.jpg" in manifest.info["skip_examples"]["undecodable_image"][0]


def test_folder_jsonl_multiple_captions_ids_and_bad_lines(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(fmt="PNG"))
    lines = [
        json.dumps({"image": "a.png", "texts": ["one", "two"], "uid": "x1"}),
        "{not json",
        json.dumps({"image": "a.png", "texts": "single", "uid": "x2"}),
        json.dumps({"image": "a.png", "texts": [], "uid": "x3"}),
        json.dumps({"image": "a.png", "texts": "no id"}),
    ]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    source = FolderSource(
        str(tmp_path / "caps.jsonl"), image_key="image", caption_key="texts", id_key="uid"
    )
    items = list(source.read("train", source.work_units("train")))
    assert items[0]["captions"] == ["one", "two"] and items[0]["id"] == "x1"
    assert items[1].reason == "bad_annotation_row" and "line 2" in items[1].detail
    assert items[2]["captions"] == ["single"]
    assert items[3].reason == "missing_caption"
    assert items[4].reason == "missing_id"


def test_folder_bad_column_and_missing_file_errors(tmp_path):
    (tmp_path / "caps.csv").write_text("path,caption\na.jpg,hello\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'title'\].*'path'"):
        FolderSource(str(tmp_path / "caps.csv")).rows()
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        FolderSource(str(tmp_path / "nope.csv"))
    # A field far beyond max_text_bytes (16x: a runaway quote, most likely) fails the file.
    (tmp_path / "huge.csv").write_text("filepath,title\na.jpg,ok\nb.jpg," + "x" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"huge\.csv: after line 2: field larger than field limit"):
        FolderSource(str(tmp_path / "huge.csv"), max_text_bytes=10_000).rows()
    (tmp_path / "caps.txt").write_text("x")
    with pytest.raises(ValueError, match="separator"):
        FolderSource(str(tmp_path / "caps.txt"))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "a.jpg", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"no key\(s\) \['filepath'\]"):
        FolderSource(str(tmp_path / "caps.jsonl")).rows()


def test_folder_oversized_captions_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    big = "x" * 200_000  # over csv's own 128 KiB field limit, which used to fail the whole file
    (tmp_path / "caps.csv").write_text(f"filepath,title\na.jpg,first\na.jpg,{big}\na.jpg,third\n")
    lines = [{"filepath": "a.jpg", "title": t} for t in ("first", [big[:60_000]] * 2, "third")]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for name in ("caps.csv", "caps.jsonl"):
        source = FolderSource(str(tmp_path / name), max_text_bytes=100_000)
        assert source.rows()[1].captions is None  # not kept in memory with the rows
        items = list(source.read("train", source.work_units("train")))
        assert items[0]["captions"] == ["first"] and items[2]["captions"] == ["third"]
        assert (
            items[1].reason == "oversized_text" and "over max_text_bytes=100000" in items[1].detail
        )
        manifest = build_quietly(source, tmp_path / f"out-{name}")
        assert manifest.num_records("train") == 2 and manifest.skipped == {"oversized_text": 1}
    # Under the limit (by default 1 MB), a long caption is an ordinary caption.
    items = list(FolderSource(str(tmp_path / "caps.csv")).read("train", range(3)))
    assert items[1]["captions"] == [big]


def test_folder_invalid_label_is_skipped(tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "caps.csv").write_text("filepath,title,cls\na.jpg,hello,dog\na.jpg,hi,3\n")
    source = FolderSource(str(tmp_path / "caps.csv"), label_keys=("cls",))
    items = list(source.read("train", range(2)))
    assert items[0].reason == "invalid_label" and "'dog'" in items[0].detail
    assert items[1]["labels"] == {"cls": 3}


# ---------------------------------------------------------------------------------------------
# WebDataset tars


def test_brace_expansion():
    assert expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("x{9..11}") == ["x9", "x10", "x11"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("{a,b{0..1}}z") == ["az", "b0z", "b1z"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("a{1..2", "a}b", "{x}", "{}"):
        with pytest.raises(ValueError, match="pattern"):
            expand_braces(bad)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def tars(tmp_path):
    """Two good-ish shards and one whose tail is cut off mid-member."""
    good = image_bytes()
    write_tar(
        tmp_path / "shard-000.tar",
        [
            ("000.jpg", good),
            ("000.txt", b"a red thing"),
            ("001.png", image_bytes(fmt="PNG")),
            ("001.json", json.dumps({"caption": "from json", "url": "http://x/1.png"}).encode()),
            ("001.cls", b"4"),
            ("002.jpg", b"\xff\xd8 this is garbage, not a jpeg"),
            ("002.txt", b"garbage image"),
            ("003.jpg", good),  # no caption at all
            ("004.txt", b"a caption without an image"),
        ],
    )
    write_tar(
        tmp_path / "shard-001.tar",
        [
            ("100.webp", image_bytes(fmt="WEBP")),
            ("100.json", b'{"text": ["x", "y"]}'),
            ("101.jpg", good),
            ("101.json", b"{broken"),
        ],
    )
    whole = tmp_path / "whole.tar"
    write_tar(
        whole,
        [("200.jpg", good), ("200.txt", b"kept"), ("201.jpg", good * 20), ("201.txt", b"lost")],
    )
    data = whole.read_bytes()
    (tmp_path / "shard-002.tar").write_bytes(data[: 3 * 512 + len(good) + 2000])
    whole.unlink()
    return tmp_path


def test_webdataset_reads_samples_and_skips(tars):
    source = WebDatasetSource(str(tars / "shard-{000..002}.tar"), caption_field="text")
    items = list(source.read("train", source.work_units("train")[:1]))
    assert items[0]["captions"] == ["a red thing"] and items[0]["id"] == "shard-000/000"
    assert items[1].reason == "missing_caption"  # json has "caption", but the field is "text"
    assert isinstance(items[2], dict)  # garbage image bytes: caught by the builder
    assert [i.reason for i in items[3:]] == ["missing_caption", "missing_image"]
    source = WebDatasetSource(str(tars / "shard-000.tar"))
    sample = list(source.read("train", source.work_units("train")))[1]
    assert sample["captions"] == ["from json"] and sample["labels"] == {"class": 4}
    assert sample["meta"]["url"] == "http://x/1.png"


def test_webdataset_round_trip(tars, tmp_path):
    source = WebDatasetSource(
        [str(tars / "shard-00{0,1}.tar"), str(tars / "*-002.tar")], caption_field="text"
    )
    manifest = build_quietly(source, tmp_path / "out")
    assert [s["file"] for s in manifest.splits["train"]["shards"]] == [
        records.shard_name("train", i, 3) for i in range(3)
    ]  # one output shard per tar
    got = read_split(str(tmp_path / "out"), "train")
    assert [(r["id"], r["captions"]) for r in got] == [
        ("shard-000/000", ["a red thing"]),
        ("shard-001/100", ["x", "y"]),
        ("shard-002/200", ["kept"]),
    ]
    assert manifest.skipped == {
        "missing_caption": 2,
        "undecodable_image": 1,
        "missing_image": 1,
        "bad_json": 1,
        "corrupt_tar": 1,
    }


def test_webdataset_input_errors(tmp_path):
    write_tar(tmp_path / "s-0.tar", [("0.jpg", image_bytes()), ("0.txt", b"t")])
    with pytest.raises(FileNotFoundError, match=r"1 input file\(s\) do not exist.*s-1.tar"):
        WebDatasetSource(str(tmp_path / "s-{0..1}.tar"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        WebDatasetSource(str(tmp_path / "*.tgz"))
    assert WebDatasetSource(str(tmp_path / "s-*.tar")).paths() == [str(tmp_path / "s-0.tar")]
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 40)
    items = list(webdataset.iter_tar_samples(str(tmp_path / "junk.tar")))
    assert len(items) == 1 and items[0].reason == "corrupt_tar"


def test_webdataset_oversized_text_members_are_skipped_unread(tmp_path):
    import tracemalloc

    big = b"x" * 4_000_000
    write_tar(
        tmp_path / "s-0.tar",
        [
            ("000.jpg", image_bytes()),
            ("000.txt", b"kept before"),
            ("001.jpg", image_bytes()),
            ("001.txt", big),
            ("002.jpg", image_bytes()),
            ("002.txt", b"a fine caption"),
            ("002.json", b'{"caption": "' + big[:1_500_000] + b'"}'),
            ("003.jpg", image_bytes()),
            ("003.txt", b"kept after"),
            ("003.npy", big),  # a member no record uses: passed over unread
        ],
    )
    source = WebDatasetSource(str(tmp_path / "s-0.tar"))
    tracemalloc.start()
    try:
        items = list(source.read("train", source.work_units("train")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # reading the 4 MB members would cost at least that much
    assert [i.reason if isinstance(i, Skip) else i["captions"] for i in items] == [
        ["kept before"],
        "oversized_text",
        "oversized_text",
        ["kept after"],
    ]
    assert items[1].detail == "s-0.tar:001: txt (4000000 bytes) over max_text_bytes=1000000"
    assert items[2].detail.startswith("s-0.tar:002: json (1500015 bytes)")
    manifest = build_quietly(source, tmp_path / "out")
    assert manifest.num_records("train") == 2 and manifest.skipped == {"oversized_text": 2}
    # The limit is `jaxclip data build --max-text-bytes`.
    parser = cli.build_parser()
    common = ["data", "build", "--source", "webdataset", "--out", "o", "--input", str(tmp_path / "s-0.tar")]
    assert webdataset.from_args(parser.parse_args(common)).max_text_bytes == 1_000_000
    args = parser.parse_args([*common, "--max-text-bytes", "10"])
    items = list(webdataset.from_args(args).read("train", source.work_units("train")))
    assert [isinstance(i, Skip) for i in items] == [True, True, True, False]  # 11 and 10 bytes
    with pytest.raises(ValueError, match="max_text_bytes must be a positive integer"):
        WebDatasetSource(str(tmp_path / "s-0.tar"), max_text_bytes=0)


# ---------------------------------------------------------------------------------------------
# tfds (a tiny array_record dataset prepared offline: tfds needs TensorFlow only to encode
# image *arrays*, so the in-test builder hands it encoded bytes)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds_lib = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    class TinyCaptions(tfds_lib.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds_lib.core.Version("1.0.0")

        def _info(self):
            features = tfds_lib.features
            return tfds_lib.core.DatasetInfo(
                builder=self,
                features=features.FeaturesDict(
                    {
                        "image": features.Image(shape=(None, None, 3)),
                        "pixels": features.Tensor(shape=(4, 5, 3), dtype=np.uint8),
                        "captions": features.Sequence({"text": features.Text()}),
                        "label": features.ClassLabel(names=["a", "b", "c"]),
                        "name": features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                image = image_bytes((40 * i, 0, 0), fmt="PNG" if i % 2 else "JPEG")
                captions = [] if i == 3 else [f"caption {i}", f"other {i}"]
                yield (
                    str(i),
                    {
                        "image": b"not an image at all" if i == 4 else image,
                        "pixels": np.full((4, 5, 3), i, np.uint8),
                        "captions": {"text": captions},
                        "label": i % 3,
                        "name": f"ex{i}",
                    },
                )

    TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_bytes_without_tensorflow(tfds_dir):
    source = tfds.TfdsSource(
        "tiny_captions",
        ("train", "val=test"),
        data_dir=tfds_dir,
        caption_key="captions/text",
        label_keys=("label",),
        id_key="name",
    )
    assert source.splits() == ("train", "val")
    items = list(source.read("train", source.work_units("train")))
    assert len(items) == 6  # tfds stores examples in its own (shuffled) order
    by_id = {i["id"]: i for i in items if isinstance(i, dict)}
    assert sorted(by_id) == ["ex0", "ex1", "ex2", "ex4", "ex5"]
    assert [i.reason for i in items if isinstance(i, Skip)] == ["missing_caption"]
    assert by_id["ex1"]["image"] == image_bytes((40, 0, 0), fmt="PNG")  # original bytes kept
    assert by_id["ex2"]["captions"] == ["caption 2", "other 2"]
    assert by_id["ex5"]["labels"] == {"label": 2}
    assert len(list(source.read("val", source.work_units("val")))) == 2
    assert "tensorflow" not in sys.modules


def test_tfds_array_images_are_encoded(tfds_dir):
    source = tfds.TfdsSource(
        "tiny_captions", "train", data_dir=tfds_dir, image_key="pixels", caption_key="name"
    )
    record = next(iter(source.read("train", range(1))))
    pixels = np.asarray(Image.open(io.BytesIO(record["image"])))
    assert pixels.shape == (4, 5, 3) and record["image"].startswith(b"\x89PNG")
    assert (pixels == int(record["captions"][0][2:])).all()  # "exN" was drawn with value N


def test_tfds_round_trip(tfds_dir, tmp_path):
    source = tfds.TfdsSource(
        "tiny_captions", "train", data_dir=tfds_dir, caption_key="captions/text", id_key="name"
    )
    manifest = build_quietly(source, tmp_path / "out", num_shards=2)
    assert manifest.skipped == {"missing_caption": 1, "undecodable_image": 1}
    got = read_split(str(tmp_path / "out"), "train")
    assert sorted(r["id"] for r in got) == ["ex0", "ex1", "ex2", "ex5"]


def test_tfds_errors(tfds_dir, monkeypatch):
    with pytest.raises(KeyError, match="no feature 'nope'"):
        tfds.TfdsSource("tiny_captions", data_dir=tfds_dir, caption_key="nope").work_units("train")
    with pytest.raises(FileNotFoundError, match="cannot open tfds dataset 'absent'"):
        tfds.TfdsSource("absent", data_dir=tfds_dir).work_units("train")
    with pytest.raises(ValueError, match="OUT=SPEC"):
        tfds.TfdsSource("tiny_captions", "train[:50%]")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"jaxclip\[tfds\]"):
        tfds.import_tfds()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist)


@pytest.fixture(scope="module")
def fashion_dir():
    if not os.path.isdir(fashion_mnist.DEFAULT_DIR):
        pytest.skip(
            "needs the Debian package dataset-fashion-mnist "
            "(apt-get install -y dataset-fashion-mnist)"
        )
    return fashion_mnist.DEFAULT_DIR


def test_fashion_mnist_real_files(fashion_dir):
    for split, size, mean in (("train", 60_000, 72.94), ("test", 10_000, 73.15)):
        images, labels = fashion_mnist.load_split(split, fashion_dir)
        assert images.shape == (size, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [size // 10] * 10
        assert round(float(images.mean()), 2) == mean
    assert fashion_mnist.prompts(9)[0] == "a photo of an ankle boot."
    assert fashion_mnist.prompts(0)[0] == "a photo of a t-shirt/top."
    assert len(fashion_mnist.CLASS_NAMES) == 10


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_corrupt_files(fashion_dir, tmp_path):
    images, _ = fashion_mnist.load_split("test", fashion_dir)
    path = tmp_path / "x.gz"
    write_idx(path, images[:10], 2051)
    assert (fashion_mnist.read_idx(str(path), 2051, (28, 28)) == images[:10]).all()
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        fashion_mnist.read_idx(str(path), 2049, ())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        fashion_mnist.read_idx(str(path), 2051, (28, 28))
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
    for body in (images[:9].tobytes(), images[:10].tobytes() + b"extra"):  # short, then long
        with gzip.open(path, "wb") as f:  # valid gzip, but the IDX body has the wrong size
            f.write(header + body)
        with pytest.raises(ValueError, match="header says"):
            fashion_mnist.read_idx(str(path), 2051, (28, 28))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_split("train", str(tmp_path / "nowhere"))


def test_fashion_mnist_round_trip(fashion_dir, tmp_path):
    """Builds a 300/100 subset of the real files as the built-in `fashion_mnist`."""
    subset = tmp_path / "subset"
    subset.mkdir()
    arrays = {}
    for split, n in (("train", 300), ("test", 100)):
        images, labels = fashion_mnist.load_split(split, fashion_dir)
        arrays[split] = images[:n], labels[:n]
        images_file, labels_file = fashion_mnist.FILES[split]
        write_idx(subset / images_file, images[:n], 2051)
        write_idx(subset / labels_file, labels[:n], 2049)
    out = builtin.ensure_in("fashion_mnist", str(tmp_path / "cache"), workers=1,
                            data_dir=str(subset))
    manifest = records.read_manifest(out)
    assert manifest.info["class_names"] == list(fashion_mnist.CLASS_NAMES)
    assert manifest.skipped == {}
    for split, (images, labels) in arrays.items():
        got = read_split(out, split)
        assert [r["id"] for r in got] == [f"{split}-{i:05d}" for i in range(len(labels))]
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(r["image"]))) for r in got])
        assert (decoded == images).all()
        assert [r["labels"]["class"] for r in got] == labels.tolist()
        assert got[7]["captions"] == fashion_mnist.prompts(int(labels[7]))
    again = builtin.ensure_in("fashion_mnist", str(tmp_path / "cache"), data_dir=str(subset))
    assert again == out


# ---------------------------------------------------------------------------------------------
# Emoji (Debian fonts-noto-color-emoji + unicode-data)


@pytest.fixture(scope="session")
def emoji_files():
    missing = [
        package
        for package, path in (
            ("unicode-data", emoji.EMOJI_TEST_FILE),
            ("fonts-noto-color-emoji", emoji.FONT_FILE),
        )
        if not os.path.isfile(path)
    ]
    if missing:
        pytest.skip(
            f"needs the Debian package(s) {', '.join(missing)} "
            f"(apt-get install -y {' '.join(missing)})"
        )


@pytest.fixture(scope="session")
def emoji_dataset(emoji_files, tmp_path_factory):
    """All 3,655 emoji rendered at 64 px, built once per test session (~5-10 s on 2 cores).

    Under pytest-xdist the cache sits in the session's shared temp directory, so the workers
    share one build: `ensure_dataset`'s lock makes the others wait for it instead of re-rendering.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return builtin.ensure_in("emoji", str(base / "emoji_cache"), workers=2)


def test_emoji_parse_groups_and_families(emoji_files):
    entries = emoji.parse_emoji_test()
    assert len(entries) == 3655
    assert entries[0].name == "grinning face" and entries[0].emoji == "\U0001f600"
    groups, subgroups = emoji.label_names(entries)
    assert len(groups) == 9 and len(subgroups) == 99 and "Component" not in groups
    counts = {g: sum(e.group == g for e in entries) for g in groups}
    assert counts["People & Body"] == 2148 and counts["Flags"] == 269
    families = emoji.base_groups(entries)
    assert len(set(families)) == 1870
    # Every family is rooted at an emoji without a skin tone, and every handshake is one family.
    assert not any(set(entries[r].codepoints) & set(emoji.SKIN_TONES) for r in set(families))
    assert len({f for e, f in zip(entries, families) if e.name.startswith("handshake")}) == 1


def test_emoji_split_keeps_families_together(emoji_files):
    entries = emoji.parse_emoji_test()
    family = dict(zip(entries, emoji.base_groups(entries)))
    for seed in (0, 1):
        splits = emoji.split_entries(entries, 0.2, seed)
        train = {family[e] for e in splits["train"]}
        evaluation = {family[e] for e in splits["eval"]}
        assert not train & evaluation
        assert len(evaluation) == round(0.2 * 1870)
    splits = emoji.split_entries(entries)
    assert (len(splits["train"]), len(splits["eval"])) == (2886, 769)


def test_emoji_parse_errors(tmp_path):
    bad = tmp_path / "emoji-test.txt"
    bad.write_text("# group: G\n# subgroup: s\n1F600 ; fully-qualified # 😀 grinning face\n")
    with pytest.raises(ValueError, match=r"emoji-test.txt:3: malformed"):
        emoji.parse_emoji_test(str(bad))
    with pytest.raises(FileNotFoundError, match="unicode-data"):
        emoji.parse_emoji_test(str(tmp_path / "missing.txt"))


def test_emoji_unrenderable_is_skipped_and_raqm_required(emoji_files, tmp_path, monkeypatch):
    test_file = tmp_path / "emoji-test.txt"
    test_file.write_text(
        "# group: Flags\n# subgroup: country-flag\n"
        "1F1F3 1F1F4 ; fully-qualified # 🇳🇴 E2.0 flag: Norway\n"
        "# group: Newer\n# subgroup: faces\n"
        "1FAE9 ; fully-qualified # x E16.0 face with bags under eyes\n"  # not in the 15.0 font
    )
    source = emoji.EmojiSource(image_size=32, eval_fraction=0.0, emoji_test_file=str(test_file))
    items = list(source.read("train", source.work_units("train")))
    assert items[0]["captions"] == ["flag: Norway"] and items[0]["id"] == "1F1F3-1F1F4"
    assert items[0]["labels"] == {"group": 0, "subgroup": 0}
    assert Image.open(io.BytesIO(items[0]["image"])).size == (32, 32)
    assert items[1].reason == "unrenderable_emoji" and "blank" in items[1].detail
    clear = emoji.EmojiSource(
        image_size=32, eval_fraction=0.0, background="none", emoji_test_file=str(test_file)
    )
    image = Image.open(io.BytesIO(next(iter(clear.read("train", range(1))))["image"]))
    assert image.mode == "RGBA" and image.getextrema()[3] == (0, 255)  # transparent corners
    from PIL import features

    real_check = features.check
    monkeypatch.setattr(
        features, "check", lambda name: False if name == "raqm" else real_check(name)
    )
    with pytest.raises(RuntimeError, match="raqm"):
        emoji.load_font()


def test_emoji_dataset_round_trip(emoji_dataset):
    manifest = records.read_manifest(emoji_dataset)
    assert manifest.skipped == {}
    assert manifest.info["split_sizes"] == {"train": 2886, "eval": 769}
    assert manifest.info["split_families"] == {"train": 1496, "eval": 374}
    groups, subgroups = manifest.info["group_names"], manifest.info["subgroup_names"]
    seen = {}
    for split in ("train", "eval"):
        got = read_split(emoji_dataset, split)
        assert len(got) == manifest.num_records(split)
        for r in got:
            assert groups[r["labels"]["group"]] == r["meta"]["group"]
            assert subgroups[r["labels"]["subgroup"]] == r["meta"]["subgroup"]
            seen[r["id"]] = split
        for r in got[::97]:  # decoding a sample is enough; the builder decoded every one
            image = Image.open(io.BytesIO(r["image"]))
            assert image.size == (64, 64) and image.mode == "RGB"
            assert image.getextrema() != ((255, 255),) * 3  # not blank white
    assert len(seen) == 3655
    entries = emoji.parse_emoji_test()
    family_split = {}
    for entry, family in zip(entries, emoji.base_groups(entries)):
        split = seen["-".join(f"{c:04X}" for c in entry.codepoints)]
        assert family_split.setdefault(family, split) == split


def test_emoji_ensure_is_idempotent(emoji_dataset):
    manifest = os.path.join(emoji_dataset, records.MANIFEST)
    before = os.stat(manifest).st_mtime_ns
    again = builtin.ensure_in("emoji", os.path.dirname(emoji_dataset))
    assert again == emoji_dataset and os.stat(manifest).st_mtime_ns == before
