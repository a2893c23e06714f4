"""Built-in datasets that are generated or converted into a local cache on first use.

`data.train.dataset = "shapes"` (or an eval's `dataset`) resolves here to a directory of jaxclip
records under the cache (`data.cache_dir`, else $JAXCLIP_CACHE, else ~/.cache/jaxclip). A build
runs once per cache: it writes into a temporary directory and renames it into place, under a file
lock, so concurrent processes (pytest workers, several hosts on one machine) neither race nor see
a half-written dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable

from jaxclip.data import records, shapes

_BUILDERS: dict[str, Callable[[str], None]] = {
    # name -> fn(directory) that writes the dataset into `directory`
    f"shapes-v{shapes.VERSION}": lambda d: shapes.build(d, train=40000, val=1000, novel=1000),
    f"shapes-small-v{shapes.VERSION}": lambda d: shapes.build(d, train=2000, val=256, novel=256),
}
_ALIASES = {
    "shapes": f"shapes-v{shapes.VERSION}",
    "shapes_small": f"shapes-small-v{shapes.VERSION}",
}


def register(name: str, builder: Callable[[str], None]) -> None:
    _BUILDERS[name] = builder


def names() -> list[str]:
    return sorted(set(_BUILDERS) | set(_ALIASES))


def cache_root(cache_dir: str = "") -> str:
    return os.path.expanduser(cache_dir or os.environ.get("JAXCLIP_CACHE", "~/.cache/jaxclip"))


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(name: str, cache_dir: str = "") -> str:
    """The directory of built-in dataset `name`, building it first if needed."""
    key = _ALIASES.get(name, name)
    if key not in _BUILDERS:
        raise ValueError(f"{name!r} is neither a dataset directory nor a built-in dataset "
                         f"({', '.join(names())})")
    root = os.path.join(cache_root(cache_dir), "datasets")
    final = os.path.join(root, key)
    if os.path.exists(os.path.join(final, records.MANIFEST)):
        return final
    with _locked(os.path.join(root, f".{key}.lock")):
        if os.path.exists(os.path.join(final, records.MANIFEST)):  # built while we waited
            return final
        tmp = final + ".partial"
        # A partial directory from a killed build is reused: finished shards are kept.
        _BUILDERS[key](tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final
