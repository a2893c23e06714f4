"""Train-step throughput, MFU and compiled memory of any config on this machine, data excluded.

    python tools/bench_train.py --config configs/demo.py                # the demo model, here
    python tools/bench_train.py --model ViT-B-16 --config.model.dtype=bfloat16 \\
        --config.train.batch_size=256                                   # ViT-B/16 on a GPU
    python tools/bench_train.py --config configs/demo.py --devices 8 --config.loss.impl=ring
    python tools/bench_train.py --config configs/bench_tiny.py --batch 64   # see bench_peer.py

`--config` takes an experiment's config as is; without it, the model is the registry's `--model`
(the standard geometry: 224 px, context 77) on the default training settings.

The step is the trainer's own (`jaxclip.train.make_train_step`: forward, loss over the mesh,
backward, AdamW), compiled ahead of time. The batch is synthetic (random pixels and token ids,
placed on the devices once), so this measures the step alone: the ceiling of the trainer's
`samples_per_sec` when the input pipeline keeps up (tools/bench_data.py measures that side).
After --warmup steps it times --steps steps with one device sync at the end and reports
samples/s, MFU (analytic FLOPs per sample from jaxclip/flops.py times samples/s over the device
peak the trainer uses: datasheet bf16/fp32 on TPU/GPU, a measured float32 matmul rate on CPU),
compile time, and XLA's per-device memory plan for the step (scratch, arguments, outputs), as
text and then as one JSON line.
`--devices N` fakes N CPU devices (set before jax loads) to look at sharded layouts on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="experiment config (overrides as in training)")
    p.add_argument("--model", default="ViT-B-32", help="registry size when there is no --config")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")
    p.add_argument("--batch", type=int, default=0,
                   help="global batch size (default: the config's train.batch_size)")
    p.add_argument("--json", help="also write the result to this file")
    args, extra = p.parse_known_args(argv)
    if args.devices:
        if "jax" in sys.modules:
            raise SystemExit("--devices must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")

    import jax
    import numpy as np

    from jaxclip import cli, config, flops, sharding, train

    try:
        overrides = cli._split_overrides(extra)
        if args.batch:
            overrides.append(f"train.batch_size={args.batch}")
        cfg = config.load_or_size(args.config, args.model, overrides)
    except (config.ConfigError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"bench_train: bad config: {e}") from None
    m = train.build(cfg)
    batch_size, n_dev = cfg.train.batch_size, m.mesh.size
    if batch_size % sharding.batch_divisor(m.mesh):
        raise SystemExit(f"train.batch_size={batch_size} does not divide over the mesh's batch "
                         f"axes ({sharding.batch_divisor(m.mesh)} devices)")
    state = train.init_state(m)
    t0 = time.perf_counter()
    step = train.make_train_step(m).lower(m.abstract_state, train.batch_specs(cfg, m.mesh),
                                          *train.step_args(m)).compile()
    compile_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    local = batch_size // jax.process_count()
    size, ctx = cfg.model.image.image_size, cfg.model.text.context_length
    batch = sharding.global_batch({
        "image": rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
        "text": rng.integers(1, cfg.model.text.vocab_size, (local, ctx), dtype=np.int32),
    }, m.mesh)
    for _ in range(args.warmup):
        state, metrics = step(state, batch, *train.step_args(m))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, *train.step_args(m))
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t0

    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise SystemExit(f"bench_train: the loss is {loss}: the numbers would mean nothing")
    samples_per_sec = batch_size * args.steps / seconds
    flops_per_sample = flops.train_flops_per_sample(cfg, batch_size)
    peak, peak_source = flops.device_peak(cfg.model.dtype, cfg.train.peak_tflops)
    mem = step.memory_analysis()
    result = {
        "model": cfg.model.name or "custom", "dtype": cfg.model.dtype, "loss": cfg.loss.name,
        "loss_impl": cfg.loss.impl, "batch_size": batch_size, "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind, "platform": platform.machine(),
        "jax": jax.__version__, "steps": args.steps, "step_seconds": seconds / args.steps,
        "samples_per_sec": samples_per_sec, "flops_per_sample": flops_per_sample,
        "peak_flops_per_device": peak, "peak_source": peak_source,
        "mfu": samples_per_sec * flops_per_sample / (peak * n_dev) if peak else None,
        "compile_seconds": compile_s, "final_loss": loss,
    }
    if mem is not None:
        result.update(temp_mib=mem.temp_size_in_bytes / 2**20,
                      argument_mib=mem.argument_size_in_bytes / 2**20,
                      output_mib=mem.output_size_in_bytes / 2**20)
    if jax.process_index() == 0:
        mfu = "n/a (no known peak)" if result["mfu"] is None else f"{result['mfu']:.3f}"
        print(f"{result['model']} {result['dtype']}, {result['loss']} ({result['loss_impl']}), "
              f"batch {batch_size} on {n_dev} x {result['device_kind']}, jax {jax.__version__}")
        img, txt = cfg.model.image, cfg.model.text
        print(f"  image {img.image_size} px / patch {img.patch_size}, width {img.width} x "
              f"{img.depth} layers; text context {txt.context_length}, width {txt.width} x "
              f"{txt.depth} layers")
        print(f"  step {1e3 * result['step_seconds']:.1f} ms   {samples_per_sec:.1f} samples/s   "
              f"MFU {mfu} ({peak_source})")
        print(f"  {flops_per_sample:.3e} FLOPs/sample   compile {compile_s:.1f} s   "
              f"loss {loss:.3f}")
        if mem is not None:
            print(f"  per-device memory plan: scratch {result['temp_mib']:.0f} MiB, arguments "
                  f"{result['argument_mib']:.0f} MiB, outputs {result['output_mib']:.0f} MiB")
        # One machine-readable line last, for scripts and for comparing runs.
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
