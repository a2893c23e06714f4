"""The training input pipeline: jaxclip records -> decoded, augmented, tokenised host batches.

Step-indexed (levanter-style) on top of grain's random-access `MapDataset`:

  records --shuffle(seed), reshuffled every epoch--> an infinite global stream of records
  global batch s = stream elements [s·B, (s+1)·B)          B = train.batch_size
  host h of n reads elements [s·B + h·b, s·B + (h+1)·b)   b = B / n

so the batch at step s is a pure function of (dataset, seed, B, s). Resuming at step s is reading
from index s, and the global batch is the same whatever the number of hosts or loader workers —
batches are formed before grain's (thread or process) prefetch, which only parallelises over whole
batches and keeps their order. The per-element random augmentation is seeded by (seed, global
index), so it too is independent of the host layout.

Per element (unavoidably Python): msgpack decode, image decode and crop/resize (OpenCV). Per batch
(vectorised): caption tokenisation (`encode_batch`) and stacking. Images leave the host as uint8;
normalisation to float happens on device (`normalize_images`), a quarter of the transfer.

A record that cannot be read (a corrupt shard chunk, see `records.ShardSource`) or decoded is
skipped: its slot is filled by a later element of the stream (deterministically), and the batch's
`skipped` count reports it so the trainer can log it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import grain
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxclip.data import records

# Bound on how far a batch may look ahead to replace undecodable records before giving up.
_MAX_REPLACEMENTS = 64


def decode_image(data: bytes) -> Image.Image:
    """Evaluation-time decode (Pillow), paired with `resize_center`."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img.width, img.height))  # lets JPEG decode straight to RGB
    return img.convert("RGB")


