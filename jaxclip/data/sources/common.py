"""What every source shares: the `Source` protocol, the `Skip` marker and small image helpers.

A source turns some external dataset into jaxclip record dicts (see `jaxclip.data.records`):

    {"image": bytes, "captions": [str, ...], "id": str, "labels": {str: int}, "meta": {...}}

The builder (`jaxclip.data.build`) shards a source deterministically without knowing its format:
`work_units(split)` lists the units of work in a fixed order (record indices as a `range`, or
input files), the builder gives each output shard a contiguous slice of them, and a worker process
calls `read(split, units)` on its slice. Sources are plain dataclasses holding only configuration,
so they pickle cheaply into worker processes; anything loaded from disk is cached lazily per
process and left out of the pickle.

A bad input item (missing file, no caption, corrupt archive member) is not an exception: `read`
yields a `Skip` naming the reason, the builder counts it and carries on. Exceptions are kept for
problems with the whole input (a missing annotation file, a column name that does not exist).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Record = dict[str, Any]

# Caption and metadata text larger than this is skipped (reason "oversized_text"), not read: real
# captions are well under a kilobyte, and one runaway member (a 200 MB .txt) would otherwise cost
# its size several times over in memory, then sit in a record that every epoch decodes.
DEFAULT_MAX_TEXT_BYTES = 1_000_000


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input item that could not become a record; `reason` is a short counter key."""

    reason: str
    detail: str = ""


@runtime_checkable
class Source(Protocol):
    """The interface the builder needs; each module in this package provides one dataclass."""

    def describe(self) -> str:
        """One line naming the source and its settings, stored in the manifest."""
        ...

    def splits(self) -> tuple[str, ...]:
        """The output splits this source produces, e.g. ("train", "test")."""
        ...

    def work_units(self, split: str) -> Sequence[Any]:
        """The split's units of work in a fixed order; slices of it are passed to `read`."""
        ...

    def num_records(self, split: str) -> int | None:
        """The number of input items in `split` when known without reading them, else None."""
        ...

    def default_num_shards(self, split: str) -> int:
        """A sensible shard count when the user gives none."""
        ...

    def info(self) -> dict[str, Any]:
        """JSON-compatible facts for the manifest (class names, split sizes, ...)."""
        ...

    def read(self, split: str, units: Sequence[Any]) -> Iterator[Record | Skip]:
        """Yields one record dict or `Skip` per input item of `units`, in order."""
        ...


def iter_source_records(source: Source, split: str) -> Iterator[Record]:
    """All records of `split` in order, dropping skipped items (for tools and quick looks)."""
    for item in source.read(split, source.work_units(split)):
        if not isinstance(item, Skip):
            yield item


def shards_for(num_items: int, per_shard: int = 10_000) -> int:
    """The default shard count for an indexed source: about `per_shard` records each."""
    return max(1, -(-num_items // per_shard))


def encode_image_array(array: np.ndarray, image_format: str = "png", quality: int = 90) -> bytes:
    """Encodes an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array as PNG or JPEG bytes."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be (H, W[, 1|3|4]), got shape {array.shape}")
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        if image.mode == "RGBA":
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {image_format!r}; use 'png' or 'jpeg'")
    return buffer.getvalue()


def clean_captions(value: Any) -> list[str]:
    """Normalises a caption field (str, bytes, or a list/array of them) to non-empty stripped str.

    Returns an empty list when there is no usable caption; the caller turns that into a Skip.
    """
    if value is None:
        return []
    if isinstance(value, str | bytes):
        items = [value]
    elif isinstance(value, np.ndarray):
        items = value.reshape(-1).tolist()
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return []
    captions = []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                continue
        if isinstance(item, str) and item.strip():
            captions.append(item.strip())
    return captions


def check_text_limit(max_text_bytes: int) -> None:
    if not isinstance(max_text_bytes, int) or max_text_bytes < 1:
        raise ValueError(f"max_text_bytes must be a positive integer, got {max_text_bytes!r}")


def text_limit(args) -> int:
    """--max-text-bytes of `jaxclip data build`, or the default when the parser has no such flag."""
    value = getattr(args, "max_text_bytes", None)
    return DEFAULT_MAX_TEXT_BYTES if value is None else value


def check_split_name(split: str) -> str:
    """Split names become file name prefixes, so keep them to letters, digits, '_' and '-'."""
    if not split or not all(c.isalnum() or c in "_-" for c in split):
        raise ValueError(
            f"invalid split name {split!r}: use letters, digits, '_' or '-' (e.g. 'train')"
        )
    return split
