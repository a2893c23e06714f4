"""Turns a run's metrics.jsonl into PNG curves, for people who would rather look than read.

    python tools/plot_metrics.py runs/demo                 # writes runs/demo/plots/*.png
    python tools/plot_metrics.py runs/demo --out /tmp/plots

Writes, for whatever the run logged:
    loss.png         training loss (and the in-batch i2t/t2i accuracy when logged)
    lr.png           learning rate
    logit_scale.png  the learned log logit scale (and exp of it, the inverse temperature)
    throughput.png   samples/s, with MFU on a second axis
    grad_norm.png    global gradient norm
    eval_NAME.png    one panel per metric of evaluator NAME (eval/NAME/...) against step
A resumed run appends to metrics.jsonl and may log a step twice; the last value wins.

matplotlib is a dependency of this tool only, not of jaxclip: `pip install matplotlib`.
The metrics file is read as plain JSON lines, so neither jax nor jaxclip is imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

# Training curves: file name -> (title, [(metric, label)], [(metric, label)] on a second axis).
TRAIN_PLOTS = {
    "loss": ("training loss", [("loss", "loss")], [("i2t_acc", "in-batch i2t acc"),
                                                   ("t2i_acc", "in-batch t2i acc")]),
    "lr": ("learning rate", [("lr", "lr")], []),
    "logit_scale": ("logit scale", [("logit_scale", "log scale")],
                    [("temperature_inv", "exp(log scale)")]),
    "throughput": ("throughput", [("samples_per_sec", "samples/s")], [("mfu", "MFU")]),
    "grad_norm": ("gradient norm", [("grad_norm", "global norm")], []),
}


def _number(value) -> float | None:
    """A logged value as float; MetricWriter writes non-finite values as strings ("nan")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def read_series(path: str) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step, the last logged value per step."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write can leave a partial last line; skip it, say so.
                print(f"{path}:{lineno}: skipping a line that is not JSON", file=sys.stderr)
                continue
            step = row.get("step")
            if not isinstance(step, int):
                continue
            for key, value in row.items():
                number = _number(value)
                if key not in ("step", "time") and number is not None:
                    by_key[key][step] = number
    return {k: sorted(v.items()) for k, v in by_key.items()}


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, series, key: str, label: str, **kw) -> bool:
    points = series.get(key)
    if not points:
        return False
    steps, values = zip(*points)
    marker = "o" if len(points) <= 30 else None  # sparse curves (evals) show their points
    ax.plot(steps, values, label=label, marker=marker, markersize=3, **kw)
    return True


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot(series: dict[str, list[tuple[int, float]]], out_dir: str, plt) -> list[str]:
    """Writes the PNGs for the metrics present; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (title, left, right) in TRAIN_PLOTS.items():
        if not any(series.get(k) for k, _ in left):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in left:
            _draw(ax, series, key, label)
        if name == "lr" or (name == "loss" and _positive(series, "loss")):
            ax.set_yscale("log")
        ax.set_ylabel(left[0][1])
        handles, labels = ax.get_legend_handles_labels()
        if any(series.get(k) for k, _ in right):
            ax2 = ax.twinx()
            ax2.set_ylabel(", ".join(label for key, label in right if series.get(key)))
            for i, (key, label) in enumerate(right):
                _draw(ax2, series, key, label, color=f"C{i + 1}", alpha=0.8)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(handles, labels, loc="best", fontsize=8)
        path = os.path.join(out_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    evals: dict[str, list[str]] = defaultdict(list)
    for key in series:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "eval" and parts[2] != "seconds":
            evals[parts[1]].append(parts[2])
    for name, metrics in sorted(evals.items()):
        cols = min(4, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            _draw(ax, series, f"eval/{name}/{metric}", metric)
            ax.set_title(metric, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"eval/{name}")
        fig.supxlabel("step", fontsize=9)
        path = os.path.join(out_dir, f"eval_{_safe(name)}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _positive(series, key: str) -> bool:
    values = [v for _, v in series.get(key, [])]
    return bool(values) and all(v > 0 and math.isfinite(v) for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a run's directory (or its metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/plots)")
    args = parser.parse_args(argv)
    path = args.workdir
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"plot_metrics: {path} does not exist (is {args.workdir!r} a jaxclip workdir?)",
              file=sys.stderr)
        return 2
    plt = _import_pyplot()
    if plt is None:
        print("plot_metrics: matplotlib is not installed. It is a dependency of this tool only "
              "(not of jaxclip): pip install matplotlib", file=sys.stderr)
        return 2
    series = read_series(path)
    if not series:
        print(f"plot_metrics: {path} holds no metrics yet", file=sys.stderr)
        return 1
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")
    for p in plot(series, out_dir, plt):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
