"""Compiled memory, collectives and time of a contrastive loss plus its gradient over a mesh.

    python tools/bench_loss.py --loss clip --impl ring --batch 65536 --dim 512 --devices 8 \\
        --tile 1024 --compile-only --json
    python tools/bench_loss.py --loss siglip --impl all_gather --batch 4096 --dim 64 --devices 8

The function compiled is what the trainer differentiates: `jaxclip.losses.objective_over_mesh`
over a ("data",) mesh of --devices devices with the global batch split over it, and its gradient
with respect to both embeddings, the logit scale and (SigLIP) the bias. It reports XLA's
per-device scratch (`temp_bytes`, from compiled.memory_analysis()), the collective-permutes and
all-gathers in the optimised HLO (in all, and inside loop bodies: the ring's per-step count), the
compile time and, without --compile-only, the median time of --steps calls on random unit
vectors. `--devices N` fakes N CPU devices (set before jax loads); under an already imported jax
(the tests) the first N devices are used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_WHILE_BODY = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name is not None and line.strip() != "}":
            comps[name].append(line)
    return comps


def count_ops(hlo: str, op: str) -> dict[str, int]:
    """Occurrences of an HLO op (sync or async-start form) in the module and inside loop bodies
    (a loop body's count is what one iteration issues, i.e. per ring step)."""
    pattern = re.compile(rf"\b{re.escape(op)}(?:-start)?\(")
    comps = _computations(hlo)
    own = {n: sum(bool(pattern.search(line)) for line in lines) for n, lines in comps.items()}

    def reach(name, seen):  # a body's count includes the computations it calls
        if name in seen or name not in comps:
            return 0
        seen.add(name)
        total = own[name]
        for line in comps[name]:
            for callee in _CALLS.findall(line):
                total += reach(callee, seen)
        return total

    bodies = {b for lines in comps.values() for line in lines for b in _WHILE_BODY.findall(line)}
    in_loops = sum(reach(b, set()) for b in bodies)
    return {"total": sum(own.values()), "in_loops": in_loops}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    p.add_argument("--impl", choices=("all_gather", "ring", "dense"), default="ring")
    p.add_argument("--batch", type=int, default=4096, help="global batch B")
    p.add_argument("--dim", type=int, default=512, help="embedding dim d")
    p.add_argument("--devices", type=int, default=8, help="devices in the ('data',) mesh")
    p.add_argument("--tile", type=int, default=0, help="ring column tile (0 = whole block)")
    p.add_argument("--compile-only", action="store_true", help="skip the timed calls")
    p.add_argument("--steps", type=int, default=5, help="timed calls")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.batch % args.devices:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --devices {args.devices}")
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxclip import config, losses, sharding
    from jaxclip.models import Encoded, l2_normalize

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"--devices {args.devices}: jax has only {len(jax.devices())} devices "
                         "(it was imported before the flag could be set)")
    cfg = config.defaults().loss
    cfg.name, cfg.impl = args.loss, args.impl
    with cfg.ignore_type():  # `loss.tile` may not be a config key yet; the ring reads .get()
        cfg.tile = args.tile
    mesh = sharding.make_mesh(dict(data=args.devices, fsdp=1, tensor=1),
                              devices=jax.devices()[:args.devices])
    objective = losses.objective_over_mesh(cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)

    def loss_and_grads(img, txt, scale, bias):
        def f(a, t, s, c):
            return objective(Encoded.of_pair(a, t, s, c if args.loss == "siglip" else None))[0]

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3))(img, txt, scale, bias)

    emb = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32, sharding=batch_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(loss_and_grads).lower(emb, emb, scalar, scalar).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    permutes = count_ops(hlo, "collective-permute")
    gathers = count_ops(hlo, "all-gather")
    out = {
        "loss": args.loss, "impl": args.impl, "batch": args.batch, "dim": args.dim,
        "devices": args.devices, "tile": args.tile,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1),
        "collective_permutes": permutes["total"],
        "collective_permutes_per_step": permutes["in_loops"],
        "all_gathers": gathers["total"],
        "compile_s": round(compile_s, 2),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "machine": platform.machine(),
    }
    if not args.compile_only:
        rng = np.random.default_rng(0)
        img, txt = (jax.device_put(l2_normalize(rng.normal(size=(args.batch, args.dim))
                                                .astype(np.float32)), batch_sh) for _ in range(2))
        scale, bias = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
        jax.block_until_ready(compiled(img, txt, scale, bias))  # warm-up
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(img, txt, scale, bias))
            times.append(time.perf_counter() - t0)
        out["time_ms"] = round(1e3 * float(np.median(times)), 2)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>30}: {value}")
    return out


if __name__ == "__main__":
    main()
