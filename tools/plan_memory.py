"""Per-device memory and FLOPs of a training step at any scale, planned without the hardware.

    python tools/plan_memory.py --model ViT-B-16 --devices 64 --mesh fsdp=8 --batch 32768 \\
        --config.model.dtype=bfloat16
    python tools/plan_memory.py --model ViT-L-14 --devices 256 --mesh data=32,fsdp=8 \\
        --batch 65536 --config.model.remat=full --config.loss.impl=ring --json
    python tools/plan_memory.py --config configs/demo.py --devices 8 --mesh fsdp=8
    python tools/plan_memory.py --model ViT-B-16 --config.model.dtype=bfloat16 --fit \
        --batch 2048,1536,1024,768,512 --hlo step.hlo        # on a GPU: the largest that fits

The step is the trainer's own (`train.build`, then `train.make_train_step(...)` lowered against
the abstract train state and an abstract global batch, and compiled), so nothing is allocated and
any model fits on a laptop: only XLA's plan is made. Printed per device: the parameters,
optimizer state and batch the step takes, XLA's temp (scratch) and output buffers, compile time,
the analytic FLOPs per sample (jaxclip/flops.py) and XLA's cost-analysis FLOPs. XLA counts a
while loop's body once, so with `model.scan_layers` (the default) its figure holds one layer per
tower: compare it between meshes of one model, not with the analytic count.

`--devices N` fakes N CPU devices (XLA_FLAGS, set before jax loads; JAX_PLATFORMS=cpu). `--mesh`
gives ("data", "fsdp", "tensor") sizes, e.g. `data=32,fsdp=8`; unnamed axes are 1, unless the
named ones leave devices over, which then go to `data`. Without `--mesh` the config's mesh is used.

On fake CPU devices the plan is XLA:CPU's, an upper bound for GPU/TPU: XLA:CPU computes bfloat16
in float32 (so bf16 activations count double) and materialises attention scores, where a fused
GPU/TPU attention kernel does not.

`--fit` plans the `--batch` candidates from the largest down on the real device(s) and reports
the first whose peak (arguments + temp + outputs not aliased to donated arguments) fits in
`--memory-fraction` of device 0's memory. The plan lists the cuDNN attention kernels in the
optimised HLO (`cudnn_attention_calls`: how `model.attn_impl` resolved on this backend).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time


def parse_mesh(text: str) -> dict[str, int]:
    axes = dict(data=1, fsdp=1, tensor=1)
    named = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in axes:
            raise SystemExit(f"plan_memory: --mesh items look like data=4,fsdp=2 (axes "
                             f"{', '.join(axes)}), got {item!r}")
        named[key] = int(value)
    axes.update(named)
    if "data" not in named and -1 not in named.values():
        axes["data"] = -1  # whatever the named axes leave over
    return axes


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


# cuDNN's fused attention appears in optimised GPU HLO as custom calls to these targets (forward
# "__cudnn$fmhaSoftmax...", backward "...Backward"); XLA's own attention is dots and a softmax.
_CUDNN_ATTENTION = re.compile(r'custom_call_target="(__cudnn\$fmha[^"]*)"')
_SHAPE = re.compile(r"\b(?:bf16|f16|f32)\[([\d,]+)\]")


def cudnn_attention_calls(hlo: str) -> list[dict]:
    """The cuDNN attention kernels of an optimised HLO module: target and first operand shape."""
    calls = []
    for line in hlo.splitlines():
        m = _CUDNN_ATTENTION.search(line)
        if m:
            # The first shape on the line is the result tuple's first element; the query operand
            # comes after "custom-call(". Both carry the (batch, seq, heads, head_dim) layout.
            args = line.split("custom-call(", 1)[-1]
            shape = _SHAPE.search(args) or _SHAPE.search(line)
            calls.append({"target": m.group(1),
                          "shape": [int(d) for d in shape.group(1).split(",")] if shape else []})
    return calls


def plan(cfg, hlo_path: str = "") -> dict:
    """Compiles the trainer's step for `cfg` on the current devices; returns the plan.

    With `hlo_path`, the optimised HLO text is also written there."""
    import jax

    from jaxclip import flops, sharding, train

    m = train.build(cfg)
    batch, n_dev = cfg.train.batch_size, m.mesh.size
    if batch % sharding.batch_divisor(m.mesh):
        raise SystemExit(f"plan_memory: batch {batch} does not divide over the mesh's batch axes "
                         f"({sharding.batch_divisor(m.mesh)} devices)")
    specs = train.batch_specs(cfg, m.mesh)
    t0 = time.perf_counter()
    compiled = train.make_train_step(m).lower(m.abstract_state, specs,
                                              *train.step_args(m)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_sample = flops.train_flops_per_sample(cfg, batch)
    s = m.abstract_state
    return {
        "model": cfg.model.name or "custom", "dtype": cfg.model.dtype,
        "remat": cfg.model.remat, "loss": cfg.loss.name, "loss_impl": cfg.loss.impl,
        "devices": n_dev, "mesh": dict(m.mesh.shape), "global_batch": batch,
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "param_bytes": _bytes_per_device((s.params, s.frozen)),
        "opt_state_bytes": _bytes_per_device(s.opt_state),
        "batch_bytes": _bytes_per_device(specs),
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        # Donated state aliases its outputs, so they are not counted twice.
        "peak_bytes": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                       + mem.output_size_in_bytes - mem.alias_size_in_bytes),
        "compile_seconds": compile_s,
        "flops_per_sample": per_sample,
        "analytic_flops_per_device": per_sample * batch / n_dev,
        "xla_flops_per_device": float(cost.get("flops", float("nan"))),
        "attn_impl": cfg.model.attn_impl,
        "cudnn_attention_calls": cudnn_attention_calls(hlo),
        "device_memory_bytes": device_memory_bytes(),
    }


def device_memory_bytes() -> int | None:
    """What the allocator of device 0 may hold (GPU/TPU), or None where it reports no limit."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def fit(cfg, batches: list[int], fraction: float, memory_bytes: int | None,
        hlo_path: str = "") -> dict:
    """Plans the batches from largest to smallest and returns the first plan whose peak fits in
    `fraction` of the device memory, marked `fits`; each tried batch is listed in `tried`.
    The HLO written to `hlo_path` is the last plan's (the one returned)."""
    tried = []
    for batch in sorted(batches, reverse=True):
        cfg.train.batch_size = batch
        result = plan(cfg, hlo_path)
        limit = memory_bytes or result["device_memory_bytes"]
        if limit is None:
            raise SystemExit("plan_memory: --fit needs --memory-gib on a backend that reports no "
                             "memory limit (CPU)")
        tried.append({"global_batch": batch, "peak_bytes": result["peak_bytes"]})
        if result["peak_bytes"] <= fraction * limit:
            return {**result, "fits": True, "memory_limit_bytes": int(fraction * limit),
                    "tried": tried}
    return {**result, "fits": False, "memory_limit_bytes": int(fraction * limit), "tried": tried}


