"""The `jaxclip` command line: `jaxclip <subcommand> ...`.

    jaxclip train --config configs/demo.py --workdir runs/demo [--config.train.steps=200 ...]
    jaxclip data build --source folder --input captions.csv --images-root imgs/ --out DIR
    jaxclip eval --workdir runs/demo [--config configs/demo.py] [--step 300] [--only val]
    jaxclip export --workdir runs/demo [--step N] --format hf|open_clip --out DIR
    jaxclip convert --from hf|open_clip SRC --out DIR [--context-length N]

Config overrides are `--config.<dotted key>=<value>` (or `--config.<key> <value>`); a key that is
not in the schema or a value of the wrong type is an error naming the key. Errors are one line
(exit 2: usage or config; 1: a runtime failure); `--debug` or JAXCLIP_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxclip import config


def _split_overrides(extra: list[str]) -> list[str]:
    """['--config.a=1', '--config.b', '2'] -> ['a=1', 'b=2']; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise SystemExit(f"jaxclip: unrecognised argument {arg!r} (config overrides look like "
                             "--config.train.steps=200)")
        key = arg[len("--config."):]
        if "=" not in key:
            if i + 1 >= len(extra):
                raise SystemExit(f"jaxclip: override {arg!r} has no value")
            key = f"{key}={extra[i + 1]}"
            i += 1
        out.append(key)
        i += 1
    return out


def _load_config(args, extra) -> config.ConfigDict:
    try:
        return config.load(args.config, _split_overrides(extra))
    except (config.ConfigError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"jaxclip: bad config: {e}") from None


def cmd_train(args, extra) -> int:
    cfg = _load_config(args, extra)
    from jaxclip import distributed, train
    from jaxclip.preemption import EXIT_PREEMPTED, Preempted

    distributed.maybe_initialize()
    try:
        metrics = train.train(cfg, args.workdir, stop_at=args.stop_at)
    except Preempted as e:
        print(f"jaxclip: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/") and
             not k.endswith("/seconds")}
    if evals:
        width = max(map(len, evals))
        print("\nfinal evaluation:")
        for k, v in sorted(evals.items()):
            print(f"  {k:<{width}}  {v:.4f}")
    return 0


def cmd_eval(args, extra) -> int:
    from jaxclip.evals import standalone

    return standalone.main(args, _split_overrides(extra))


def cmd_data_build(args, extra) -> int:
    """Builds a dataset directory; prints per-split counts and skip reasons. Errors are one line
    on stderr: exit 2 for a flag of another --source, 1 for a failed build."""
    if extra:
        raise SystemExit(f"jaxclip data build: unrecognised arguments {extra}")
    import shlex

    from jaxclip.data import build, records
    from jaxclip.data.sources import MODULES

    for name, module in MODULES.items():
        given = [d for d in module.ARG_DESTS if getattr(args, d, None) is not None]
        if name != args.source and given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            print(f"error: {flags} belong(s) to --source {name}, not {args.source}",
                  file=sys.stderr)
            return EXIT_USAGE
    try:
        source = MODULES[args.source].from_args(args)
        manifest = build.build_dataset(
            source, args.out, num_shards=args.num_shards, workers=args.workers,
            max_image_size=args.max_image_size, jpeg_quality=args.jpeg_quality,
            progress=not args.no_progress, command=shlex.join(sys.argv))
    except (ValueError, KeyError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    for split, entry in manifest.splits.items():
        print(f"{split}: {entry['num_records']} records in {len(entry['shards'])} shard(s)")
    for reason, count in sorted(manifest.skipped.items()):
        example = (manifest.info.get("skip_examples", {}).get(reason) or [""])[0]
        print(f"skipped {count} ({reason}), e.g. {example}")
    print(f"wrote {os.path.join(args.out, records.MANIFEST)}")
    return 0


def cmd_export(args, extra) -> int:
    if extra:
        raise SystemExit(f"jaxclip export: unrecognised arguments {extra}")
    from jaxclip import distributed
    from jaxclip.interop import export

    distributed.maybe_initialize()  # every host restores its shards and joins the gathers
    try:
        export.export(args.workdir, args.out, args.format, step=args.step)
    except (ValueError, FileNotFoundError) as e:  # unexportable model, bad tensors, no dir
        raise SystemExit(f"jaxclip export: {e}") from None
    print(f"wrote {args.format} checkpoint to {args.out}")
    return 0


def cmd_convert(args, extra) -> int:
    if extra:
        raise SystemExit(f"jaxclip convert: unrecognised arguments {extra}")
    from jaxclip.interop import sources

    try:
        pre = sources.convert(args.src, args.out, source_format=args.source_format,
                              context_length=args.context_length)
    except (ValueError, FileNotFoundError) as e:  # unknown/missing/mis-shaped tensors, ...
        raise SystemExit(f"jaxclip convert: {e}") from None
    print(f"wrote {len(pre.params)} parameters ({pre.kind}) and config.json to {args.out}")
    return 0


def _add_interop_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a workdir's checkpoint as a HF CLIPModel or "
                                      "open_clip directory")
    p.add_argument("--workdir", required=True, help="training workdir (or a converted dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--format", required=True, choices=("hf", "open_clip"))
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("convert", help="import a HF (CLIPModel, BertModel) or open_clip "
                                       "checkpoint as a jaxclip params directory")
    p.add_argument("--from", dest="source_format", required=True, choices=("hf", "open_clip"))
    p.add_argument("src", help="the HF or open_clip directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--context-length", type=int, default=None,
                   help="keep only this many text positions (e.g. 32 of BERT's 512)")
    p.set_defaults(fn=cmd_convert)


