"""`jaxclip eval`: run the configured evaluators on a saved checkpoint, without training.

    jaxclip eval --workdir runs/demo                       # latest checkpoint, the run's config
    jaxclip eval --workdir runs/demo --step 300 --only val
    jaxclip eval --workdir runs/fm --config configs/fashion_mnist.py \
        --config.evals.test.max_examples=1000

The config is the one stored in the checkpoint (what its weights were trained with) unless
--config is given; `--config.<key>=<value>` overrides apply on top either way, so evaluators can
be added or changed for an old run. Only the parameters are restored (not the optimizer state),
onto the mesh of the current devices, whatever mesh wrote them; a damaged newest checkpoint is
skipped with a warning, as the trainer does, and nothing in WORKDIR is moved. Metrics are printed
as a table and written to WORKDIR/eval_<step>.json (or --out).

WORKDIR may also be imported weights: a `jaxclip convert` output, a HF CLIPModel or an open_clip
directory. The model, tokenizer and image preprocessing then come from the weights and the
evaluators from --config:

    jaxclip eval --workdir hf/clip-vit-base-patch32 --config configs/my_evals.py

`restore_params` + `jaxclip.evals.evaluate` are the two calls for any other entry point (imported
weights only need the second).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any

import jax

from jaxclip import config, runtime, tree

# Orbax notes that are expected here and would only alarm: it logs the first at ERROR level
# whenever a checkpoint is restored onto other devices than it was written from, even though
# target shardings are given (the supported way to do that); the others say that a read-only
# manager (what evaluation asks for) does not save.
_EXPECTED_NOTES = (
    "The available devices are different from the devices used to save the checkpoint",
    "CheckpointManagerOptions.read_only=True",
    "Given directory is read only",
)


class _DropExpectedNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_EXPECTED_NOTES)


@contextlib.contextmanager
def _quiet_orbax():
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    note = _DropExpectedNotes()
    for lg in loggers:
        lg.addFilter(note)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(note)


def _with_overrides(cfg: config.ConfigDict, overrides: list[str]) -> config.ConfigDict:
    for item in overrides:
        config.apply_override(cfg, item)
    config.validate(cfg)
    return cfg


def restore_params(workdir: str, config_spec: str | None = None, overrides: list[str] = (),
                   step: int | None = None) -> tuple[config.ConfigDict, dict, int]:
    """(config, full parameter tree, step) of a checkpoint in WORKDIR (default: the newest
    intact one; a damaged newest checkpoint is skipped with a warning, nothing is moved).

    The config is the file `config_spec` when given, else the one stored in the checkpoint (what
    its weights were trained with), with `overrides` applied either way. Only the parameters are
    restored (jaxclip.runtime.restore), on the config's mesh over the current devices:
    the optimizer state is not read, so its config need not match and it costs no memory."""
    chosen = config.load(config_spec, list(overrides)) if config_spec else None

    def make_config(saved: config.ConfigDict) -> config.ConfigDict:
        return chosen if chosen is not None else _with_overrides(saved, list(overrides))

    with _quiet_orbax():
        return runtime.restore(workdir, step, make_config=make_config, mesh_from_config=True)


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def format_table(metrics: dict[str, float]) -> str:
    """Metrics grouped by evaluator (sorted by name), each a header line with its time and then
    one row per metric in the evaluator's own order (R@1, R@5, R@10, ...)."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, name, metric = key.split("/", 2)
        groups.setdefault(name, {})[metric] = value
    lines = []
    for name in sorted(groups):
        rows = dict(groups[name])
        seconds = rows.pop("seconds", None)
        lines.append(f"{name}" + (f"  ({seconds:.1f} s)" if seconds is not None else ""))
        width = max((len(k) for k in rows), default=0)
        lines += [f"  {k:<{width}}  {_fmt(v):>10}" for k, v in rows.items()]
    return "\n".join(lines)


# What imported weights decide in the config: the model, and how its inputs are prepared.
_WEIGHTS_DATA_KEYS = ("tokenizer", "mean", "std", "image_size")


