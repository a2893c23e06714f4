"""Tests of `jaxclip.data.build` (image checks, deterministic sharding, resuming, locking) and of
`jaxclip data build`.

Most tests use `ListSource`, a synthetic in-process source that logs which work units it read,
so a test can tell exactly which shards a (re)build touched.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import os
import signal
import threading

import numpy as np
import pytest
from PIL import Image

from jaxclip import cli
from jaxclip.data import build, builtin, records
from jaxclip.data.sources import Skip, checks
from jaxclip.data.sources.folder import FolderSource


def encoded(size=(24, 16), mode="RGB", fmt="PNG", color=None, **save_args) -> bytes:
    buffer = io.BytesIO()
    color = color if color is not None else ((10, 200, 30) if mode == "RGB" else (10, 200, 30, 99))
    Image.new(mode, size, color).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@dataclasses.dataclass
class ListSource:
    """`n` items per split; item i has an undecodable image when i % 7 == 3 and is a source-level
    Skip when i % 11 == 5. Reads are appended to `log` ("split start stop" lines); `fail_at`
    makes reading that index raise, like a crash mid-shard."""

    n: int = 20
    log: str | None = None
    fail_at: int | None = None
    kill_at: int | None = None  # SIGKILLs the reading process, like the kernel's OOM killer

    def describe(self):
        return f"list source n={self.n}"  # fail_at and log are not part of the output

    def splits(self):
        return ("train", "val")

    def work_units(self, split):
        return range(self.n if split == "train" else 5)

    def num_records(self, split):
        return len(self.work_units(split))

    def default_num_shards(self, split):
        return 1

    def info(self):
        return {"n": self.n}

    def read(self, split, units):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{split} {units.start} {units.stop}\n")
        for i in units:
            if i == self.fail_at:
                raise RuntimeError(f"simulated crash at item {i}")
            if i == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if i % 11 == 5:
                yield Skip("missing_caption", f"item {i}")
                continue
            image = b"garbage" if i % 7 == 3 else encoded(color=(i, 2 * i, 3))
            yield {
                "image": image,
                "captions": [f"{split} item {i}"],
                "id": f"{split}-{i}",
                "labels": {"index": i},
                "meta": {},
            }


def read_ids(directory, split):
    return [r["id"] for r in records.iter_records(records.shard_paths(str(directory), split))]


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.split()) for line in f]


def shard_state(directory):
    """mtime_ns and inode of every shard, to tell rewritten files from untouched ones."""
    return {
        name: (os.stat(directory / name).st_mtime_ns, os.stat(directory / name).st_ino)
        for name in os.listdir(directory)
        if name.endswith(records.SHARD_SUFFIX)
    }


# ---------------------------------------------------------------------------------------------
# Image checks


def test_prepare_image_keeps_small_valid_images_untouched():
    options = checks.ImageOptions(max_image_size=64)
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encoded(fmt=fmt)
        assert checks.prepare_image(data, options) == (data, "")


def noisy_jpeg(size=(64, 64)) -> bytes:
    """A JPEG whose bulk is entropy-coded scan data, so a cut lands after the header."""
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_prepare_image_rejects_truncated_and_garbage():
    options = checks.ImageOptions()
    data = noisy_jpeg()
    cut = data[: len(data) * 3 // 4]
    assert Image.open(io.BytesIO(cut)).size == (64, 64)  # the header alone looks fine
    truncated = checks.prepare_image(cut, options)
    assert truncated.reason == "undecodable_image" and "truncated" in truncated.detail
    garbage = checks.prepare_image(b"\x89PNG\r\n\x1a\n but then nothing", options)
    assert isinstance(garbage, Skip) and garbage.reason == "undecodable_image"


def test_prepare_image_shrinks_oversized_images():
    options = checks.ImageOptions(max_image_size=100, jpeg_quality=80)
    data, done = checks.prepare_image(encoded(size=(300, 200), fmt="PNG"), options)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size, done) == ("JPEG", (100, 67), "resized_jpeg")
    data, done = checks.prepare_image(encoded(size=(300, 200), mode="RGBA"), options)
    image = Image.open(io.BytesIO(data))  # transparency survives: PNG, not JPEG
    assert (image.format, image.mode, image.size, done) == ("PNG", "RGBA", (100, 67), "resized_png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = encoded(size=(300, 200), fmt="JPEG", exif=exif.tobytes())
    data, _ = checks.prepare_image(rotated, options)
    assert Image.open(io.BytesIO(data)).size == (67, 100)


def test_prepare_image_converts_other_formats_and_refuses_bombs(monkeypatch):
    data, done = checks.prepare_image(encoded(fmt="GIF"), checks.ImageOptions())
    assert Image.open(io.BytesIO(data)).format == "PNG" and done == "converted_GIF_to_png"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24x16 is over twice this: a "bomb"
    skip = checks.prepare_image(encoded(), checks.ImageOptions())
    assert isinstance(skip, Skip) and skip.reason == "image_too_large"


def test_finish_record_checks_fields():
    good = {"image": encoded(), "captions": ["c"], "id": "a", "labels": {"k": 1}, "meta": {}}
    counter = collections.Counter()
    assert checks.finish_record(good, checks.ImageOptions(), counter)["image"] == good["image"]
    for change, reason in (
        ({"captions": []}, "missing_caption"),
        ({"captions": ["ok", ""]}, "missing_caption"),
        ({"labels": {"k": "1"}}, "invalid_label"),
        ({"labels": {"k": True}}, "invalid_label"),
        ({"id": ""}, "missing_id"),
        ({"image": b""}, "missing_image"),
    ):
        result = checks.finish_record({**good, **change}, checks.ImageOptions(), counter)
        assert isinstance(result, Skip) and result.reason == reason, change


# ---------------------------------------------------------------------------------------------
# Sharding, manifest, resuming


def test_sharding_is_contiguous_and_manifest_complete(tmp_path):
    manifest = build.build_dataset(
        ListSource(), str(tmp_path), num_shards={"train": 3}, progress=False, command="my command"
    )
    shards = manifest.splits["train"]["shards"]
    assert [s["file"] for s in shards] == [records.shard_name("train", k, 3) for k in range(3)]
    # Items 0-5, 6-12, 13-19 (k * 20 // 3); minus undecodable 3, 10, 17 and skipped 5, 16.
    assert [s["count"] for s in shards] == [4, 6, 5]
    kept = [i for i in range(20) if i % 7 != 3 and i % 11 != 5]
    assert read_ids(tmp_path, "train") == [f"train-{i}" for i in kept]
    assert manifest.splits["val"]["num_records"] == 4
    assert manifest.skipped == {"undecodable_image": 4, "missing_caption": 2}
    assert manifest.info["skipped_by_split"]["val"] == {"undecodable_image": 1}
    assert manifest.info["skip_examples"]["missing_caption"] == ["item 5", "item 16"]
    assert manifest.info["n"] == 20 and manifest.build_command == "my command"
    assert manifest.source == "list source n=20"
    assert records.read_manifest(str(tmp_path)) == manifest


def test_more_shards_than_units_are_capped(tmp_path):
    manifest = build.build_dataset(ListSource(n=3), str(tmp_path), num_shards=8, progress=False)
    assert len(manifest.splits["train"]["shards"]) == 3
    assert len(manifest.splits["val"]["shards"]) == 5


def test_rerun_rebuilds_only_the_missing_shard(tmp_path):
    out, log = tmp_path / "out", str(tmp_path / "log")
    first = build.build_dataset(ListSource(), str(out), num_shards=4, progress=False)
    before = shard_state(out)
    missing = records.shard_name("train", 2, 4)
    os.remove(out / missing)
    os.remove(out / records.MANIFEST)
    (out / (missing + ".tmp")).write_bytes(b"half-written garbage from a killed run")
    again = build.build_dataset(ListSource(log=log), str(out), num_shards=4, progress=False)
    assert read_log(log) == [("train", "10", "15")]
    after = shard_state(out)
    assert {k for k in before if before[k] != after[k]} == {missing}
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert again == first  # counts, including skips of the shards not rebuilt


def test_interrupted_build_resumes_where_it_stopped(tmp_path):
    out, log = tmp_path / "out", str(tmp_path / "log")
    with pytest.raises(RuntimeError, match="simulated crash at item 12"):
        build.build_dataset(ListSource(fail_at=12), str(out), num_shards=4, progress=False)
    assert not (out / records.MANIFEST).exists()
    assert sorted(shard_state(out)) == [records.shard_name("train", k, 4) for k in range(2)]
    manifest = build.build_dataset(ListSource(log=log), str(out), num_shards=4, progress=False)
    assert read_log(log) == [
        ("train", "10", "15"),
        ("train", "15", "20"),
        ("val", "0", "1"),
        ("val", "1", "2"),
        ("val", "2", "3"),
        ("val", "3", "5"),
    ]
    fresh = build.build_dataset(ListSource(), str(tmp_path / "fresh"), num_shards=4, progress=False)
    assert manifest.splits == fresh.splits and manifest.skipped == fresh.skipped


def test_finished_build_is_reused_and_other_settings_refused(tmp_path):
    log = str(tmp_path / "log")
    build.build_dataset(ListSource(), str(tmp_path / "out"), num_shards=2, progress=False)
    build.build_dataset(ListSource(log=log), str(tmp_path / "out"), num_shards=2, progress=False)
    assert read_log(log) == []
    with pytest.raises(ValueError, match=r"other settings \(num_shards differ"):
        build.build_dataset(ListSource(), str(tmp_path / "out"), num_shards=3, progress=False)
    with pytest.raises(ValueError, match="image_options"):
        build.build_dataset(
            ListSource(), str(tmp_path / "out"), num_shards=2, progress=False, max_image_size=16
        )


def test_a_new_builtin_dataset_is_a_source_plus_one_registry_entry(tmp_path, monkeypatch):
    # The recipe docs/architecture.md gives: the entry makes the name a dataset anywhere a
    # dataset directory is accepted, built into the cache on first use and reused after.
    entry = builtin.Builtin(ListSource, num_shards={"train": 2, "val": 1}, parallel=False)
    monkeypatch.setitem(builtin.BUILTINS, "toy_list", entry)
    directory = builtin.dataset_dir("toy_list", str(tmp_path))
    assert directory.startswith(os.path.join(str(tmp_path), "datasets", "toy_list-"))
    assert records.read_manifest(directory).num_records("train") == 15
    assert builtin.dataset_dir("toy_list", str(tmp_path)) == directory
    assert {"shapes", "shapes_small", "fashion_mnist", "emoji"} <= set(builtin.names())


def test_concurrent_ensure_builds_once(tmp_path):
    log = str(tmp_path / "log")
    results = []

    def ensure():
        results.append(
            build.ensure_dataset(
                ListSource(log=log), str(tmp_path / "cache"), "list", progress=False
            )
        )

    threads = [threading.Thread(target=ensure) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert sorted(read_log(log)) == [("train", "0", "20"), ("val", "0", "5")]
    assert os.path.basename(results[0]).startswith("list-")


@pytest.fixture
def folder_dataset(tmp_path):
    """40 PNGs, 8..47 px wide (4 of them truncated), and a CSV naming them."""
    rows = ["name,text"]
    for i in range(40):
        data = encoded(size=(8 + i, 8), color=(i, 0, 0))
        (tmp_path / f"{i}.png").write_bytes(data[:30] if i % 9 == 4 else data)
        rows.append(f"{i}.png,picture {i}")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_worker_processes_give_identical_shards(folder_dataset, tmp_path):
    source = FolderSource(str(folder_dataset / "caps.csv"), image_key="name", caption_key="text")
    one = build.build_dataset(source, str(tmp_path / "w1"), num_shards=4, progress=False)
    two = build.build_dataset(source, str(tmp_path / "w2"), num_shards=4, workers=2, progress=False)
    assert one.splits == two.splits and one.skipped == two.skipped == {"undecodable_image": 4}
    for shard in one.splits["train"]["shards"]:
        assert (tmp_path / "w1" / shard["file"]).read_bytes() == (
            tmp_path / "w2" / shard["file"]
        ).read_bytes()


def test_worker_failure_names_the_shard(folder_dataset, tmp_path):
    source = FolderSource(str(folder_dataset / "caps.csv"), image_key="name", caption_key="text")
    source.rows()  # parsed here; the worker processes parse again and find the file gone
    os.remove(folder_dataset / "caps.csv")
    with pytest.raises(RuntimeError, match=r"building shard .*train-0000\d-of-00004.* failed"):
        build.build_dataset(source, str(tmp_path / "out"), num_shards=4, workers=2, progress=False)


def test_killed_worker_fails_the_build_instead_of_hanging(tmp_path):
    # ListSource is pickled by reference, so the spawned workers import this test module.
    with pytest.raises(RuntimeError, match=r"building shard .* failed: A process in the process"):
        build.build_dataset(
            ListSource(kill_at=12), str(tmp_path), num_shards=4, workers=2, progress=False
        )
    assert not (tmp_path / records.MANIFEST).exists()
    manifest = build.build_dataset(ListSource(), str(tmp_path), num_shards=4, progress=False)
    assert manifest.num_records("train") == 15


# ---------------------------------------------------------------------------------------------
# Command line


def data_build_parser() -> argparse.ArgumentParser:
    """The project CLI's parser: `jaxclip data build ...`."""
    return cli.build_parser()


