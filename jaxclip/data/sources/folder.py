"""Images on disk plus a CSV, TSV or JSONL file of captions (the open_clip `--csv-*` layout).

Each row names one image file and its caption(s):

    filepath<TAB>title                     (CSV/TSV with a header row, open_clip's default keys)
    images/0001.jpg<TAB>a dog on a beach
    {"filepath": "images/0002.jpg", "title": ["a cat", "a sleeping cat"]}     (JSONL)

Image paths are taken relative to `images_root` (by default the annotation file's directory) unless
they are absolute. A JSONL caption may be a string or a list of strings (kept as several
captions); a CSV caption is one string. Optional columns give the record id and integer labels.

A caption (all of a row's captions together) larger than `max_text_bytes` skips its row as
`oversized_text`, and is dropped as soon as the row is parsed rather than kept with the rows.

Rows are the units of work: `work_units` is `range(num_rows)`, so shards are contiguous row
ranges. The annotation file is parsed once per process and cached.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from jaxclip.data.sources.common import (
    DEFAULT_MAX_TEXT_BYTES,
    Record,
    Skip,
    check_split_name,
    check_text_limit,
    clean_captions,
    shards_for,
    text_limit,
)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_CSV_FIELD_FACTOR = 16  # the longest CSV field parsed, in multiples of max_text_bytes
_SEPARATORS = {".tsv": "\t", ".csv": ","}


@dataclasses.dataclass
class Row:
    """One parsed annotation row, or the reason it could not be parsed."""

    image: Any = None
    captions: Any = None
    id: Any = None
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""
    oversized: int = 0  # the caption's size in bytes when over the limit (captions then None)


@dataclasses.dataclass
class FolderSource:
    annotations: str
    images_root: str | None = None
    image_key: str = "filepath"
    caption_key: str = "title"
    separator: str | None = None  # None: "\t" for .tsv, "," for .csv
    id_key: str | None = None
    label_keys: tuple[str, ...] = ()
    split: str = "train"
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    _rows: list[Row] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check_split_name(self.split)
        check_text_limit(self.max_text_bytes)
        self.label_keys = tuple(self.label_keys)
        if not os.path.isfile(self.annotations):
            raise FileNotFoundError(f"annotation file {self.annotations!r} does not exist")
        if not self._is_jsonl() and self._separator() is None:
            raise ValueError(
                f"cannot tell the column separator of {self.annotations!r} from its extension; "
                "pass a separator (--csv-separator), or name the file .csv, .tsv or .jsonl"
            )

    def __getstate__(self):
        # Workers re-parse the annotation file instead of receiving every row through a pipe.
        state = dict(self.__dict__)
        state["_rows"] = None
        return state

    def _is_jsonl(self) -> bool:
        return self.annotations.lower().endswith(_JSONL_SUFFIXES)

    def _separator(self) -> str | None:
        if self.separator is not None:
            return self.separator
        return _SEPARATORS.get(os.path.splitext(self.annotations)[1].lower())

    def _root(self) -> str:
        if self.images_root is not None:
            return self.images_root
        return os.path.dirname(os.path.abspath(self.annotations))

    def _wanted_keys(self) -> list[str]:
        keys = [self.image_key, self.caption_key, *self.label_keys]
        return keys + ([self.id_key] if self.id_key else [])

    def rows(self) -> list[Row]:
        if self._rows is None:
            self._rows = self._parse_jsonl() if self._is_jsonl() else self._parse_csv()
        return self._rows

    def _parse_csv(self) -> list[Row]:
        # csv's own field limit (128 KiB by default) fails the whole file on one long caption.
        # Raised for this parse so that rows stay delimited and an oversized caption costs only
        # its row; a field beyond even this (a runaway quote, most likely) still fails the file.
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, _CSV_FIELD_FACTOR * self.max_text_bytes))
        try:
            return self._parse_csv_rows()
        finally:
            csv.field_size_limit(limit)

    def _parse_csv_rows(self) -> list[Row]:
        with open(self.annotations, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=self._separator())
            header = reader.fieldnames or []
            missing = [k for k in self._wanted_keys() if k not in header]
            if missing:
                raise ValueError(
                    f"{self.annotations}: no column(s) {missing}; the header has {header} "
                    f"(is the separator {self._separator()!r} right?)"
                )
            try:
                return [self._row(values) for values in reader]
            except csv.Error as e:  # e.g. an unterminated quote or a field over the size limit
                raise ValueError(f"{self.annotations}: after line {reader.line_num}: {e}") from e

    def _parse_jsonl(self) -> list[Row]:
        rows: list[Row] = []
        checked = False
        with open(self.annotations, encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    values = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append(Row(error=f"line {line_number}: invalid JSON ({e})"))
                    continue
                if not isinstance(values, dict):
                    rows.append(Row(error=f"line {line_number}: not a JSON object"))
                    continue
                if not checked:
                    # A misspelt key would otherwise skip every row; check it on the first object.
                    missing = [k for k in self._wanted_keys() if k not in values]
                    if missing:
                        raise ValueError(
                            f"{self.annotations}: the first object (line {line_number}) has no "
                            f"key(s) {missing}; it has {sorted(values)}"
                        )
                    checked = True
                rows.append(self._row(values))
        return rows

    def _row(self, values: dict[str, Any]) -> Row:
        captions = values.get(self.caption_key)
        size = _text_size(captions)
        return Row(
            image=values.get(self.image_key),
            captions=None if size > self.max_text_bytes else captions,
            oversized=size if size > self.max_text_bytes else 0,
            id=values.get(self.id_key) if self.id_key else None,
            labels={k: values.get(k) for k in self.label_keys},
        )

    def describe(self) -> str:
        return (
            f"folder: {os.path.abspath(self.annotations)} images_root={self._root()} "
            f"image_key={self.image_key} caption_key={self.caption_key} id_key={self.id_key} "
            f"label_keys={list(self.label_keys)} max_text_bytes={self.max_text_bytes}"
        )

    def splits(self) -> tuple[str, ...]:
        return (self.split,)

    def work_units(self, split: str) -> Sequence[int]:
        return range(len(self.rows()))

    def num_records(self, split: str) -> int:
        return len(self.rows())

    def default_num_shards(self, split: str) -> int:
        return shards_for(len(self.rows()))

    def info(self) -> dict[str, Any]:
        return {"annotations": os.path.abspath(self.annotations), "images_root": self._root()}

    def read(self, split: str, units: Sequence[int]) -> Iterator[Record | Skip]:
        rows = self.rows()
        for index in units:
            yield self._record(index, rows[index])

    def _record(self, index: int, row: Row) -> Record | Skip:
        where = f"{self.annotations} row {index}"
        if row.error:
            return Skip("bad_annotation_row", f"{self.annotations} {row.error}")
        if not isinstance(row.image, str) or not row.image.strip():
            return Skip("missing_image_path", where)
        if row.oversized:
            return Skip(
                "oversized_text",
                f"{where}: caption of {row.oversized} bytes over max_text_bytes="
                f"{self.max_text_bytes}",
            )
        captions = clean_captions(row.captions)
        if not captions:
            return Skip("missing_caption", where)
        labels = {}
        for key, value in row.labels.items():
            try:
                labels[key] = _as_int(value)
            except (TypeError, ValueError):
                return Skip("invalid_label", f"{where}: {key}={value!r} is not an integer")
        if self.id_key:
            if row.id is None or str(row.id).strip() == "":
                return Skip("missing_id", where)
            record_id = str(row.id).strip()
        else:
            record_id = f"row{index}"
        # os.path.join keeps an absolute path as it is.
        path = os.path.join(self._root(), row.image.strip())
        try:
            with open(path, "rb") as f:
                image = f.read()
        except FileNotFoundError:
            return Skip("missing_image_file", path)
        except OSError as e:
            return Skip("unreadable_image_file", f"{path}: {e}")
        meta = {"path": row.image.strip()}
        return {
            "image": image,
            "captions": captions,
            "id": record_id,
            "labels": labels,
            "meta": meta,
        }


def _text_size(value: Any) -> int:
    """UTF-8 size of a caption field: a string, or the strings of a list (JSONL)."""
    items = value if isinstance(value, list) else [value]
    # surrogatepass: a lone surrogate escaped in JSON must not raise here (cleaning drops it).
    return sum(len(v.encode("utf-8", "surrogatepass")) for v in items if isinstance(v, str))


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("booleans are not labels")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError(type(value).__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source folder (images + CSV/TSV/JSONL captions)")
    group.add_argument(
        "--images-root",
        help="directory image paths are relative to (default: the annotation file's directory)",
    )
    group.add_argument("--csv-img-key", help="image path column (default: filepath)")
    group.add_argument("--csv-caption-key", help="caption column (default: title)")
    group.add_argument(
        "--csv-separator",
        help="column separator (default: from the extension, tab for .tsv, comma for .csv)",
    )
    group.add_argument(
        "--csv-id-key", help="column holding a unique record id (default: row number)"
    )
    group.add_argument("--csv-label-keys", help="comma-separated integer label columns")


ARG_DESTS = (
    "images_root",
    "csv_img_key",
    "csv_caption_key",
    "csv_separator",
    "csv_id_key",
    "csv_label_keys",
)


def from_args(args: argparse.Namespace) -> FolderSource:
    if not args.input or len(args.input) != 1:
        raise ValueError("--source folder needs exactly one --input: the CSV, TSV or JSONL file")
    separator = args.csv_separator
    if separator is not None:
        # Shells make a literal tab awkward; accept the escape as open_clip users write it.
        separator = separator.encode().decode("unicode_escape")
    return FolderSource(
        annotations=args.input[0],
        images_root=args.images_root,
        image_key=args.csv_img_key or "filepath",
        caption_key=args.csv_caption_key or "title",
        separator=separator,
        id_key=args.csv_id_key,
        label_keys=tuple(k for k in (args.csv_label_keys or "").split(",") if k),
        split=args.split or "train",
        max_text_bytes=text_limit(args),
    )
