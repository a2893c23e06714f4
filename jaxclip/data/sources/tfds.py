"""A prepared TensorFlow Datasets dataset, read with `tfds.data_source` (no TensorFlow needed).

The dataset must already be on disk in `array_record` format under `data_dir` (nothing is
downloaded or generated here: generating most tfds datasets needs TensorFlow). Feature keys are
paths into the example dict, so `coco_captions` is read with
`image_key="image", caption_key="captions/text"`.

Image features are read undecoded (`tfds.decode.SkipDecoding`), so the original JPEG/PNG bytes
are kept as they are; images stored as plain uint8 tensors are encoded to PNG (or JPEG). Record
indices are the units of work, so shards are contiguous index ranges of the tfds split.

tensorflow-datasets is an optional dependency (`pip install 'jaxclip[tfds]'`), imported only when
a tfds source is used.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxclip.data.sources.common import (
    Record,
    Skip,
    check_split_name,
    clean_captions,
    encode_image_array,
    shards_for,
)


def import_tfds():
    """Imports tensorflow_datasets, or explains how to install it."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError(
            "the tfds source needs tensorflow-datasets (TensorFlow itself is not needed): "
            "pip install 'jaxclip[tfds]'  (or: pip install tensorflow-datasets importlib_resources)"
        ) from e
    return tensorflow_datasets


def parse_split_spec(spec: str) -> tuple[str, str]:
    """`train` -> (train, train); `val=validation[:10%]` -> (val, validation[:10%])."""
    name, eq, tfds_split = spec.partition("=")
    if not eq:
        name, tfds_split = spec, spec
    name, tfds_split = name.strip(), tfds_split.strip()
    try:
        check_split_name(name)
    except ValueError as e:
        raise ValueError(f"{e}; name sliced tfds splits as OUT=SPEC, e.g. 'val=train[:5%]'") from e
    if not tfds_split:
        raise ValueError(f"empty tfds split in {spec!r}")
    return name, tfds_split


def _lookup(example: dict[str, Any], path: str) -> Any:
    value: Any = example
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _nest(path: str, leaf: Any) -> dict[str, Any]:
    """`a/b`, x -> {"a": {"b": x}}: the shape tfds expects for per-feature decoders."""
    parts = path.split("/")
    tree: Any = leaf
    for part in reversed(parts):
        tree = {part: tree}
    return tree


def _feature(features: Any, path: str) -> Any:
    feature = features
    for part in path.split("/"):
        # Sequence features hold their sub-features in `.feature`; FeaturesDict is a mapping.
        feature = getattr(feature, "feature", feature)
        try:
            feature = feature[part]
        except (KeyError, TypeError):
            return None
    return feature