def run_data_build(args: argparse.Namespace) -> int:
    return cli.cmd_data_build(args, [])


def test_cli_builds_a_tsv_dataset(folder_dataset, tmp_path, capsys):
    (folder_dataset / "caps.tsv").write_text(
        (folder_dataset / "caps.csv").read_text().replace(",", "\t")
    )
    args = data_build_parser().parse_args(
        [
            "data",
            "build",
            "--source",
            "folder",
            "--input",
            str(folder_dataset / "caps.tsv"),
            "--out",
            str(tmp_path / "out"),
            "--csv-img-key",
            "name",
            "--csv-caption-key",
            "text",
            "--csv-separator",
            "\\t",
            "--split",
            "valid",
            "--num-shards",
            "2",
            "--workers",
            "1",
            "--max-image-size",
            "40",
            "--no-progress",
        ]
    )
    assert run_data_build(args) == 0
    printed = capsys.readouterr().out
    assert "valid: 36 records in 2 shard(s)" in printed
    assert "skipped 4 (undecodable_image)" in printed
    manifest = records.read_manifest(str(tmp_path / "out"))
    assert manifest.info["converted_images"] == {"resized_jpeg": 7}  # widths 41..47
    assert manifest.build_command
    sizes = [
        Image.open(io.BytesIO(r["image"])).size
        for r in records.iter_records(records.shard_paths(str(tmp_path / "out"), "valid"))
    ]
    assert max(max(s) for s in sizes) == 40


