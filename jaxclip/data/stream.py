"""The training stream of an experiment: its mixture, its batches, and what resuming it needs.

`train_stream(cfg, start_step, tokenizer)` builds the step-indexed pipeline
(`jaxclip.data.pipeline`) from the config's `data` section for this host. Because batch s is a
pure function of (sources, seed, global batch, s), resuming needs only the next step — plus a
check that those invariants still hold (the datasets are identified by content, not path, so a
restart may mount them elsewhere). `stream_state` is what a checkpoint records;
`check_stream_state` refuses a resume that would silently change the data order; both take the
`invariants(cfg)` a run resolves once. The number of
hosts and of loader workers may change between runs: neither affects the batches.
`mixture(cfg)` is the list of (dataset directory, split, weight) the stream draws from;
`check_sources` is the trainer's early check that every entry can give batches at all.
"""

from __future__ import annotations

import hashlib
import json

import jax

from jaxclip import config
from jaxclip.data import builtin, pipeline, records


def mixture(cfg) -> list[tuple[str, str, float]]:
    """(dataset directory, split, weight) of every training source, building built-ins."""
    d = cfg.data
    entries = list(d.train.mixture) or [dict(dataset=d.train.dataset, split=d.train.split,
                                             weight=1.0)]
    out = []
    for e in entries:
        unknown = set(e) - {"dataset", "split", "weight"}
        if unknown:
            raise config.ConfigError(f"data.train.mixture entry has unknown keys {sorted(unknown)}")
        out.append((builtin.dataset_dir(e["dataset"], d.cache_dir), e.get("split", "train"),
                    float(e.get("weight", 1.0))))
    return out


def check_sources(cfg) -> list[tuple[str, str, float]]:
    """The training sources, checked before anything expensive is built; raises ConfigError.

    Every source must be a dataset directory (or a built-in name, built here) whose manifest
    lists the split, whose shard files exist, and which holds at least one record, and its
    weight must be positive. The error is one line naming the dataset, split and directory:
    without this, a dataset built from inputs that were all skipped fails minutes later, deep
    inside the input pipeline.
    """
    try:
        srcs = mixture(cfg)
    except config.ConfigError:
        raise
    except ValueError as e:  # an empty, unknown or unbuildable dataset name
        raise config.ConfigError(f"data.train: {e}") from None
    for directory, split, weight in srcs:
        where = f"training dataset {directory!r} split {split!r}"
        try:
            total = sum(count for _, count in records.split_shards(directory, split))
        except KeyError as e:
            raise config.ConfigError(e.args[0]) from None
        except (OSError, ValueError) as e:  # no manifest, shards gone, a foreign format
            raise config.ConfigError(f"{where}: {e}") from None
        if total == 0:
            raise config.ConfigError(f"{where} has no records (its manifest lists none): "
                                     "nothing to train on; rebuild it from usable inputs")
        if not weight > 0:
            raise config.ConfigError(f"{where} has weight {weight}; weights must be positive")
    return srcs


def seed(cfg) -> int:
    return cfg.seed if cfg.data.shuffle_seed < 0 else cfg.data.shuffle_seed


def image_size(cfg) -> int:
    return cfg.data.image_size if cfg.data.image_size > 0 else cfg.model.image.image_size


def train_stream(cfg, start_step: int, tokenizer):
    """Host batches for steps start_step, start_step + 1, ... of this process."""
    aug, views = cfg.data.augment, cfg.data.view_augment
    transform = pipeline.ElementTransform(
        image_size=image_size(cfg), augment=aug.kind, scale=tuple(aug.scale),
        ratio=tuple(aug.ratio), caption=cfg.data.caption, seed=seed(cfg),
        captions_per_image=cfg.data.captions_per_image, views=cfg.data.views,
        view_augment=pipeline.ViewAugment(scale=tuple(views.scale), ratio=tuple(views.ratio),
                                          flip=float(views.flip)))
    return pipeline.train_batches(
        mixture(cfg), transform=transform, tokenizer=tokenizer,
        context_length=cfg.model.text.context_length, global_batch=cfg.train.batch_size,
        start_step=start_step, host_index=jax.process_index(), host_count=jax.process_count(),
        seed=seed(cfg), workers=cfg.data.workers, prefetch=cfg.data.prefetch)


def source_identity(directory: str, split: str, weight: float) -> list:
    """What makes a source the same data, wherever it is mounted: its split, weight, and the
    shard files and record counts of its manifest (a rebuilt or different dataset differs)."""
    manifest = records.read_manifest(directory)
    shards = manifest.splits.get(split, {}).get("shards", [])
    digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]
    return [split, float(weight), manifest.num_records(split), digest]


def invariants(cfg) -> dict:
    """What must not change for the stream to resume exactly: global batch, seed and the
    sources' content ids (manifests read once here; a run computes this once, not per save).

    `sources` (the directories) is informational: a restart may mount the same datasets
    elsewhere (another pod, another cache path). `source_ids` is what must not change.
    """
    srcs = mixture(cfg)
    return {"global_batch": int(cfg.train.batch_size), "seed": seed(cfg),
            "sources": [list(s) for s in srcs],
            "source_ids": [source_identity(*s) for s in srcs]}


def stream_state(fixed: dict, next_step: int) -> dict:
    """What a checkpoint records of the stream: its position and its invariants."""
    return {"next_step": int(next_step), **fixed}


def check_stream_state(fixed: dict, saved: dict) -> None:
    """Refuses (ValueError) a resume whose stream would differ from the checkpoint's."""
    now = stream_state(fixed, saved["next_step"])
    # Checkpoints written before `source_ids` existed are checked by path.
    keys = ("global_batch", "seed", "source_ids" if "source_ids" in saved else "sources")
    for key in keys:
        if now[key] != saved.get(key):
            detail = ""
            if key == "source_ids":
                detail = (f" (sources were {saved.get('sources')!r}, now {now['sources']!r}; "
                          "each id is [split, weight, records, shard-list digest])")
            raise ValueError(
                f"cannot resume the data stream exactly: {key} was {saved.get(key)!r} when the "
                f"checkpoint was written and is {now[key]!r} now{detail}. Restore the original "
                "value, or start a new workdir (initialising from this checkpoint).")
