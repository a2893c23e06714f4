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

Training reads shards through `ShardSource`, which turns a record the storage cannot give back (a
corrupt ArrayRecord chunk, a damaged shard, an I/O error) into an `Unreadable` value instead of an
exception, so the pipeline skips it like an undecodable record.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import itertools
import json
import logging
import os
import threading
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


def split_shards(directory: str, split: str) -> list[tuple[str, int]]:
    """(path, record count) of every shard of `split`, in order, checked against the manifest."""
    manifest = read_manifest(directory)
    if split not in manifest.splits:
        raise KeyError(
            f"dataset {directory!r} has no split {split!r}; it has {sorted(manifest.splits)}"
        )
    shards = [
        (os.path.join(directory, s["file"]), int(s["count"]))
        for s in manifest.splits[split]["shards"]
    ]
    missing = [p for p, _ in shards if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"dataset {directory!r} split {split!r} lacks shards: {missing}")
    return shards


def shard_paths(directory: str, split: str) -> list[str]:
    """The shard files of `split`, in order, checked against the manifest."""
    return [path for path, _ in split_shards(directory, split)]


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


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """Stands in for a record its shard could not give back; `where` names the shard and why."""

    where: str


class ShardSource:
    """Random access to the records of a split's shards (a grain data source) that does not raise.

    Reading a record whose ArrayRecord chunk is damaged raises (Riegeli checks a hash per chunk:
    one flipped byte fails it), and it does so at the same stream index on every rerun, so
    training would stop at the same step forever. Here that record reads as an `Unreadable`
    value, which the pipeline skips and counts like an undecodable record. Shards are written
    with one record per chunk, so a bad chunk costs exactly one record.

    Record counts come from the manifest rather than from opening every shard (grain's
    ArrayRecordDataSource opens them all to count, and counts a shard whose index is damaged as
    empty, which silently shifts every later record). A shard that cannot be opened, or whose
    count disagrees with the manifest, reads as `Unreadable` for all of its records; the other
    shards keep their indices, so the stream's order does not depend on which shards are damaged.

    A failed read is retried once on a freshly opened reader (a transient I/O error then costs
    nothing, and the batches stay those of an undisturbed run); after that, the record or shard
    is remembered as bad in this process, logged once, and never read again.
    """

    def __init__(self, shards: list[tuple[str, int]]):
        self._paths = [path for path, _ in shards]
        self._counts = [count for _, count in shards]
        self._ends = list(itertools.accumulate(self._counts))
        self._reset()

    def _reset(self) -> None:
        self._readers: list[Any] = [None] * len(self._paths)
        self._lock = threading.Lock()
        self._bad: dict[tuple[int, int], Unreadable] = {}  # (shard, position) -> its stand-in
        self._bad_shards: dict[int, Unreadable] = {}

    def __getstate__(self):
        # grain pickles the pipeline into loader processes: send paths and counts, not readers.
        return {"_paths": self._paths, "_counts": self._counts, "_ends": self._ends}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"ShardSource({len(self._paths)} shards, {len(self)} records)"

    def __getitem__(self, index: int) -> bytes | Unreadable:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        shard = bisect.bisect_right(self._ends, index)  # skips shards with no records
        position = index - (self._ends[shard - 1] if shard else 0)
        known = self._bad_shards.get(shard) or self._bad.get((shard, position))
        if known is not None:
            return known
        error = None
        for _ in range(2):
            try:
                reader = self._reader(shard)
            except RuntimeError as e:
                error = e
                continue
            try:
                return reader.read([position])[0]
            except (RuntimeError, OSError) as e:  # array_record: corruption, I/O errors
                error = e
                # A fresh reader for the retry. The old one is dropped, not closed: another
                # thread may be reading from it, and it closes when the last reference goes.
                with self._lock:
                    if self._readers[shard] is reader:
                        self._readers[shard] = None
        path = self._paths[shard]
        whole = isinstance(error, _ShardError)
        table, key = (self._bad_shards, shard) if whole else (self._bad, (shard, position))
        with self._lock:  # so that threads meeting the same damage log it once between them
            first = key not in table
            bad = table.setdefault(
                key,
                Unreadable(f"{path}: {error}" if whole else f"{path} record {position}: {error}"),
            )
        if first and whole:
            logging.warning(
                "shard %s is unreadable; its %d records are skipped: %s",
                path,
                self._counts[shard],
                error,
            )
        elif first:
            logging.warning(
                "record %d of shard %s is unreadable and skipped: %s", position, path, error
            )
        return bad

    def _reader(self, shard: int):
        reader = self._readers[shard]
        if reader is not None:
            return reader
        with self._lock:
            if self._readers[shard] is None:
                self._readers[shard] = _open_shard(self._paths[shard], self._counts[shard])
            return self._readers[shard]


class _ShardError(RuntimeError):
    """A shard that cannot be read at all."""


def _open_shard(path: str, count: int):
    from array_record.python import array_record_module

    try:
        # As grain opens shards for random access: no readahead, a small buffer.
        reader = array_record_module.ArrayRecordReader(
            path, options="readahead_buffer_size:0", file_reader_buffer_size=32768
        )
    except Exception as e:  # a missing or unopenable file
        raise _ShardError(f"cannot open: {e}") from e
    if not reader.ok():
        # A missing file or a damaged index does not raise here: the reader reports not-ok, and
        # closing it raises the reason.
        try:
            reader.close()
        except Exception as e:
            raise _ShardError(f"cannot open: {e}") from e
        raise _ShardError("cannot open")
    if reader.num_records() != count:
        raise _ShardError(
            f"the manifest says {count} records, the shard has {reader.num_records()}"
        )
    return reader