def test_cli_reports_bad_arguments(folder_dataset, tmp_path, capsys):
    parser = data_build_parser()
    common = ["data", "build", "--out", str(tmp_path / "out"), "--no-progress"]
    args = parser.parse_args([*common, "--source", "fashion_mnist", "--csv-img-key", "x"])
    assert run_data_build(args) == 2
    assert "--csv-img-key belong(s) to --source folder" in capsys.readouterr().err
    args = parser.parse_args(
        [*common, "--source", "folder", "--input", str(folder_dataset / "caps.csv")]
    )
    assert run_data_build(args) == 1
    assert "no column(s) ['filepath', 'title']" in capsys.readouterr().err
    args = parser.parse_args(
        [*common, "--source", "webdataset", "--input", str(tmp_path / "none-{0..3}.tar")]
    )
    assert run_data_build(args) == 1
    assert "4 input file(s) do not exist" in capsys.readouterr().err


def test_cli_fails_when_a_split_ends_up_with_no_records(tmp_path, capsys):
    # Every image the CSV names is missing: the build must not report success with 0 records
    # (training on it died with a ZeroDivisionError), and what it wrote stays for inspection.
    rows = ["name,text", *(f"img/{i}.png,picture {i}" for i in range(6))]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = [
        "data",
        "build",
        "--source",
        "folder",
        "--input",
        str(tmp_path / "caps.csv"),
        "--out",
        str(out),
        "--csv-img-key",
        "name",
        "--csv-caption-key",
        "text",
        "--num-shards",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    for _ in range(2):  # the rerun (shards already finished) fails the same way
        assert run_data_build(data_build_parser().parse_args(argv)) == 1
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert "\n" not in err and "wrote" not in captured.out
        assert err.startswith(f"error: split 'train' of {out} has no records: all 6 input items")
        assert "missing_image_file: 6" in err and str(tmp_path / "img") in err
        assert not (out / records.MANIFEST).exists()
        assert sorted(p.name for p in out.glob("*.arrayrecord")) == [
            records.shard_name("train", k, 2) for k in range(2)
        ]
        assert (out / build.STATE_DIR / "config.json").exists()
    # One split with records and one without fails as well, naming the empty one.
    with pytest.raises(build.EmptySplitError, match="split 'val' of .* has no records: all 5"):
        build.build_dataset(_EmptyVal(), str(tmp_path / "mixed"), progress=False)


class _EmptyVal(ListSource):
    """ListSource whose val split has only undecodable images."""

    def describe(self):
        return "list source, empty val"

    def read(self, split, units):
        for item in super().read(split, units):
            if split == "val" and isinstance(item, dict):
                item = {**item, "image": b"garbage"}
            yield item