def resize_center(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then centre-crop to size x size.

    Evaluation and `embed_images` use this: Pillow's antialiased bicubic is the preprocessing
    the reference CLIP models (open_clip, HF `CLIPImageProcessor`) were trained and scored with.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# Training decodes and resizes with OpenCV: libjpeg-turbo plus SIMD resampling make decode + crop
# + resize about 2.5x faster per core than Pillow's, which is what keeps the loader near the raw
# decode rate (docs/benchmarks.md). Parallelism comes from loader processes, not OpenCV threads.
cv2.setNumThreads(1)
_BGR = not hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV < 4.10 decodes colour only as BGR
_IMREAD = (cv2.IMREAD_COLOR if _BGR else cv2.IMREAD_COLOR_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def decode_array(data: bytes) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 RGB. OpenCV first; Pillow for formats it lacks (GIF)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD)
    if arr is None:
        return np.asarray(decode_image(data), np.uint8)
    return np.ascontiguousarray(arr[..., ::-1]) if _BGR else arr


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, or None for anything else.

    A few microseconds of header walking (Pillow's lazy open costs about ten times more, which
    showed as 8% of the loader's time on 256 px images).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9],
                                                                           "big")
            return (w, h) if w and h else None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_for_box(data: bytes, box: tuple[int, int, int, int], size: int
                   ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decodes just enough of the image to cut `box` out at `size` pixels.

    A JPEG whose box is at least 2x the output is decoded at 1/2, 1/4 or 1/8 scale inside
    libjpeg (the DCT does the downscaling, antialiased, at a fraction of the cost: 1/2 halves
    the decode time of an 800 x 600 photo). Returns the pixels and the box in their coordinates.
    """
    side = min(box[2] - box[0], box[3] - box[1])
    if data[:2] == b"\xff\xd8":  # JPEG
        for factor, flag in _REDUCED:
            if side >= factor * size:
                arr = cv2.imdecode(np.frombuffer(data, np.uint8),
                                   flag | cv2.IMREAD_IGNORE_ORIENTATION)
                if arr is None:
                    break
                h, w = arr.shape[:2]
                x0, y0 = min(box[0] // factor, w - 1), min(box[1] // factor, h - 1)
                x1, y1 = -(-box[2] // factor), -(-box[3] // factor)  # ceil
                return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), (x0, y0, min(x1, w), min(y1, h))
    return decode_array(data), box


def crop_resize(arr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` (x0, y0, x1, y1) and resize it to size x size.

    Bicubic without antialiasing down to half size (as TF's resize in big_vision's inception
    crop); area averaging beyond that, where skipping antialiasing would alias visibly.
    """
    x0, y0, x1, y1 = box
    crop = arr[y0:y1, x0:x1]
    if crop.shape[:2] == (size, size):
        return np.ascontiguousarray(crop)
    shrink = min(crop.shape[0], crop.shape[1]) / size
    interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def center_box(w: int, h: int) -> tuple[int, int, int, int]:
    """The largest centred square: resize-shorter-side-then-centre-crop as one crop + resize."""
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side, y0 + side


def random_resized_box(w: int, h: int, rng: np.random.Generator, scale=(0.9, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box: random area fraction and aspect ratio; the first of ten draws
    that fits (all ten drawn at once: a Python loop of scalar draws cost 7% of the loader), else
    the centre square."""
    target = w * h * rng.uniform(scale[0], scale[1], 10)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), 10))
    cw = np.round(np.sqrt(target * aspect)).astype(int)
    ch = np.round(np.sqrt(target / aspect)).astype(int)
    fits = np.flatnonzero((cw > 0) & (cw <= w) & (ch > 0) & (ch <= h))
    if not fits.size:
        return center_box(w, h)
    cw, ch = int(cw[fits[0]]), int(ch[fits[0]])
    x0, y0 = rng.integers(0, (w - cw + 1, h - ch + 1))
    return int(x0), int(y0), int(x0) + cw, int(y0) + ch


@dataclasses.dataclass(frozen=True)
class ElementTransform:
    """Record bytes -> (uint8 image, caption). Picklable, for grain worker processes."""

    image_size: int
    augment: str = "none"  # none | rrc (random resized crop)
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    caption: str = "random"  # random | first
    seed: int = 0

    def __call__(self, raw: bytes, index: int) -> tuple[np.ndarray, str]:
        record = records.decode_record(raw)
        rng = np.random.default_rng([self.seed, index])
        data, arr = record["image"], None
        dims = jpeg_dims(data)
        if dims is None:  # not a JPEG: no reduced decoding, so decode fully and measure
            arr = decode_array(data)
            dims = arr.shape[1], arr.shape[0]
        if self.augment == "rrc":
            box = random_resized_box(*dims, rng, self.scale, self.ratio)
        else:
            box = center_box(*dims)
        if arr is None:
            arr, box = decode_for_box(data, box, self.image_size)
        captions = record["captions"]
        text = captions[rng.integers(len(captions))] if self.caption == "random" else captions[0]
        return crop_resize(arr, box, self.image_size), text


class StepBatches(grain.MapDataset):
    """Host batch `step` of the step-indexed stream (see the module docstring)."""

    def __init__(self, stream: grain.MapDataset, transform: ElementTransform, tokenizer,
                 global_batch: int, host_index: int, host_count: int, context_length: int):
        super().__init__([stream])
        if global_batch % host_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the {host_count} "
                             "hosts")
        self._stream = stream
        self._transform = transform
        self._tokenizer = tokenizer
        self._B = global_batch
        self._b = global_batch // host_count
        self._h = host_index
        self._context_length = context_length

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"StepBatches(B={self._B}, host={self._h}, b={self._b})"

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        images, texts, skipped = [], [], 0
        first = step * self._B + self._h * self._b
        for j in range(self._b):
            index = first + j
            for attempt in range(_MAX_REPLACEMENTS + 1):
                raw = self._stream[index]
                if isinstance(raw, records.Unreadable):
                    last = raw.where  # the source logged it, once per record or shard
                else:
                    try:
                        img, text = self._transform(raw, index)
                        break
                    except (records.CorruptRecordError, OSError, ValueError) as e:
                        last = str(e)
                        logging.warning("skipping undecodable record at stream index %d: %s",
                                        index, e)
                skipped += 1
                # Look past this batch for the replacement, so batch order is unaffected.
                index += self._B * (attempt + 1) + 1
            else:
                raise RuntimeError(
                    f"step {step}: {_MAX_REPLACEMENTS + 1} records in a row, from stream index "
                    f"{first + j} on, could not be read or decoded (the last: {last}); are the "
                    "dataset's shards corrupt or gone?")
            images.append(img)
            texts.append(text)
        tokens = self._tokenizer(texts, context_length=self._context_length)
        return {"image": np.stack(images), "text": tokens.astype(np.int32),
                "skipped": np.int32(skipped)}


def record_source(directory: str, split: str) -> grain.MapDataset:
    source = records.ShardSource(records.split_shards(directory, split))
    if not len(source):
        raise ValueError(f"dataset {directory!r} split {split!r} has no records (its manifest "
                         "lists none): nothing to train on; rebuild it from inputs that hold "
                         "usable records")
    return grain.MapDataset.source(source)


def record_stream(sources: Sequence[tuple[str, str, float]], seed: int) -> grain.MapDataset:
    """An infinite stream of raw records, reshuffled every epoch, mixing datasets by weight."""
    streams, weights = [], []
    for k, (directory, split, weight) in enumerate(sources):
        ds = record_source(directory, split).seed(seed + 7919 * k).shuffle().repeat(None)
        streams.append(ds)
        weights.append(weight)
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, weights)


def _mark_absl_parsed() -> None:
    # grain's multiprocessing reads absl flags; outside absl.app they are unparsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_batches(sources: Sequence[tuple[str, str, float]], *, transform: ElementTransform,
                  tokenizer, context_length: int, global_batch: int, start_step: int,
                  host_index: int, host_count: int, seed: int, workers: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """Host batches for steps start_step, start_step + 1, ... (see the module docstring)."""
    stream = record_stream(sources, seed)
    batches = StepBatches(stream, transform, tokenizer, global_batch, host_index, host_count,
                          context_length)[start_step:]
    threads = max(1, min(prefetch, 4)) if workers == 0 else 1
    it_ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=max(prefetch, 1)))
    if workers > 0:
        _mark_absl_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=prefetch))
    return iter(it_ds)


def normalize_images(images: jnp.ndarray, mean, std) -> jnp.ndarray:
    """uint8 (B, H, W, 3) -> float32 normalised pixels, on device."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def dataset_dir(name_or_path: str, cache_dir: str = "") -> str:
    """A dataset directory: an existing path, or a built-in dataset built into the cache."""
    if not name_or_path:
        raise ValueError("config data.train.dataset is empty: set a dataset directory or a "
                         "built-in name (shapes, fashion_mnist, emoji)")
    if os.path.isdir(name_or_path):
        return name_or_path
    from jaxclip.data import builtin

    return builtin.ensure(name_or_path, cache_dir)
