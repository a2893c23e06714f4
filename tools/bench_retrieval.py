"""Times retrieval_metrics at growing gallery sizes and shows its memory stays linear.

For each size N it runs, in a fresh subprocess (so peak RSS is per size, not a running maximum):
random unit-norm image and text embeddings (N each, one caption per image, d = 512 by default),
one retrieval_metrics call (both directions; includes the ~1 s compile), the process's peak RSS,
and XLA's compiled memory analysis of the rank program: `temp` is the scratch of the chunk loop
and should grow like query_chunk x N / n_devices, against the 4 N^2 bytes a dense score matrix
would take.

    python tools/bench_retrieval.py                       # 10k, 25k, 50k, 100k on this machine
    python tools/bench_retrieval.py --sizes 1000 2000 --devices 8   # 8 fake CPU devices

Sizes whose predicted time (quadratic extrapolation from the previous size) exceeds --max-seconds
are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(n: int, dim: int, query_chunk: int, devices: int) -> dict:
    import jax
    import numpy as np

    from jaxclip.evals import retrieval

    mesh = None
    if devices > 1:
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    # Captions = image + noise at cosine ~0.24 (~5 sigma above a random pair at d = 512), so R@1
    # falls off with N rather than sitting at 1 or at ~1/N.
    txt = img + rng.standard_normal((n, dim), dtype=np.float32) * (4 / dim**0.5)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    rss_data = _rss_mib()

    t0 = time.perf_counter()
    mem = retrieval.compiled_memory(n, n, dim, query_chunk=query_chunk, mesh=mesh)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = retrieval.retrieval_metrics(
        img, txt, np.arange(n), query_chunk=query_chunk, mesh=mesh
    )
    seconds = time.perf_counter() - t0
    return {
        "n": n,
        "dim": dim,
        "query_chunk": query_chunk,
        "devices": devices,
        "seconds": seconds,
        "compile_seconds": t_compile,
        "rss_after_data_mib": rss_data,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "temp_mib": None if mem is None else mem["temp"] / 2**20,
        "argument_mib": None if mem is None else mem["argument"] / 2**20,
        "dense_scores_mib": 4 * n * n / 2**20,
        "i2t_r1": metrics["i2t_r1"],
        "t2i_r1": metrics["t2i_r1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 25_000, 50_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--query-chunk", type=int, default=512)
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices (mesh over 'data')")
    p.add_argument("--max-seconds", type=float, default=400.0)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.dim, args.query_chunk, args.devices)))
        return

    env = dict(os.environ)
    if args.devices > 1:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")

    header = (
        f"{'N':>8} {'seconds':>8} {'compile':>8} {'peakRSS':>9} {'dataRSS':>9} "
        f"{'temp':>9} {'dense NxN':>10} {'i2t R@1':>8}"
    )
    print(header)
    rows, last = [], None
    for n in sorted(args.sizes):
        if last is not None:
            predicted = last["seconds"] * (n / last["n"]) ** 2
            if predicted > args.max_seconds:
                print(f"{n:>8} skipped: predicted {predicted:.0f} s > --max-seconds")
                continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--dim",
               str(args.dim), "--query-chunk", str(args.query_chunk), "--devices",
               str(args.devices)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{n:>8} failed:\n{done.stderr[-2000:]}")
            break
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        last = row
        temp = "n/a" if row["temp_mib"] is None else f"{row['temp_mib']:.0f} MiB"
        print(
            f"{n:>8} {row['seconds']:>8.1f} {row['compile_seconds']:>8.2f} "
            f"{row['peak_rss_mib']:>5.0f} MiB {row['rss_after_data_mib']:>5.0f} MiB "
            f"{temp:>9} {row['dense_scores_mib']:>6.0f} MiB {row['i2t_r1']:>8.3f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
