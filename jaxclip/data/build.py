"""The shard-writing engine behind `jaxclip data build`: any source -> ArrayRecord shards plus a
manifest.

    OUT/
      manifest.json                      written last: its presence means the build finished
      train-00000-of-00006.arrayrecord   complete shards (written to .tmp, then renamed)
      _build/config.json                 what this directory is being built from
      _build/<shard>.json                per-shard counts, written just before the shard's rename
      _build/lock                        flock held while a build runs

How it works:
- Deterministic: each split's work units (record indices or input files, see
  `jaxclip.data.sources.common`) are cut into `num_shards` contiguous slices; shard k always gets
  slice k, whatever the number of workers.
- Parallel: shards are built by a pool of `workers` processes. The pool uses "spawn" because this
  function may run inside a training process whose JAX threads make `fork` unsafe.
- Resumable: a shard whose final file exists is not rebuilt; a stray `.tmp` is overwritten. A rerun
  with different settings is refused rather than mixing shards of two configurations.
- Safe: every image is decoded with Pillow before it is written (`jaxclip.data.sources.checks`).
  Undecodable images and bad input items are skipped and counted per reason (manifest `skipped`,
  with examples in `info`); they never stop the build. Images larger than `max_image_size` are
  shrunk and re-encoded (JPEG, or PNG when they have transparency); formats other than
  JPEG/PNG/WebP are re-encoded as PNG. Caption and metadata text over `--max-text-bytes` is
  skipped and counted too, without being read into memory.
- Never empty: a split left with no records is an error (`EmptySplitError`). The manifest is not
  written, so the directory cannot be trained on; the shards stay for inspection.

`jaxclip data build` (`jaxclip.cli`) calls `build_dataset`; the built-in datasets
(`jaxclip.data.builtin`) call `ensure_dataset` to build a cache directory on first use
(idempotent, safe against concurrent and interrupted builds).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue as queue_lib
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from jaxclip.data import records
from jaxclip.data.sources import Skip, Source
from jaxclip.data.sources.checks import ImageOptions, finish_record

BUILDER_VERSION = 1
STATE_DIR = "_build"
_EXAMPLES_PER_REASON = 5


class EmptySplitError(ValueError):
    """Every input item of a split was skipped: the build produced nothing to train on."""


@dataclasses.dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    num_shards: int
    units: Sequence[Any]
    path: str
    stats_path: str
    config_hash: str


def build_shard(
    source: Source,
    task: ShardTask,
    options: ImageOptions,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Writes one shard; returns (and saves next to it) its counts."""
    skipped: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = {}
    converted: collections.Counter = collections.Counter()

    def items():
        pending = 0
        for item in source.read(task.split, task.units):
            pending += 1
            if pending == 256:  # report progress in batches: one message per record is too many
                progress(pending)
                pending = 0
            if not isinstance(item, Skip):
                item = finish_record(item, options, converted)
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                reason_examples = examples.setdefault(item.reason, [])
                if len(reason_examples) < _EXAMPLES_PER_REASON:
                    reason_examples.append(item.detail)
                continue
            yield item
        progress(pending)

    stats: dict[str, Any] = {"file": os.path.basename(task.path), "config_hash": task.config_hash}

    def save_stats(count: int) -> None:
        stats.update(
            count=count, skipped=dict(skipped), skip_examples=examples, converted=dict(converted)
        )
        _write_json(task.stats_path, stats)

    records.write_shard(task.path, items(), before_commit=save_stats)
    return stats


# Per-process state of pool workers, set once by `_init_worker` instead of pickled per task.
_worker: dict[str, Any] = {}


def _init_worker(source: Source, options: ImageOptions, progress_queue) -> None:
    _worker.update(source=source, options=options, queue=progress_queue)


def _run_in_worker(task: ShardTask) -> dict[str, Any]:
    return build_shard(_worker["source"], task, _worker["options"], _worker["queue"].put)


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another build of {os.path.dirname(os.path.dirname(path))} to "
                "finish...",
                file=sys.stderr,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def plan(source: Source, num_shards: int | dict[str, int] | None) -> dict[str, int]:
    """The shard count of every split: given, or the source's default, and at most one per unit."""
    counts = {}
    for split in source.splits():
        units = len(source.work_units(split))
        if units == 0:
            raise ValueError(f"split {split!r} of {source.describe()} has no input items")
        wanted = num_shards.get(split) if isinstance(num_shards, dict) else num_shards
        wanted = wanted or source.default_num_shards(split)
        if wanted < 1:
            raise ValueError(f"num_shards must be at least 1, got {wanted}")
        counts[split] = min(wanted, units)
    return counts