def imported_weights(path: str) -> Any:
    """The weights in `path` when it is an imported checkpoint directory (a `jaxclip convert`
    output, a HF CLIPModel or an open_clip directory), or None for a training workdir."""
    from jaxclip.interop import sources

    if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "checkpoints")):
        return None
    try:
        kind = sources.detect(path)
    except ValueError:
        return None  # e.g. a workdir whose first checkpoint is not written yet
    if kind == "hf_bert":
        raise ValueError(f"{path} is a BertModel: a text tower alone cannot be evaluated "
                         "(import it into a two-tower model with init.path instead)")
    return sources.read(path)


def imported_config(pre, config_spec: str | None, overrides: list[str]) -> config.ConfigDict:
    """The evaluators and mesh of `config_spec` (default: the weights' own config, which has no
    evaluators) with the model, tokenizer and image preprocessing of the imported weights."""
    cfg = config.load(config_spec, []) if config_spec else pre.cfg
    cfg.model = pre.cfg.model
    for key in _WEIGHTS_DATA_KEYS:
        cfg.data[key] = pre.cfg.data[key]
    for item in overrides:
        config.apply_override(cfg, item)
    config.validate(cfg)
    return cfg


def _require_evals(cfg) -> None:
    if not cfg.evals:
        raise ValueError("the config has no evaluators; add some with --config CONFIG or "
                         "--config.evals.NAME=\"{'type': 'retrieval', 'split': 'val'}\"")


def run(workdir: str, *, config_spec: str | None = None, overrides: list[str] = (),
        step: int | None = None, names: list[str] | None = None,
        out: str | None = None) -> tuple[int | str, dict[str, float], str | None]:
    """Evaluates a checkpoint; returns (step, metrics, path of the JSON written or None).

    `workdir` may also be a directory of imported weights (see `imported_weights`); their step
    is reported as "imported" and the JSON goes to WORKDIR/eval_imported.json.
    """
    from jaxclip.evals import evaluate

    t0 = time.perf_counter()
    pre = imported_weights(workdir)
    if pre is not None:
        if step is not None:
            raise ValueError(f"--step applies to training workdirs; {workdir} holds imported "
                             f"{pre.kind} weights")
        cfg = imported_config(pre, config_spec, list(overrides))
        _require_evals(cfg)
        params, step = tree.unflatten(pre.params), "imported"
    else:
        cfg, params, step = restore_params(workdir, config_spec, list(overrides), step)
        _require_evals(cfg)
    restore_s = time.perf_counter() - t0
    logging.info("restored step %s of %s in %.1fs", step, workdir, restore_s)
    metrics = evaluate(cfg, params, names, step=step if isinstance(step, int) else None)
    path = None
    if jax.process_index() == 0:
        path = out or os.path.join(workdir, f"eval_{step}.json")
        report = {"step": step, "workdir": os.path.abspath(workdir),
                  "config": config_spec or f"checkpoint {step}",
                  "overrides": list(overrides), "devices": jax.device_count(),
                  "restore_s": restore_s, "metrics": metrics,
                  "evals": {k: v.to_dict() if hasattr(v, "to_dict") else dict(v)
                            for k, v in cfg.evals.items() if names is None or k in names}}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    return step, metrics, path


def main(args, overrides: list[str]) -> int:
    """The `jaxclip eval` command (args from cli.py's parser)."""
    from jaxclip import distributed

    distributed.maybe_initialize()
    names = args.only
    if names:
        # argparse hands an override containing a space ("--config.evals.val.ks=(1, 5)") to a
        # preceding `--only NAME ...` as if it were a name; give it back to the overrides.
        overrides = [*overrides, *(n for n in names if n.startswith("--config."))]
        overrides = [o.removeprefix("--config.") for o in overrides]
        names = [n for n in names if not n.startswith("--config.")]
    try:
        step, metrics, path = run(args.workdir, config_spec=args.config, overrides=overrides,
                                  step=args.step, names=names, out=args.out)
    except (config.ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"jaxclip eval: {e}") from None
    if jax.process_index() == 0:
        where = f"step {step}" if isinstance(step, int) else f"{step} weights"
        print(f"\nevaluation of {args.workdir} at {where}:")
        print(format_table(metrics))
        print(f"\nwrote {path}")
    return 0
