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

With `views` V > 1 (data.views, for an image-image term such as SimCLR's) each record gives V
crops of its image, `image` (b, V, H, W, 3). View 0 is drawn exactly as with one view (same
generator, same augmentation), so the contrastive pair is unchanged; view v >= 1 has its own
generator seeded by (seed, global index, v) and the `view_augment` settings, so every view is a
pure function of (seed, stream index, view) and resumes exactly.

Per element (unavoidably Python): msgpack decode, image decode and crop/resize (OpenCV, see
`jaxclip.data.images`). Per batch (vectorised): caption tokenisation (`encode_batch`) and
stacking. Images leave the host as uint8; normalisation to float happens on device
(`images.normalize_images`), a quarter of the transfer.

A record that cannot be read (a corrupt shard chunk, see `records.ShardSource`) or decoded is
skipped: its slot is filled by a later element of the stream (deterministically), and the batch's
`skipped` count reports it so the trainer can log it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from jaxclip.data import records
from jaxclip.data.images import (
    center_box,
    crop_resize,
    decode_array,
    decode_for_box,
    jpeg_dims,
    random_resized_box,
)

# Bound on how far a batch may look ahead to replace undecodable records before giving up.
_MAX_REPLACEMENTS = 64


@dataclasses.dataclass(frozen=True)
class ViewAugment:
    """The augmentation of the extra views (v >= 1): a random resized crop and a horizontal flip.

    SimCLR (Chen et al. 2020, arXiv 2002.05709) finds the crop the augmentation that matters most
    for image-image contrast; its colour distortion is left out here (the demo's captions name
    colours, which such a term would teach the image tower to ignore)."""

    scale: tuple[float, float] = (0.3, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5  # probability of a horizontal flip

    def __call__(self, data: bytes, dims: tuple[int, int], arr: np.ndarray | None,
                 rng: np.random.Generator, size: int) -> np.ndarray:
        box = random_resized_box(*dims, rng, self.scale, self.ratio)
        flip = rng.random() < self.flip
        if arr is None:
            arr, box = decode_for_box(data, box, size)
        out = crop_resize(arr, box, size)
        return np.ascontiguousarray(out[:, ::-1]) if flip else out


@dataclasses.dataclass(frozen=True)
class ElementTransform:
    """Record bytes -> (uint8 image, caption). Picklable, for grain worker processes.

    caption "random" | "first" gives one caption (a str); "all" gives a list of at most
    `captions_per_image` captions: all of them in record order when the record has no more,
    else that many drawn without replacement (kept in record order) by the element's generator,
    so the choice too is a function of (seed, stream index) and resumes exactly."""

    image_size: int
    augment: str = "none"  # none | rrc (random resized crop)
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    caption: str = "random"  # random | first | all
    seed: int = 0
    captions_per_image: int = 0  # K of caption="all"
    views: int = 1  # crops per image; > 1 gives (V, H, W, 3) images (see the module docstring)
    view_augment: ViewAugment = ViewAugment()

    def __post_init__(self):
        if self.caption == "all" and self.captions_per_image < 1:
            raise ValueError("caption='all' needs captions_per_image >= 1")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")

    def __call__(self, raw: bytes, index: int) -> tuple[np.ndarray, str | list[str]]:
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
        full = arr  # the whole image when it is not a JPEG, else None
        if arr is None:
            arr, box = decode_for_box(data, box, self.image_size)
        captions = record["captions"]
        if self.caption == "all":
            k = self.captions_per_image
            keep = (np.sort(rng.choice(len(captions), k, replace=False))
                    if len(captions) > k else range(len(captions)))
            text = [captions[i] for i in keep]
        elif self.caption == "random":
            text = captions[rng.integers(len(captions))]
        else:
            text = captions[0]
        image = crop_resize(arr, box, self.image_size)
        if self.views == 1:
            return image, text
        # A fully decoded image (not a JPEG) is cropped again; a JPEG is decoded again per view
        # at the scale that view's box needs.
        extra = [self.view_augment(data, dims, full, np.random.default_rng([self.seed, index, v]),
                                   self.image_size) for v in range(1, self.views)]
        return np.stack([image, *extra]), text


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
        if self._transform.caption == "all":
            return {"image": np.stack(images), **self._caption_sets(texts),
                    "skipped": np.int32(skipped)}
        tokens = self._tokenizer(texts, context_length=self._context_length)
        return {"image": np.stack(images), "text": tokens.astype(np.int32),
                "skipped": np.int32(skipped)}

    def _caption_sets(self, caption_lists: list[list[str]]) -> dict[str, np.ndarray]:
        """text (b, K, T) tokens and text_mask (b, K): each image's captions, the missing slots
        filled with its first caption (a well-formed text for any tokenizer, so the tower sees
        nothing unusual) and masked out."""
        k = self._transform.captions_per_image
        flat = [c for caps in caption_lists for c in [*caps, *[caps[0]] * (k - len(caps))]]
        tokens = self._tokenizer(flat, context_length=self._context_length).astype(np.int32)
        mask = np.arange(k)[None, :] < np.array([len(c) for c in caption_lists])[:, None]
        return {"text": tokens.reshape(len(caption_lists), k, -1), "text_mask": mask}


def record_source(directory: str, split: str) -> grain.MapDataset:
    source = records.ShardSource(records.split_shards(directory, split))
    if not len(source):
        raise ValueError(f"dataset {directory!r} split {split!r} has no records (its manifest "
                         "lists none): nothing to train on; rebuild it from inputs that hold "
                         "usable records")
    return grain.MapDataset.source(source)


def record_stream(mixture: Sequence[tuple[str, str, float]], seed: int) -> grain.MapDataset:
    """An infinite stream of raw records, reshuffled every epoch, mixing the (dataset directory,
    split, weight) entries of `mixture` by weight."""
    streams, weights = [], []
    for k, (directory, split, weight) in enumerate(mixture):
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


def train_batches(mixture: Sequence[tuple[str, str, float]], *, transform: ElementTransform,
                  tokenizer, context_length: int, global_batch: int, start_step: int,
                  host_index: int, host_count: int, seed: int, workers: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """Host batches for steps start_step, start_step + 1, ... (see the module docstring)."""
    stream = record_stream(mixture, seed)
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