def build_config(source: Source, shards: dict[str, int], options: ImageOptions) -> dict[str, Any]:
    """Everything that determines the output bytes; a directory is only resumed with the same."""
    return {
        "builder_version": BUILDER_VERSION,
        "format": records.FORMAT,
        "source": source.describe(),
        "num_shards": shards,
        "image_options": dataclasses.asdict(options),
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def build_dataset(
    source: Source,
    out_dir: str,
    *,
    num_shards: int | dict[str, int] | None = None,
    workers: int = 1,
    max_image_size: int | None = None,
    jpeg_quality: int = 90,
    progress: bool = True,
    command: str | None = None,
) -> records.Manifest:
    """Builds (or finishes building) `out_dir` from `source`; returns its manifest.

    `num_shards` is per split (an int for all, or {split: int}); by default the source picks.
    """
    options = ImageOptions(max_image_size=max_image_size, jpeg_quality=jpeg_quality)
    shards = plan(source, num_shards)  # reads the inputs' index: bad inputs fail before any write
    config = build_config(source, shards, options)
    state_dir = os.path.join(out_dir, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    with _locked(os.path.join(state_dir, "lock")):
        _claim(state_dir, config)
        if os.path.exists(os.path.join(out_dir, records.MANIFEST)):
            return records.read_manifest(out_dir)  # finished earlier, same configuration
        digest = config_hash(config)
        done, todo = [], []
        for split, count in shards.items():
            units = source.work_units(split)
            for k in range(count):
                name = records.shard_name(split, k, count)
                task = ShardTask(
                    split=split,
                    index=k,
                    num_shards=count,
                    units=units[k * len(units) // count : (k + 1) * len(units) // count],
                    path=os.path.join(out_dir, name),
                    stats_path=os.path.join(state_dir, name + ".json"),
                    config_hash=digest,
                )
                stats = _read_json(task.stats_path)
                finished = (
                    os.path.exists(task.path)
                    and isinstance(stats, dict)
                    and stats.get("config_hash") == digest
                )
                (done if finished else todo).append((task, stats))
        results = {t.path: s for t, s in done}
        results.update(
            _run(
                source,
                [t for t, _ in todo],
                options,
                workers,
                progress,
                initial=sum(s["count"] + sum(s["skipped"].values()) for _, s in done),
                total=_total(source, shards),
            )
        )
        manifest = _manifest(source, out_dir, shards, results, config, digest, command)
        _check_not_empty(manifest, out_dir)
        records.write_manifest(out_dir, manifest)
        return manifest


def _check_not_empty(manifest: records.Manifest, out_dir: str) -> None:
    """Raises EmptySplitError, in one line, for a split without records.

    Before the manifest is written: a directory without one is not a dataset, so training on it
    fails at once instead of dividing by its zero records. A rerun does not rebuild the shards
    (they are finished) and fails the same way until the inputs are fixed.
    """
    for split, entry in manifest.splits.items():
        if entry["num_records"]:
            continue
        skipped = manifest.info["skipped_by_split"].get(split, {})
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        top = max(skipped, key=skipped.get, default=None)
        example = (manifest.info["skip_examples"].get(top) or [""])[0] if top else ""
        raise EmptySplitError(
            f"split {split!r} of {out_dir} has no records: all {sum(skipped.values())} input "
            f"items were skipped ({reasons or 'none given'}"
            + (f"; e.g. {top}: {example}" if example else "")
            + "); no manifest was written, the shards are left in place"
        )


def _claim(state_dir: str, config: dict[str, Any]) -> None:
    """Records the configuration of a new build, or checks that a rerun uses the same one."""
    path = os.path.join(state_dir, "config.json")
    previous = _read_json(path)
    if previous is None:
        _write_json(path, config)
    elif previous != config:
        changed = sorted(
            k for k in config.keys() | previous.keys() if config.get(k) != previous.get(k)
        )
        then = [previous.get(k) for k in changed]
        now = [config.get(k) for k in changed]
        raise ValueError(
            f"{os.path.dirname(state_dir)} was built with other settings ({', '.join(changed)} "
            f"differ: {then} then, {now} now); choose a new output directory or delete this one"
        )


def _total(source: Source, shards: dict[str, int]) -> int | None:
    sizes = [source.num_records(split) for split in shards]
    return None if any(s is None for s in sizes) else sum(sizes)


def _run(
    source: Source,
    tasks: list[ShardTask],
    options: ImageOptions,
    workers: int,
    progress: bool,
    initial: int,
    total: int | None,
) -> dict[str, dict[str, Any]]:
    from tqdm import tqdm

    results: dict[str, dict[str, Any]] = {}
    if not tasks:
        return results
    bar = tqdm(
        total=total,
        initial=initial,
        unit="rec",
        disable=not progress,
        dynamic_ncols=True,
        desc=f"building {len(tasks)} shard(s)",
    )
    with bar:
        if workers <= 1 or len(tasks) == 1:
            for task in tasks:
                results[task.path] = build_shard(source, task, options, bar.update)
            return results
        context = multiprocessing.get_context("spawn")
        progress_queue = context.Queue()
        # An executor, not multiprocessing.Pool: if a worker dies (e.g. killed for memory), Pool
        # waits forever for its task, the executor fails the task with BrokenProcessPool.
        pool = ProcessPoolExecutor(
            min(workers, len(tasks)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(source, options, progress_queue),
        )
        try:
            pending = {pool.submit(_run_in_worker, task): task.path for task in tasks}
            while pending:
                _drain(progress_queue, bar, timeout=0.2)
                for future in [f for f in pending if f.done()]:
                    path = pending.pop(future)
                    try:
                        results[path] = future.result()
                    except Exception as e:
                        raise RuntimeError(f"building shard {path} failed: {e}") from e
            _drain(progress_queue, bar, timeout=0)
        finally:
            # Shards already running finish (and count for a resumed build); queued ones are
            # dropped.
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _drain(progress_queue, bar, timeout: float) -> None:
    try:
        bar.update(progress_queue.get(timeout=timeout) if timeout else progress_queue.get_nowait())
        while True:
            bar.update(progress_queue.get_nowait())
    except queue_lib.Empty:
        pass


def _manifest(
    source: Source,
    out_dir: str,
    shards: dict[str, int],
    results: dict[str, dict[str, Any]],
    config: dict[str, Any],
    digest: str,
    command: str | None,
) -> records.Manifest:
    splits, skipped_by_split = {}, {}
    skipped: collections.Counter = collections.Counter()
    converted: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = {}
    for split, count in shards.items():
        entries, split_skipped = [], collections.Counter()
        for k in range(count):
            stats = results[os.path.join(out_dir, records.shard_name(split, k, count))]
            entries.append({"file": stats["file"], "count": stats["count"]})
            split_skipped.update(stats["skipped"])
            converted.update(stats["converted"])
            for reason, details in stats["skip_examples"].items():
                kept = examples.setdefault(reason, [])
                kept.extend(details[: _EXAMPLES_PER_REASON - len(kept)])
        splits[split] = {"num_records": sum(e["count"] for e in entries), "shards": entries}
        skipped_by_split[split] = dict(split_skipped)
        skipped.update(split_skipped)
    info = {
        **source.info(),
        "skipped_by_split": skipped_by_split,
        "skip_examples": examples,
        "converted_images": dict(converted),
        "image_options": config["image_options"],
        "config_hash": digest,
    }
    if command is None:
        command = (
            f"jaxclip.data.build.build_dataset(<{type(source).__name__}: "
            f"{source.describe()}>, {out_dir!r}, num_shards={shards}, "
            f"max_image_size={config['image_options']['max_image_size']})"
        )
    return records.Manifest(
        splits=splits,
        source=source.describe(),
        build_command=command,
        skipped=dict(skipped),
        info=info,
    )


def ensure_dataset(
    source: Source,
    cache_dir: str,
    name: str,
    *,
    num_shards: int | dict[str, int] | None = None,
    max_image_size: int | None = None,
    workers: int = 1,
    progress: bool = False,
) -> str:
    """Builds `source` under `cache_dir` unless already built; returns the dataset directory.

    The directory name carries a hash of the settings (source, shards, image options, builder
    version), so changed settings build a new cache instead of failing on the old one. Concurrent
    callers wait for one build (file lock); an interrupted build is resumed by the next call.
    """
    settings = [source.describe(), num_shards, max_image_size, BUILDER_VERSION, records.FORMAT]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out_dir = os.path.join(cache_dir, f"{name}-{key}")
    if not os.path.exists(os.path.join(out_dir, records.MANIFEST)):
        build_dataset(
            source,
            out_dir,
            num_shards=num_shards,
            max_image_size=max_image_size,
            workers=workers,
            progress=progress,
        )
    return out_dir
