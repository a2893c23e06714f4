"""Input-pipeline throughput against the raw JPEG decode rate of the same images, in one run.

Builds a realistic shard in a temporary directory: N JPEG images of about 256 px on the short
side (smooth random colour fields with texture, quality 90: 15-40 KB, like web photos after
resizing) with 8-24-word captions, in jaxclip's record format. Then measures, on the same bytes:

  raw decode   a full decode to RGB with Pillow and with OpenCV (both libjpeg-turbo), pinned to
               one core; the faster of the two is the reference (what the CPU can do)
  pipeline     jaxclip's training pipeline (`pipeline.train_batches`): record decode, JPEG decode,
               random-resized crop to --image-size, caption choice, CLIP BPE tokenisation and
               batching into uint8 host batches, with 0 workers (one loader thread, pinned to
               one core: the per-core rate) and then with 1, 2, ... worker processes (scaling)

and prints images/s and the ratio pipeline / raw decode (the faster one). Normalisation to float
is not a host cost: images leave the host as uint8 and are normalised on the device inside the
train step.

    python tools/bench_data.py                        # 2,048 images, 224 px crops
    python tools/bench_data.py --images 4096 --workers 1 2 4 --json out.json
    python tools/bench_data.py --short-side 512 --images 1024    # web-size photos
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

WORDS = ("a", "photo", "of", "the", "small", "large", "red", "green", "blue", "dog", "cat",
         "tree", "house", "street", "car", "on", "in", "near", "with", "at", "night", "morning",
         "old", "new", "river", "mountain", "beach", "city", "people", "two", "three", "bright",
         "dark", "wooden", "glass", "sitting", "standing", "view", "close", "up", "field", "sky",
         "clouds")


def synthetic_jpeg(rng: np.random.Generator, short_side: int = 256) -> bytes:
    """A photo-like JPEG: low-frequency colour field + mid-frequency detail + sensor noise."""
    long_side = int(short_side * rng.uniform(1.0, 1.5))
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), np.float32)
    detail = rng.uniform(-40, 40, (h // 8, w // 8, 1)).astype(np.float32)
    img += np.asarray(Image.fromarray(detail[..., 0], mode="F").resize((w, h), Image.BILINEAR)
                      )[..., None]
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_shard(directory: str, n: int, seed: int = 0, short_side: int = 256) -> list[bytes]:
    from jaxclip.data import records

    rng = np.random.default_rng(seed)
    jpegs = [synthetic_jpeg(rng, short_side) for _ in range(n)]
    recs = [{"image": jpg, "id": f"img-{i:06d}", "labels": {}, "meta": {},
             "captions": [" ".join(rng.choice(WORDS, int(rng.integers(8, 25))))
                          for _ in range(int(rng.integers(1, 4)))]}
            for i, jpg in enumerate(jpegs)]
    name = records.shard_name("train", 0, 1)
    records.write_shard(os.path.join(directory, name), recs)
    records.write_manifest(directory, records.Manifest(
        splits={"train": {"num_records": n, "shards": [{"file": name, "count": n}]}},
        source="tools/bench_data.py synthetic JPEGs"))
    return jpegs


def raw_decode_rate(jpegs: list[bytes], seconds: float, library: str) -> float:
    """Images/s of a full decode to RGB on one core, repeating the set to fill `seconds`."""
    import cv2

    def decode(data):
        if library == "opencv":
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        else:
            Image.open(io.BytesIO(data)).convert("RGB").load()

    cv2.setNumThreads(1)
    done, start = 0, time.perf_counter()
    while True:
        for data in jpegs:
            decode(data)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def pipeline_rate(directory: str, workers: int, batch: int, image_size: int,
                  seconds: float) -> float:
    from jaxclip.data import pipeline
    from jaxclip.tokenizer import ClipTokenizer

    transform = pipeline.ElementTransform(image_size=image_size, augment="rrc", seed=0)
    batches = pipeline.train_batches(
        [(directory, "train", 1.0)], transform=transform, tokenizer=ClipTokenizer(),
        context_length=77, global_batch=batch, start_step=0, host_index=0, host_count=1,
        seed=0, workers=workers, prefetch=1 if workers == 0 else 2)
    next(batches)  # worker start-up and first-batch latency are not throughput
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = next(batches)
        assert b["image"].shape == (batch, image_size, image_size, 3), b["image"].shape
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="records in the shard")
    p.add_argument("--image-size", type=int, default=224, help="crop size")
    p.add_argument("--short-side", type=int, default=256,
                   help="short side of the source JPEGs (larger ones decode at reduced scale)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker-process counts to try after the 0-worker (per-core) run")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time per row")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="jaxclip-bench-data-") as d:
        t0 = time.perf_counter()
        jpegs = build_shard(d, args.images, short_side=args.short_side)
        sizes = np.array([len(j) for j in jpegs])
        print(f"shard: {args.images} JPEGs ({args.short_side} px short side), median "
              f"{np.median(sizes) / 1024:.1f} KB, built in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}")
        # The per-core rows run pinned to one CPU: the tokenizer's own threads stay on it too.
        all_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(all_cpus)})
        raws = {lib: raw_decode_rate(jpegs, args.seconds, lib) for lib in ("pillow", "opencv")}
        for lib, rate in raws.items():
            print(f"raw JPEG decode ({lib}, 1 core):{' ' * (10 - len(lib))}{rate:8.1f} images/s")
        raw = max(raws.values())
        rows = {"raw_decode_per_core": raws, "images": args.images,
                "median_jpeg_bytes": int(np.median(sizes)), "image_size": args.image_size,
                "short_side": args.short_side,
                "batch": args.batch, "cpus": os.cpu_count(), "pipeline": {}}
        for workers in [0, *args.workers]:
            if workers:
                os.sched_setaffinity(0, all_cpus)
            rate = pipeline_rate(d, workers, args.batch, args.image_size, args.seconds)
            rows["pipeline"][workers] = rate
            label = "0 workers (1 core)" if workers == 0 else f"{workers} worker processes"
            print(f"pipeline, {label:<22}          {rate:8.1f} images/s   "
                  f"{rate / raw:5.2f} x raw decode per core")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
