"""The built-in demo dataset: procedurally drawn shapes with compositional captions.

Each image holds two objects, each with a size, a colour and a shape, in a spatial relation:
"a large red circle above a small blue square". It is a `Source` like any converter, so the demo
builds it into the cache on first use and then streams it like real data.

Splits (all generated from fixed seeds, so a cache is reproducible):
  train  objects never use a held-out colour-shape pair (`HELD_OUT`);
  val    unseen images of seen attribute combinations, unique captions;
  novel  every image contains at least one held-out colour-shape pair never seen in training,
         unique captions: retrieval here measures compositional generalisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxclip.data.sources.common import Record, Skip, shards_for

VERSION = 1
SIZES = ("small", "large")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
RELATIONS = ("above", "below", "to the left of", "to the right of")
# Colour-shape pairs that never occur in training (one per shape, spread over the colours).
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "cross"),
                      ("yellow", "diamond"), ("purple", "square"), ("cyan", "circle")})

_RADIUS = {"small": 5.5, "large": 10.0}


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    return yy, xx


def _mask(shape: str, cy: float, cx: float, r: float, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1.15 * r
    if shape == "cross":
        w = 0.35 * r
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    # triangle, apex up: inside if below the two slanted edges and above the base
    return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))


def _place(rng: np.random.Generator, rel: str, r1: float, r2: float, n: int):
    """Centres (y, x) for object 1 and object 2 such that `object 1 <rel> object 2` holds clearly.

    Sampled directly in the valid region: along the relation's axis the leading object comes first
    with a clear gap, and the offset across that axis stays under 0.6 x the offset along it.
    """
    swap = rel in ("below", "to the right of")  # object 1 is the trailing one along the axis
    ra, rb = (r2, r1) if swap else (r1, r2)
    lo_a, hi_a, lo_b, hi_b = ra + 1, n - ra - 1, rb + 1, n - rb - 1
    gap = ra + rb + 2
    a_lead = rng.uniform(lo_a, min(hi_a, hi_b - gap))
    a_trail = rng.uniform(a_lead + gap, hi_b)
    spread = 0.6 * (a_trail - a_lead)
    b_lead = rng.uniform(lo_a, hi_a)
    b_trail = np.clip(b_lead + rng.uniform(-spread, spread), lo_b, hi_b)
    lead, trail = np.array([a_lead, b_lead]), np.array([a_trail, b_trail])
    if rel in ("to the left of", "to the right of"):  # the axis is x, not y
        lead, trail = lead[::-1], trail[::-1]
    return (trail, lead) if swap else (lead, trail)


def _sample_object(rng, allowed_pair) -> tuple[str, str, str]:
    while True:
        obj = (SIZES[rng.integers(2)], list(COLORS)[rng.integers(len(COLORS))],
               SHAPES[rng.integers(len(SHAPES))])
        if allowed_pair((obj[1], obj[2])):
            return obj


def render(objects, rel: str, rng: np.random.Generator, n: int) -> np.ndarray:
    img = 30 + 6 * rng.standard_normal((n, n, 3), dtype=np.float32)
    (s1, col1, sh1), (s2, col2, sh2) = objects
    c1, c2 = _place(rng, rel, _RADIUS[s1], _RADIUS[s2], n)
    for (size, color, shape), (cy, cx) in (((s1, col1, sh1), c1), ((s2, col2, sh2), c2)):
        jitter = rng.normal(0, 12, 3)
        img[_mask(shape, cy, cx, _RADIUS[size], n)] = np.asarray(COLORS[color]) + jitter
    return np.clip(img, 0, 255).astype(np.uint8)


def caption(objects, rel: str) -> str:
    (s1, c1, h1), (s2, c2, h2) = objects
    return f"a {s1} {c1} {h1} {rel} a {s2} {c2} {h2}"


def _canonical(objects, rel: str) -> str:
    """The same scene described either way round ("A above B" is "B below A") gets one key."""
    flip = {"below": "above", "to the right of": "to the left of"}
    if rel in flip:
        return caption(objects[::-1], flip[rel])
    return caption(objects, rel)


def _record(split: str, index: int, objs, rel: str, rng, image_size: int) -> Record:
    buf = io.BytesIO()
    Image.fromarray(render(objs, rel, rng, image_size)).save(buf, format="JPEG", quality=92)
    return {
        "image": buf.getvalue(),
        "captions": [caption(objs, rel)],
        "id": f"{split}-{index:06d}",
        "labels": {"relation": RELATIONS.index(rel)},
        "meta": {"objects": [list(o) for o in objs], "relation": rel},
    }


def train_record(index: int, seed: int, image_size: int = 64) -> Record:
    """Training record `index`: a function of (index, seed) alone, so shards build in parallel."""
    rng = np.random.default_rng([seed, 0, VERSION, index])
    objs = [_sample_object(rng, lambda p: p not in HELD_OUT) for _ in range(2)]
    rel = RELATIONS[rng.integers(len(RELATIONS))]
    return _record("train", index, objs, rel, rng, image_size)


def eval_records(split: str, count: int, seed: int, image_size: int = 64) -> Iterator[Record]:
    """The `val` or `novel` split: drawn in sequence, skipping scenes already drawn."""
    rng = np.random.default_rng([seed, {"val": 1, "novel": 2}[split], VERSION])
    seen: set[str] = set()
    i = 0
    while i < count:
        if split == "novel":
            held = sorted(HELD_OUT)
            objs = [_sample_object(rng, lambda p: p not in HELD_OUT)]
            objs.insert(int(rng.integers(2)), (SIZES[rng.integers(2)],
                                               *held[rng.integers(len(held))]))
        else:
            objs = [_sample_object(rng, lambda p: p not in HELD_OUT) for _ in range(2)]
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        key = _canonical(objs, rel)
        if key in seen:  # unique scenes keep retrieval unambiguous
            continue
        seen.add(key)
        yield _record(split, i, objs, rel, rng, image_size)
        i += 1


@dataclasses.dataclass(frozen=True)
class ShapesSource:
    train: int = 40000
    val: int = 1000
    novel: int = 1000
    seed: int = 0
    image_size: int = 64

    def describe(self) -> str:
        return (f"shapes v{VERSION} (procedural): train={self.train} val={self.val} "
                f"novel={self.novel} seed={self.seed} image_size={self.image_size}")

    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "novel")

    def work_units(self, split: str) -> Sequence[Any]:
        # Evaluation splits are one unit: uniqueness of scenes needs them drawn in sequence.
        return range(self.train) if split == "train" else [split]

    def num_records(self, split: str) -> int:
        return getattr(self, split)

    def default_num_shards(self, split: str) -> int:
        return shards_for(self.train) if split == "train" else 1

    def info(self) -> dict[str, Any]:
        return {"held_out_pairs": sorted(map(list, HELD_OUT)), "image_size": self.image_size,
                "relations": list(RELATIONS)}

    def read(self, split: str, units: Sequence[Any]) -> Iterator[Record | Skip]:
        if split == "train":
            for index in units:
                yield train_record(index, self.seed, self.image_size)
        else:
            for _ in units:
                yield from eval_records(split, getattr(self, split), self.seed, self.image_size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--source shapes (procedural demo data)")
    group.add_argument("--shapes-train", type=int, help="training records (default 40000)")
    group.add_argument("--shapes-eval", type=int, help="records of val and of novel (default 1000)")
    group.add_argument("--shapes-seed", type=int, help="generator seed (default 0)")
    group.add_argument("--shapes-image-size", type=int, help="image side in pixels (default 64)")


ARG_DESTS = ("shapes_train", "shapes_eval", "shapes_seed", "shapes_image_size")


def from_args(args: argparse.Namespace) -> ShapesSource:
    if args.input or args.split:
        raise ValueError("--source shapes generates its own train/val/novel splits; it takes no "
                         "--input/--split")
    d = ShapesSource()
    n_eval = args.shapes_eval if args.shapes_eval is not None else d.val
    return ShapesSource(
        train=d.train if args.shapes_train is None else args.shapes_train, val=n_eval,
        novel=n_eval, seed=d.seed if args.shapes_seed is None else args.shapes_seed,
        image_size=d.image_size if args.shapes_image_size is None else args.shapes_image_size)
