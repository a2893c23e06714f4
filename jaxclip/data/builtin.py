"""Built-in datasets that are generated or converted into a local cache on first use.

`data.train.dataset = "shapes"` (or an evaluator's `dataset`) resolves here to a directory of
jaxclip records under the cache root (`data.cache_dir`, else $JAXCLIP_CACHE, else
~/.cache/jaxclip). Building goes through `jaxclip.data.build.ensure_dataset`: the directory name
carries a hash of the source's settings, concurrent callers wait on a lock and build once, and an
interrupted build resumes.

    shapes         procedural demo set: 40k train, 1k val, 1k novel (about 25 s to build)
    shapes_small   the same at 2,000 / 256 / 256, for tests and smoke runs
    fashion_mnist  Debian dataset-fashion-mnist: 60k train / 10k test, class-prompt captions
    emoji          Debian fonts-noto-color-emoji + unicode-data: 64 px renders, CLDR names
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxclip.data import build
from jaxclip.data.sources.shapes import ShapesSource

_BUILTINS: dict[str, Callable[[str], str]] = {
    # name -> fn(cache root) -> dataset directory
    "shapes": lambda root: build.ensure_dataset(ShapesSource(), root, "shapes",
                                                workers=os.cpu_count() or 1),
    "shapes_small": lambda root: build.ensure_dataset(
        ShapesSource(train=2000, val=256, novel=256), root, "shapes_small"),
    "fashion_mnist": lambda root: build.ensure_fashion_mnist(root, workers=os.cpu_count() or 1),
    "emoji": lambda root: build.ensure_emoji(root, workers=os.cpu_count() or 1),
}


def names() -> list[str]:
    return sorted(_BUILTINS)


def cache_root(cache_dir: str = "") -> str:
    root = cache_dir or os.environ.get("JAXCLIP_CACHE", "~/.cache/jaxclip")
    return os.path.join(os.path.expanduser(root), "datasets")


def ensure(name: str, cache_dir: str = "") -> str:
    """The directory of built-in dataset `name`, building it first if needed."""
    if name not in _BUILTINS:
        raise ValueError(f"{name!r} is neither a dataset directory nor a built-in dataset "
                         f"({', '.join(names())})")
    root = cache_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    return _BUILTINS[name](root)
