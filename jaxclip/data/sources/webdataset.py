"""WebDataset `.tar` shards, as written by img2dataset for LAION and DataComp.

A sample is the run of consecutive tar members sharing a key, the member name up to the first
dot of its base name: `000123.jpg`, `000123.txt`, `000123.json`. The image is the first member
with an image extension (jpg/jpeg/png/webp by default); the caption comes from the `txt` member,
or else from a field of the `json` member (`caption` by default; a string or a list of strings);
an optional `cls` member gives an integer class label. Other members are passed over unread, and
a text member (txt, json, cls) larger than `max_text_bytes` skips its sample as `oversized_text`
without being read: its size is in the member's header.

Inputs are paths with `{000..999}` / `{a,b}` brace patterns (expanded here, without the
webdataset package) and/or shell globs. The tar files are the units of work; each is read
sequentially with the standard library's `tarfile` in streaming mode, so `.tar.gz` works too.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from jaxclip.data.sources.common import (
    DEFAULT_MAX_TEXT_BYTES,
    Record,
    Skip,
    check_split_name,
    check_text_limit,
    clean_captions,
    text_limit,
)

DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json", "cls")  # the other members a record is made of


@dataclasses.dataclass(frozen=True)
class Oversized:
    """A text member left unread because its header says it is larger than the limit."""

    size: int


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expands `{a,b}` alternatives and `{000..012}` numeric ranges, left to right.

    Zero padding follows the wider endpoint, as in bash: `{8..10}` gives 8 9 10 and `{08..10}`
    gives 08 09 10. Descending ranges count down. Braces may nest (`{a,b{1..2}}`).
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in pattern {pattern!r}")
        return [pattern]
    depth, end, commas = 0, -1, []
    for i in range(start, len(pattern)):
        c = pattern[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
        elif c == "," and depth == 1:
            commas.append(i)
    if end < 0:
        raise ValueError(f"unbalanced '{{' in pattern {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if commas:
        bounds = [start, *commas, end]
        options = [pattern[a + 1 : b] for a, b in itertools.pairwise(bounds)]
    elif match := _RANGE.match(body):
        lo, hi = match.group(1), match.group(2)
        width = max(len(lo.lstrip("-")), len(hi.lstrip("-"))) if _padded(lo, hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        raise ValueError(
            f"cannot expand {{{body}}} in pattern {pattern!r}: use {{a,b,...}} or {{000..999}}"
        )
    results = []
    for option in options:
        # Re-expanding handles braces nested in the option and any later groups in the tail.
        results.extend(expand_braces(head + option + tail))
    return results


def _padded(lo: str, hi: str) -> bool:
    return any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo, hi))


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    """The tar files named by `patterns`, brace-expanded, globbed, in order and de-duplicated.

    A plain path (no glob characters) must exist: a hole in a `{000..999}` range is reported
    instead of silently building a smaller dataset.
    """
    paths: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"no files match {expanded!r} (from {pattern!r})")
                paths.extend(matches)
            elif os.path.isfile(expanded):
                paths.append(expanded)
            else:
                missing.append(expanded)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} input file(s) do not exist, e.g. {missing[:3]}; "
            "use a glob such as 'dir/*.tar' to take whichever shards are present"
        )
    if not paths:
        raise FileNotFoundError(f"no input files in {list(patterns)}")
    return list(dict.fromkeys(paths))


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`): the extension starts at the first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_tar_samples(
    path: str,
    image_exts: Sequence[str] = DEFAULT_IMAGE_EXTS,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
) -> Iterator[tuple[str, dict[str, bytes | Oversized | None]] | Skip]:
    """Groups consecutive members by key; a tar broken mid-way ends with a `corrupt_tar` Skip.

    Only what a record uses is read: image members, and text members up to `max_text_bytes`. A
    larger text member maps to `Oversized`, any other member to None; streaming tarfile passes
    over unread data in small blocks, so a huge member never sits in memory whole.
    """
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key != key:
                    if sample:
                        yield key, sample
                    key, sample = member_key, {}
                if ext in TEXT_EXTS and member.size > max_text_bytes:
                    sample[ext] = Oversized(member.size)
                elif ext in TEXT_EXTS or ext in image_exts:
                    handle = tar.extractfile(member)
                    sample[ext] = handle.read() if handle is not None else b""
                else:
                    sample[ext] = None
    except (tarfile.TarError, OSError, EOFError) as e:
        # Samples completed before the damage were yielded; the one being read (possibly missing
        # members) and whatever followed it are lost, and counted as this one skip.
        yield Skip("corrupt_tar", f"{path}: {type(e).__name__}: {e}")
        return
    if sample:
        yield key, sample


@dataclasses.dataclass
class WebDatasetSource:
    inputs: tuple[str, ...]
    caption_field: str = "caption"
    image_exts: tuple[str, ...] = DEFAULT_IMAGE_EXTS
    split: str = "train"
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    _paths: list[str] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        check_split_name(self.split)
        check_text_limit(self.max_text_bytes)
        self.inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        self.image_exts = tuple(e.lower().lstrip(".") for e in self.image_exts)
        self.paths()  # fail now, not in a worker, when the patterns name nothing

    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = resolve_inputs(self.inputs)
        return self._paths

    def describe(self) -> str:
        return (
            f"webdataset: {list(self.inputs)} ({len(self.paths())} tar files) "
            f"caption_field={self.caption_field} image_exts={list(self.image_exts)} "
            f"max_text_bytes={self.max_text_bytes}"
        )

    def splits(self) -> tuple[str, ...]:
        return (self.split,)

    def work_units(self, split: str) -> Sequence[str]:
        return self.paths()

    def num_records(self, split: str) -> None:
        return None  # unknown until every tar is read

    def default_num_shards(self, split: str) -> int:
        return len(self.paths())  # one output shard per input tar

    def info(self) -> dict[str, Any]:
        return {"inputs": list(self.inputs), "num_tar_files": len(self.paths())}

    def read(self, split: str, units: Sequence[str]) -> Iterator[Record | Skip]:
        for path in units:
            name = os.path.basename(path)
            for item in iter_tar_samples(path, self.image_exts, self.max_text_bytes):
                if isinstance(item, Skip):
                    yield item
                else:
                    yield self._record(name, *item)

    def _record(
        self, tar_name: str, key: str, sample: dict[str, bytes | Oversized | None]
    ) -> Record | Skip:
        where = f"{tar_name}:{key}"
        oversized = [f"{e} ({v.size} bytes)" for e, v in sample.items() if isinstance(v, Oversized)]
        if oversized:
            return Skip(
                "oversized_text",
                f"{where}: {', '.join(oversized)} over max_text_bytes={self.max_text_bytes}",
            )
        image_ext = next((e for e in self.image_exts if e in sample), None)
        if image_ext is None:
            return Skip("missing_image", f"{where} has members {sorted(sample)}")
        meta: dict[str, Any] = {"tar": tar_name, "key": key}
        captions: list[str] = []
        if "txt" in sample:
            captions = clean_captions(sample["txt"])
        if "json" in sample:
            try:
                info = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return Skip("bad_json", f"{where}: {e}")
            if not isinstance(info, dict):
                return Skip("bad_json", f"{where}: not a JSON object")
            if not captions:
                captions = clean_captions(info.get(self.caption_field))
            for field in ("url", "uid", "width", "height"):
                if isinstance(info.get(field), str | int):
                    meta[field] = info[field]
        if not captions:
            return Skip("missing_caption", where)
        labels = {}
        if "cls" in sample:
            try:
                labels["class"] = int(sample["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                return Skip("invalid_label", f"{where}: cls={sample['cls'][:20]!r}")
        record_id = f"{tar_name.split('.')[0]}/{key}"
        return {
            "image": sample[image_ext],
            "captions": captions,
            "id": record_id,
            "labels": labels,
            "meta": meta,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source webdataset (tar shards; --input takes patterns)")
    group.add_argument(
        "--wds-caption-field",
        help="json field holding the caption when a sample has no .txt member (default: caption)",
    )
    group.add_argument(
        "--wds-image-exts",
        help="comma-separated image member extensions, in order "
        f"of preference (default: {','.join(DEFAULT_IMAGE_EXTS)})",
    )


ARG_DESTS = ("wds_caption_field", "wds_image_exts")


def from_args(args: argparse.Namespace) -> WebDatasetSource:
    if not args.input:
        raise ValueError("--source webdataset needs --input: tar paths, brace patterns or globs")
    exts = tuple(e for e in (args.wds_image_exts or "").split(",") if e) or DEFAULT_IMAGE_EXTS
    return WebDatasetSource(
        inputs=tuple(args.input),
        caption_field=args.wds_caption_field or "caption",
        image_exts=exts,
        split=args.split or "train",
        max_text_bytes=text_limit(args),
    )
