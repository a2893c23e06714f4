"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzip-compressed IDX files).

60,000 train and 10,000 test 28x28 grayscale images in 10 balanced classes (MIT licence, Zalando).
Records keep the native 28x28 size as PNG (the input pipeline resizes); captions are the class
name filled into every prompt template of `TEMPLATES` (all of them, in a fixed order, so a loader
can sample one or use the first); labels are `{"class": index}`.

`CLASS_NAMES`, `TEMPLATES` and `prompts()` are the same strings zero-shot evaluation should use.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxclip.data.sources.common import Record, Skip, encode_image_array, shards_for

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
TEMPLATES = (
    "a photo of {article} {name}.",
    "a black and white photo of {article} {name}.",
    "a low resolution photo of {article} {name}.",
    "a product photo of {article} {name}.",
    "a grayscale picture of {article} {name}.",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def prompt_name(class_index: int) -> str:
    """The class name as it reads inside a sentence ("T-shirt/top" -> "t-shirt/top")."""
    return CLASS_NAMES[class_index].lower()


def prompts(class_index: int) -> list[str]:
    """Every template filled with the class name, with "a"/"an" chosen to fit it."""
    name = prompt_name(class_index)
    article = "an" if name[0] in "aeiou" else "a"
    return [t.format(article=article, name=name) for t in TEMPLATES]


def read_idx(path: str, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Reads one gzip-compressed IDX file, checking its magic number, dimensions and length."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install -y {DEBIAN_PACKAGE})"
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncation raises EOFError
        raise ValueError(f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})") from e
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise ValueError(f"{path}: IDX magic number {found_magic}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != item_shape:
        raise ValueError(f"{path}: items of shape {dims[1:]}, expected {item_shape}")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes after decompression, but the header says {dims} "
            f"needs {expected} (truncated or corrupt file)"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_split(split: str, data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of "train" or "test"."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST has splits {sorted(FILES)}, not {split!r}")
    images_file, labels_file = FILES[split]
    images = read_idx(os.path.join(data_dir, images_file), _IMAGES_MAGIC, (28, 28))
    labels = read_idx(os.path.join(data_dir, labels_file), _LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} is out of range 0..9")
    return images, labels


@dataclasses.dataclass
class FashionMnistSource:
    data_dir: str = DEFAULT_DIR
    _arrays: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}  # each worker reads the ~30 MB itself (well under a second)
        return state

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            self._arrays[split] = load_split(split, self.data_dir)
        return self._arrays[split]

    def describe(self) -> str:
        return f"fashion_mnist: {os.path.abspath(self.data_dir)} (IDX, 28x28 PNG)"

    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def work_units(self, split: str) -> Sequence[int]:
        return range(len(self.arrays(split)[1]))

    def num_records(self, split: str) -> int:
        return len(self.arrays(split)[1])

    def default_num_shards(self, split: str) -> int:
        return shards_for(self.num_records(split), 5000)  # train 12, test 2

    def info(self) -> dict[str, Any]:
        return {
            "class_names": list(CLASS_NAMES),
            "templates": list(TEMPLATES),
            "image_size": [28, 28],
        }

    def read(self, split: str, units: Sequence[int]) -> Iterator[Record | Skip]:
        images, labels = self.arrays(split)
        captions = [prompts(c) for c in range(len(CLASS_NAMES))]
        for index in units:
            label = int(labels[index])
            yield {
                "image": encode_image_array(images[index]),
                "captions": captions[label],
                "id": f"{split}-{index:05d}",
                "labels": {"class": label},
                "meta": {"class_name": CLASS_NAMES[label]},
            }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source fashion_mnist (Debian dataset-fashion-mnist)")
    group.add_argument(
        "--fashion-mnist-dir", help=f"directory of the IDX files (default: {DEFAULT_DIR})"
    )


ARG_DESTS = ("fashion_mnist_dir",)


def from_args(args: argparse.Namespace) -> FashionMnistSource:
    if args.input or args.split:
        raise ValueError(
            "--source fashion_mnist has fixed train/test splits; it takes no "
            "--input/--split (use --fashion-mnist-dir for another location)"
        )
    return FashionMnistSource(data_dir=args.fashion_mnist_dir or DEFAULT_DIR)
