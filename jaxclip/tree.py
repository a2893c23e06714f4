"""Nested-dict parameter trees addressed by slash paths ("image/blocks/attn/query/kernel").

Parameters travel through the trainer, the optimizer and checkpoints as plain nested dicts of
arrays (`nnx.to_pure_dict` of the model state). Paths are what regex rules (frozen parameters,
learning-rate multipliers, weight-decay exclusions) and the interop name mappings match against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: dict) -> dict:
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def split(tree: dict, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose path satisfies predicate, the rest), both as nested dicts."""
    flat = flatten(tree)
    yes = {p: v for p, v in flat.items() if predicate(p)}
    no = {p: v for p, v in flat.items() if not predicate(p)}
    return unflatten(yes), unflatten(no)


def merge(*trees: dict) -> dict:
    flat: dict[str, Any] = {}
    for t in trees:
        flat.update(flatten(t))
    return unflatten(flat)