def _report(r: dict) -> str:
    def mib(key: str) -> str:
        return f"{r[key] / 2**20:12,.1f} MiB"

    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    return "\n".join([
        f"{r['model']} {r['dtype']}, remat {r['remat']}, {r['loss']} ({r['loss_impl']}); global "
        f"batch {r['global_batch']:,} on {r['devices']} {r['platform']} devices ({mesh}), "
        f"jax {r['jax']}",
        "per device:",
        f"  parameters       {mib('param_bytes')}",
        f"  optimizer state  {mib('opt_state_bytes')}",
        f"  batch            {mib('batch_bytes')}",
        f"  arguments (XLA)  {mib('argument_bytes')}",
        f"  temp (XLA)       {mib('temp_bytes')}",
        f"  outputs (XLA)    {mib('output_bytes')} ({r['alias_bytes'] / 2**20:,.1f} MiB aliased "
        "to donated arguments)",
        f"  peak             {mib('peak_bytes')}",
        f"  FLOPs per step   {r['analytic_flops_per_device']:.3e} analytic, "
        f"{r['xla_flops_per_device']:.3e} XLA cost analysis (loop bodies counted once)",
        f"analytic FLOPs per sample {r['flops_per_sample']:.3e}; compile "
        f"{r['compile_seconds']:.1f} s",
        f"attention {r['attn_impl']}: {len(r['cudnn_attention_calls'])} cuDNN attention kernels",
    ] + ([f"fit: {'fits' if r['fits'] else 'NOTHING fits'} in "
          f"{r['memory_limit_bytes'] / 2**30:.1f} GiB; tried "
          + ", ".join(f"{t['global_batch']} ({t['peak_bytes'] / 2**30:.1f} GiB)"
                      for t in r["tried"])] if "fits" in r else []))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="experiment config (overrides as in training)")
    p.add_argument("--model", default="ViT-B-32", help="registry size when there is no --config")
    p.add_argument("--devices", type=int, default=0, help="fake this many CPU devices")
    p.add_argument("--mesh", help="mesh axis sizes, e.g. data=32,fsdp=8 (default: the config's)")
    p.add_argument("--batch", help="global batch (default: train.batch_size); with --fit, a "
                   "comma-separated list of candidates")
    p.add_argument("--fit", action="store_true", help="plan the --batch candidates from the "
                   "largest down; report the first whose peak fits the device memory")
    p.add_argument("--memory-gib", type=float, default=0.0,
                   help="device memory for --fit (default: what device 0 reports)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of the device memory the step may plan to use (--fit)")
    p.add_argument("--hlo", help="write the optimised HLO text of the step here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args, extra = p.parse_known_args(argv)
    if args.devices:
        if "jax" in sys.modules:
            raise SystemExit("plan_memory: --devices must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"  # the fake devices are CPU devices

    from jaxclip import cli, config

    try:
        overrides = cli._split_overrides(extra)
        cfg = config.load_or_size(args.config, args.model, overrides)
        if args.mesh:
            cfg.mesh.update(parse_mesh(args.mesh))
        batches = [int(b) for b in args.batch.split(",")] if args.batch else []
        if len(batches) > 1 and not args.fit:
            raise SystemExit("plan_memory: several --batch values need --fit")
        if batches:
            cfg.train.batch_size = batches[0]
        config.validate(cfg)
    except (config.ConfigError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"plan_memory: bad config: {e}") from None
    try:
        if args.fit:
            memory = int(args.memory_gib * 2**30) or None
            result = fit(cfg, batches or [cfg.train.batch_size], args.memory_fraction, memory,
                         args.hlo or "")
        else:
            result = plan(cfg, args.hlo or "")
    except ValueError as e:  # a mesh that does not fit the devices
        raise SystemExit(f"plan_memory: {e}") from None
    print(json.dumps(result) if args.json else _report(result))
    return result


if __name__ == "__main__":
    main()
