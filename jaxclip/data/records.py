"""The one on-disk record format: image-text records in ArrayRecord shards.

Every source (the procedural demo set, folders + CSV, WebDataset tars, tfds, Fashion-MNIST, emoji)
is converted into the same layout, and the training pipeline only ever reads this layout:

    DIR/
      manifest.json                      counts, fields, source, build command, skipped inputs
      train-00000-of-00004.arrayrecord   one msgpack-encoded record per entry
      ...

A record is a dict:
    image     bytes       encoded image (JPEG, PNG or WebP), decoded in the input pipeline
    captions  list[str]   one or more captions (COCO-style multi-caption sets keep all of them)
    id        str         a stable identifier, unique within the dataset
    labels    dict        optional integer labels, e.g. {"class": 7}
    meta      dict        optional JSON-compatible metadata

Shards are written to a temporary name and renamed when complete, so a shard file that exists is a
complete shard. That is what makes `jaxclip data build` resumable: a rerun skips finished shards.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgpack

FORMAT = "jaxclip-records-v1"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".arrayrecord"


class CorruptRecordError(ValueError):
    """A record that cannot be decoded or lacks a required field."""


def encode_record(record: dict[str, Any]) -> bytes:
    """Validates and serialises one record."""
    image = record.get("image")
    if not isinstance(image, bytes | bytearray) or not image:
        raise CorruptRecordError(f"record {record.get('id')!r}: 'image' must be non-empty bytes")
    captions = record.get("captions")
    if isinstance(captions, str):
        captions = [captions]
    if not captions or not all(isinstance(c, str) for c in captions):
        raise CorruptRecordError(f"record {record.get('id')!r}: 'captions' must be a list of str")
    payload = {
        "image": bytes(image),
        "captions": list(captions),
        "id": str(record.get("id", "")),
        "labels": dict(record.get("labels") or {}),
        "meta": dict(record.get("meta") or {}),
    }
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses one serialised record; raises CorruptRecordError on anything malformed."""
    try:
        record = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise CorruptRecordError(f"undecodable record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("image"), bytes):
        raise CorruptRecordError("record has no 'image' bytes")
    if not record.get("captions"):
        raise CorruptRecordError(f"record {record.get('id')!r} has no captions")
    return record


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def write_shard(
    path: str,
    records: Iterable[dict[str, Any]],
    *,
    before_commit: Callable[[int], None] | None = None,
) -> int:
    """Writes records to `path` atomically (temp file + rename); returns the number written.

    `before_commit(count)` runs after the last record is written and before the rename, so anything
    it saves (the builder's per-shard statistics) exists whenever the shard file does.
    """
    from array_record.python import array_record_module

    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(encode_record(record))
            count += 1
    finally:
        writer.close()
    if before_commit is not None:
        before_commit(count)
    os.replace(tmp, path)
    return count


@dataclasses.dataclass
class Manifest:
    """What a dataset directory holds; written last, so its presence marks a finished build."""

    splits: dict[str, dict[str, Any]]  # split -> {"num_records": int, "shards": [{file, count}]}
    source: str = ""
    build_command: str = ""
    fields: tuple[str, ...] = ("image", "captions", "id", "labels", "meta")
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT

    def num_records(self, split: str) -> int:
        return int(self.splits[split]["num_records"])


def write_manifest(directory: str, manifest: Manifest) -> None:
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(manifest), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_manifest(directory: str) -> Manifest:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory!r} is not a jaxclip dataset: {MANIFEST} is missing "
            "(build it with `jaxclip data build`)"
        )
    with open(path) as f:
        raw = json.load(f)
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown dataset format {raw.get('format')!r}, expected {FORMAT}")
    raw["fields"] = tuple(raw.get("fields", ()))
    return Manifest(**raw)


def shard_paths(directory: str, split: str) -> list[str]:
    """The shard files of `split`, in order, checked against the manifest."""
    manifest = read_manifest(directory)
    if split not in manifest.splits:
        raise KeyError(
            f"dataset {directory!r} has no split {split!r}; it has {sorted(manifest.splits)}"
        )
    paths = [os.path.join(directory, s["file"]) for s in manifest.splits[split]["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"dataset {directory!r} split {split!r} lacks shards: {missing}")
    return paths


def glob_shards(pattern: str) -> list[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard files match {pattern!r}")
    return paths


def iter_records(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Sequentially reads and decodes every record (for tools and tests, not the train loop)."""
    from array_record.python import array_record_module

    for path in paths:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            for i in range(reader.num_records()):
                yield decode_record(reader.read([i])[0])
        finally:
            reader.close()
