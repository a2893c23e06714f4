"""Built-in datasets, the one registry of them: generated or converted into a local cache on use.

`data.train.dataset = "shapes"` (or an evaluator's `dataset`) resolves here (`dataset_dir`) to a
directory of jaxclip records under the cache root (`data.cache_dir`, else $JAXCLIP_CACHE, else
~/.cache/jaxclip). Building goes through `jaxclip.data.build.ensure_dataset`: the directory name
carries a hash of the source's settings, concurrent callers wait on a lock and build once, and an
interrupted build resumes.

    shapes         procedural demo set: 40k train, 1k val, 1k novel (about 25 s to build)
    shapes_small   the same at 2,000 / 256 / 256, for tests and smoke runs
    fashion_mnist  Debian dataset-fashion-mnist: 60k train / 10k test, class-prompt captions
    emoji          Debian fonts-noto-color-emoji + unicode-data: 64 px renders, CLDR names
    emoji_captions the same with four phrasings of each name (several captions per image)

A new built-in dataset is a `Source` (a module in `jaxclip.data.sources`) plus one `BUILTINS`
entry here; a config then names it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

from jaxclip.data import build
from jaxclip.data.sources import Source
from jaxclip.data.sources.emoji import EmojiSource
from jaxclip.data.sources.fashion_mnist import FashionMnistSource
from jaxclip.data.sources.shapes import ShapesSource


@dataclasses.dataclass(frozen=True)
class Builtin:
    """How to make a built-in dataset: its source, and how that is sharded and cached."""

    make_source: Callable[..., Source]  # takes optional source settings (tests: a data_dir)
    num_shards: dict[str, int] | None = None  # per split; None lets the source choose
    # Prefix of the cache directory; empty: the registry name. Renaming it orphans old caches.
    cache_name: str = ""
    # Build with a process per CPU. Off for small sets, where starting the processes (each
    # imports jaxclip) takes longer than the build itself.
    parallel: bool = True


BUILTINS: dict[str, Builtin] = {
    "shapes": Builtin(ShapesSource),
    "shapes_small": Builtin(
        functools.partial(ShapesSource, train=2000, val=256, novel=256), parallel=False),
    "fashion_mnist": Builtin(FashionMnistSource, num_shards={"train": 12, "test": 2}),
    "emoji": Builtin(EmojiSource, num_shards={"train": 4, "eval": 2}, cache_name="emoji64"),
    "emoji_captions": Builtin(functools.partial(EmojiSource, captions="templates"),
                              num_shards={"train": 4, "eval": 2}, cache_name="emoji64_captions"),
}


def names() -> list[str]:
    return sorted(BUILTINS)


def cache_root(cache_dir: str = "") -> str:
    root = cache_dir or os.environ.get("JAXCLIP_CACHE", "~/.cache/jaxclip")
    return os.path.join(os.path.expanduser(root), "datasets")


def _entry(name: str) -> Builtin:
    if name not in BUILTINS:
        raise ValueError(f"{name!r} is neither a dataset directory nor a built-in dataset "
                         f"({', '.join(names())})")
    return BUILTINS[name]


def ensure_in(name: str, root: str, *, workers: int | None = None, progress: bool = False,
              **source_settings) -> str:
    """The directory of built-in dataset `name` under the dataset cache `root`, built first if
    needed; `source_settings` go to its source (a changed setting builds a separate cache)."""
    entry = _entry(name)
    if workers is None:
        workers = (os.cpu_count() or 1) if entry.parallel else 1
    return build.ensure_dataset(
        entry.make_source(**source_settings), root, entry.cache_name or name,
        num_shards=entry.num_shards, workers=workers, progress=progress)


def ensure(name: str, cache_dir: str = "") -> str:
    """The directory of built-in dataset `name`, building it first if needed."""
    _entry(name)  # an unknown name fails before the cache root is created
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    return ensure_in(name, root)


def dataset_dir(name_or_path: str, cache_dir: str = "") -> str:
    """A dataset directory: an existing path, or a built-in dataset built into the cache."""
    if not name_or_path:
        raise ValueError("config data.train.dataset is empty: set a dataset directory or a "
                         "built-in name (shapes, fashion_mnist, emoji)")
    if os.path.isdir(name_or_path):
        return name_or_path
    return ensure(name_or_path, cache_dir)