@dataclasses.dataclass
class TfdsSource:
    name: str
    splits_spec: tuple[str, ...] = ("train",)  # each "split" or "out_name=tfds_split"
    data_dir: str | None = None
    image_key: str = "image"
    caption_key: str = "caption"
    label_keys: tuple[str, ...] = ()
    id_key: str | None = None
    array_format: str = "png"  # how images stored as uint8 tensors are encoded
    _sources: dict[str, Any] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if isinstance(self.splits_spec, str):
            self.splits_spec = (self.splits_spec,)
        self.splits_spec = tuple(self.splits_spec)
        self.label_keys = tuple(self.label_keys)
        self._split_map = dict(parse_split_spec(s) for s in self.splits_spec)
        if len(self._split_map) != len(self.splits_spec):
            raise ValueError(f"duplicate output split names in {list(self.splits_spec)}")
        if self.array_format not in ("png", "jpeg"):
            raise ValueError(f"array_format must be 'png' or 'jpeg', got {self.array_format!r}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_sources"] = {}  # open readers stay in the process that opened them
        return state

    def data_source(self, split: str):
        """The tfds data source for output split `split`, opened once per process."""
        if split not in self._sources:
            self._sources[split] = self._open(split)
        return self._sources[split]

    def _open(self, split: str):
        tfds = import_tfds()
        tfds_split = self._split_map[split]
        kwargs = {"split": tfds_split, "data_dir": self.data_dir, "download": False}
        try:
            plain = tfds.data_source(self.name, **kwargs)
        except ModuleNotFoundError as e:
            if e.name == "importlib_resources":
                raise ImportError(
                    "tensorflow-datasets needs importlib_resources here: "
                    "pip install importlib_resources"
                ) from e
            raise
        except Exception as e:  # tfds raises assorted types for "not prepared"
            # Only the first line: tfds appends the names of every dataset it knows.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FileNotFoundError(
                f"cannot open tfds dataset {self.name!r} split {tfds_split!r} in data_dir "
                f"{self.data_dir!r} ({type(e).__name__}: {reason}). It must be prepared "
                "beforehand in array_record format (file_format='array_record'); nothing is "
                "downloaded here."
            ) from e
        features = plain.dataset_info.features
        for key in (self.image_key, self.caption_key, *self.label_keys, self.id_key):
            if key and _feature(features, key) is None:
                raise KeyError(
                    f"tfds dataset {self.name!r} has no feature {key!r}; "
                    f"its features are:\n{features}"
                )
        if type(_feature(features, self.image_key)).__name__ == "Image":
            # Keep the stored JPEG/PNG bytes instead of decoding and re-encoding them.
            decoders = _nest(self.image_key, tfds.decode.SkipDecoding())
            return tfds.data_source(self.name, decoders=decoders, **kwargs)
        return plain

    def describe(self) -> str:
        return (
            f"tfds: {self.name} splits={list(self.splits_spec)} data_dir={self.data_dir} "
            f"image_key={self.image_key} caption_key={self.caption_key} "
            f"label_keys={list(self.label_keys)} id_key={self.id_key}"
        )

    def splits(self) -> tuple[str, ...]:
        return tuple(self._split_map)

    def work_units(self, split: str) -> Sequence[int]:
        return range(len(self.data_source(split)))

    def num_records(self, split: str) -> int:
        return len(self.data_source(split))

    def default_num_shards(self, split: str) -> int:
        return shards_for(len(self.data_source(split)))

    def info(self) -> dict[str, Any]:
        return {"tfds_name": self.name, "tfds_splits": dict(self._split_map)}

    def read(self, split: str, units: Sequence[int]) -> Iterator[Record | Skip]:
        source = self.data_source(split)
        for index in units:
            try:
                example = source[index]
            except Exception as e:  # a damaged record surfaces as whatever the parser raises
                yield Skip("unreadable_record", f"{self.name} {split}[{index}]: {e}")
                continue
            yield self._record(split, index, example)

    def _record(self, split: str, index: int, example: dict[str, Any]) -> Record | Skip:
        where = f"{self.name} {split}[{index}]"
        image = _lookup(example, self.image_key)
        if isinstance(image, np.ndarray):
            try:
                image = encode_image_array(image, self.array_format)
            except ValueError as e:
                return Skip("unsupported_image_array", f"{where}: {e}")
        if not isinstance(image, bytes) or not image:
            return Skip("missing_image", where)
        captions = clean_captions(_lookup(example, self.caption_key))
        if not captions:
            return Skip("missing_caption", where)
        labels = {}
        for key in self.label_keys:
            value = np.asarray(_lookup(example, key))
            if value.shape != () or not np.issubdtype(value.dtype, np.integer):
                return Skip("invalid_label", f"{where}: {key} is not a scalar integer")
            labels[key.replace("/", ".")] = int(value)
        if self.id_key:
            raw = _lookup(example, self.id_key)
            raw = raw.item() if isinstance(raw, np.generic | np.ndarray) else raw
            record_id = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        else:
            record_id = f"{split}-{index}"
        return {
            "image": image,
            "captions": captions,
            "id": record_id,
            "labels": labels,
            "meta": {"tfds_index": index},
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source tfds (a prepared array_record tfds dataset)")
    group.add_argument(
        "--tfds-name", help="dataset name, e.g. coco_captions or coco_captions:1.1.0"
    )
    group.add_argument(
        "--tfds-split",
        help="comma-separated splits, each SPLIT or OUT=SPEC "
        "(e.g. 'train,val=validation[:50%%]'; default: train)",
    )
    group.add_argument(
        "--tfds-data-dir", help="tfds data_dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    group.add_argument("--tfds-image-key", help="image feature path (default: image)")
    group.add_argument(
        "--tfds-caption-key",
        help="caption feature path (default: caption; captions/text for coco_captions)",
    )
    group.add_argument("--tfds-label-keys", help="comma-separated integer label feature paths")
    group.add_argument("--tfds-id-key", help="feature path used as record id (default: index)")


ARG_DESTS = (
    "tfds_name",
    "tfds_split",
    "tfds_data_dir",
    "tfds_image_key",
    "tfds_caption_key",
    "tfds_label_keys",
    "tfds_id_key",
)


def from_args(args: argparse.Namespace) -> TfdsSource:
    if not args.tfds_name:
        raise ValueError("--source tfds needs --tfds-name")
    if args.input or args.split:
        raise ValueError("--source tfds takes --tfds-name/--tfds-split, not --input/--split")
    return TfdsSource(
        name=args.tfds_name,
        splits_spec=tuple(s for s in (args.tfds_split or "train").split(",") if s),
        data_dir=args.tfds_data_dir,
        image_key=args.tfds_image_key or "image",
        caption_key=args.tfds_caption_key or "caption",
        label_keys=tuple(k for k in (args.tfds_label_keys or "").split(",") if k),
        id_key=args.tfds_id_key,
    )
