"""The built-in demo dataset: procedurally drawn shapes with compositional captions.

Each image holds two objects, each with a size, a colour and a shape, in a spatial relation:
"a large red circle above a small blue square". The set is written once as jaxclip records into a
cache directory and then streamed like any real dataset, so the demo exercises the whole pipeline.

Splits (all generated from fixed seeds, so a cache is reproducible):
  train  objects never use a held-out colour-shape pair (`HELD_OUT`);
  val    unseen images of seen attribute combinations, unique captions;
  novel  every image contains at least one held-out colour-shape pair never seen in training,
         unique captions: retrieval here measures compositional generalisation.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image

from jaxclip.data import records

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


def generate(split: str, count: int, seed: int, image_size: int = 64):
    """Yields `count` records of `split`; deterministic in (split, seed)."""
    split_seed = {"train": 0, "val": 1, "novel": 2}[split]
    rng = np.random.default_rng([seed, split_seed, VERSION])
    seen_captions: set[str] = set()
    i = 0
    while i < count:
        if split == "novel":
            held = sorted(HELD_OUT)
            objs = [_sample_object(rng, lambda p: p not in HELD_OUT)]
            size = SIZES[rng.integers(2)]
            objs.insert(int(rng.integers(2)), (size, *held[rng.integers(len(held))]))
        else:
            objs = [_sample_object(rng, lambda p: p not in HELD_OUT) for _ in range(2)]
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        text = caption(objs, rel)
        if split != "train":  # unique scenes keep retrieval unambiguous
            key = _canonical(objs, rel)
            if key in seen_captions:
                continue
            seen_captions.add(key)
        buf = io.BytesIO()
        Image.fromarray(render(objs, rel, rng, image_size)).save(buf, format="JPEG", quality=92)
        yield {
            "image": buf.getvalue(),
            "captions": [text],
            "id": f"{split}-{i:06d}",
            "labels": {"relation": RELATIONS.index(rel)},
            "meta": {"objects": [list(o) for o in objs], "relation": rel},
        }
        i += 1


def build(directory: str, *, train: int = 60000, val: int = 1000, novel: int = 1000,
          seed: int = 0, image_size: int = 64, shard_size: int = 10000) -> str:
    """Writes the dataset (skipping shards that exist) and its manifest; returns `directory`."""
    os.makedirs(directory, exist_ok=True)
    splits = {}
    for split, count in (("train", train), ("val", val), ("novel", novel)):
        n_shards = max(1, -(-count // shard_size))
        stream = generate(split, count, seed, image_size)
        shards = []
        for k in range(n_shards):
            name = records.shard_name(split, k, n_shards)
            path = os.path.join(directory, name)
            size = min(shard_size, count - k * shard_size)
            chunk = (next(stream) for _ in range(size))
            if os.path.exists(path):  # finished by an earlier run; advance the generator past it
                for _ in chunk:
                    pass
            else:
                records.write_shard(path, chunk)
            shards.append({"file": name, "count": size})
        splits[split] = {"num_records": count, "shards": shards}
    records.write_manifest(directory, records.Manifest(
        splits=splits, source=f"jaxclip.data.shapes v{VERSION} (procedural)",
        build_command=f"shapes.build(train={train}, val={val}, novel={novel}, seed={seed}, "
                      f"image_size={image_size})",
        info={"held_out_pairs": sorted(map(list, HELD_OUT)), "image_size": image_size}))
    return directory
