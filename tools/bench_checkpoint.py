"""What checkpoint integrity costs: fingerprinting the train state, against saving and restoring it.

    python tools/bench_checkpoint.py --config configs/demo.py
    python tools/bench_checkpoint.py --model ViT-B-16          # a ViT-B/16-sized state (~1.7 GB)

Builds the trainer's TrainState for the config (parameters and AdamW moments, initialised on the
devices), then times, each --repeats times after one untimed warm-up:
  finite_check `jaxclip.integrity.finite` (a float pass per array): the one check the training
               loop waits for before a save (a non-finite state is never saved);
  fingerprint  the 64-bit digests of every array (`integrity.digests_later`, awaited): computed
               on the devices while Orbax writes and saved by a background thread, so the loop
               does not wait for it; restore pays it once after reading;
  save_block   the part of `Checkpointer.save` the training loop waits for (the finite check,
               dispatching the digests, Orbax's copy of the device arrays to host memory);
  save_total   until the checkpoint is committed on disk;
  orbax_only_* the same save through Orbax alone (no check, no fingerprints): the baseline;
  restore      `Checkpointer.restore` (read, reshard, fingerprint, verify).
Prints one JSON object (medians in seconds, the state's size, machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="experiment config (overrides as in training)")
    p.add_argument("--model", default="ViT-B-16", help="registry size when there is no --config")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args, extra = p.parse_known_args(argv)

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jaxclip import checkpoint, cli, config, integrity, train

    overrides = cli._split_overrides(extra)
    cfg = config.load_or_size(args.config, args.model, overrides)
    m = train.build(cfg)
    state = train.init_state(m)
    jax.block_until_ready(state)
    leaves = jax.tree.leaves(state)
    state_bytes = sum(x.size * x.dtype.itemsize for x in leaves)

    def timed(fn) -> list[float]:
        fn()  # warm-up: compilation, first allocation
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    finite_check = timed(lambda: integrity.finite(state))
    fingerprint = timed(lambda: integrity.digests_later(state)())
    root = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    ckpt = checkpoint.Checkpointer(root, every=1, keep=2)
    step = iter(range(1, 1 << 30))
    block, total = [], []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        ckpt.save(next(step), state, data={}, config=cfg.to_dict(), progress={}, force=True)
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        if i:  # the first save is the warm-up
            block.append(t1 - t0)
            total.append(t2 - t0)
    plain_block, plain_total = [], []  # the same save through Orbax alone: the baseline
    for i in range(args.repeats + 1):
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}),
            config=ocp.args.JsonSave(cfg.to_dict()), progress=ocp.args.JsonSave({}))
        t0 = time.perf_counter()
        ckpt._manager.save(next(step), args=items, force=True)
        t1 = time.perf_counter()
        ckpt._manager.wait_until_finished()
        t2 = time.perf_counter()
        if i:
            plain_block.append(t1 - t0)
            plain_total.append(t2 - t0)
    ckpt.save(next(step), state, data={}, config=cfg.to_dict(), progress={}, force=True)
    ckpt.wait()
    newest = ckpt.latest_step()
    restore = timed(lambda: jax.block_until_ready(
        ckpt.restore(newest, m.abstract_state)["state"]))
    ckpt.close()

    med = statistics.median
    result = {
        "config": args.config or args.model, "state_mb": round(state_bytes / 2**20, 1),
        "arrays": len(leaves), "finite_check_s": round(med(finite_check), 4),
        "fingerprint_s": round(med(fingerprint), 4),
        "fingerprint_gb_per_s": round(state_bytes / med(fingerprint) / 1e9, 2),
        "save_block_s": round(med(block), 3), "save_total_s": round(med(total), 3),
        "orbax_only_save_block_s": round(med(plain_block), 3),
        "orbax_only_save_total_s": round(med(plain_total), 3),
        "restore_s": round(med(restore), 3),
        "finite_check_share_of_save_block": round(med(finite_check) / med(block), 3),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "jax": jax.__version__,
        "orbax": getattr(ocp, "__version__", "?"), "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