def _add_data_build_parser(sub) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command",
                                                                       required=True)
    p = data.add_parser("build", help="convert a dataset into jaxclip record shards (parallel, "
                                      "resumable; bad inputs are skipped and counted)")
    from jaxclip.data.sources import MODULES
    from jaxclip.data.sources.common import DEFAULT_MAX_TEXT_BYTES

    p.add_argument("--source", required=True, choices=sorted(MODULES), help="input format")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--input", nargs="+", action="extend",
                   help="folder: the CSV/TSV/JSONL file; webdataset: tar paths, {000..999} brace "
                        "patterns or globs")
    p.add_argument("--split", help="output split name for folder/webdataset (default: train)")
    p.add_argument("--num-shards", type=int,
                   help="shards per split (default: ~10k records per shard, or one per tar)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel worker processes (default: all CPUs)")
    p.add_argument("--max-image-size", type=int,
                   help="shrink and re-encode images whose longer side exceeds this")
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="JPEG quality for re-encoded images (default: 90)")
    p.add_argument("--max-text-bytes", type=int, default=DEFAULT_MAX_TEXT_BYTES,
                   help="skip (and count) samples whose caption or metadata text is larger than "
                        "this, without reading it (webdataset members, folder captions; "
                        f"default: {DEFAULT_MAX_TEXT_BYTES})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for module in MODULES.values():  # each source's own flags (--csv-img-key, ...)
        module.add_arguments(p)
    p.set_defaults(fn=cmd_data_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_build_parser(sub)
    p = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
    p.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and exit at this step (the schedule still spans "
                        "train.steps; run again to continue)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("eval", help="evaluate a checkpoint with the configured evaluators "
                                    "(no training); prints a table, writes JSON")
    p.add_argument("--workdir", required=True,
                   help="the run's directory (checkpoints/), or imported weights (a jaxclip "
                        "convert output, a HF CLIPModel or an open_clip directory)")
    p.add_argument("--config", default=None,
                   help="config file (default: the run's WORKDIR/config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only these evaluators (default: all in config.evals)")
    p.add_argument("--out", default=None, help="JSON path (default: WORKDIR/eval_STEP.json)")
    p.set_defaults(fn=cmd_eval)
    _add_interop_parsers(sub)
    return parser


def _compilation_cache() -> None:
    """Reuse compiled programs across runs (compiling the train step is seconds to minutes);
    JAX_COMPILATION_CACHE_DIR, when set (the launch/ env files set it), takes precedence."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    from jaxclip.data.builtin import cache_root

    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(cache_root()),
                                                                "xla"))


# Exit codes: 0 done, 1 a runtime failure, 2 a usage or config error (argparse's code too),
# 143 preempted (checkpoint written; rerun to resume), 3 hung (jaxclip.watchdog).
EXIT_RUNTIME, EXIT_USAGE = 1, 2


def _usage_errors() -> tuple[type[BaseException], ...]:
    from jaxclip.checkpoint import CheckpointMismatchError

    return (config.ConfigError, CheckpointMismatchError, FileNotFoundError, NotADirectoryError)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, config.ConfigError | OSError) else f"{type(e).__name__}: {e}"
    if isinstance(e, KeyError) and e.args:  # KeyError's str() quotes its message
        text = f"{type(e).__name__}: {e.args[0]}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand. A failure is one line on stderr (what went wrong, with a hint) and an
    exit code; the traceback only with --debug or JAXCLIP_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("JAXCLIP_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _compilation_cache()
    name = " ".join(a for a in (args.command, getattr(args, "data_command", None)) if a)
    try:
        return args.fn(args, extra)
    except SystemExit as e:
        if isinstance(e.code, str):  # our own usage errors carry their message
            print(e.code if e.code.startswith("jaxclip") else f"jaxclip {name}: {e.code}",
                  file=sys.stderr)
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        print(f"jaxclip {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        code = EXIT_USAGE if isinstance(e, _usage_errors()) else EXIT_RUNTIME
        print(f"jaxclip {name}: error: {_one_line(e)}", file=sys.stderr)
        print("  (rerun with --debug or JAXCLIP_DEBUG=1 for the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
