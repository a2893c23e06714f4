"""Intra-modal retrieval: how well a modality's embeddings find their own kind.

"Cross the Gap" (Mistretta et al. 2025, arXiv 2502.04263) shows that CLIP's image->image
retrieval lags what its image->text structure suggests (intra-modal misalignment), and SLIP's
image-image term (losses/simclr.py) is one remedy. This measures it on any labelled eval split:

    P@k = mean over queries q of |{g in N_k(q) : label(g) = label(q)}| / k

N_k(q) are the k nearest other items by cosine (the query itself left out; exact ties at the
k-th place fall either way). `chance` is the P@k of a random ordering: the mean over q of the
fraction of the other items sharing q's label. Host numpy, one (chunk x N) score block at a
time: for eval splits of up to some ten thousand items, which is what it is for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def same_label_precision(emb: np.ndarray, labels: np.ndarray, ks: Sequence[int], *,
                         prefix: str = "i2i", chunk: int = 1024) -> dict[str, float]:
    """{prefix_p{k}: P@k for k in ks, prefix_chance: its value for a random ordering}."""
    emb = np.asarray(emb, np.float32)
    labels = np.asarray(labels)
    n = len(emb)
    if n < 2:
        raise ValueError("same-label precision needs at least two items")
    kmax = min(max(ks), n - 1)
    hits = np.zeros(kmax)
    for start in range(0, n, chunk):
        s = emb[start:start + chunk] @ emb.T
        rows = np.arange(len(s))
        s[rows, start + rows] = -np.inf  # leave the query out
        cand = np.argpartition(-s, kmax - 1, axis=1)[:, :kmax]  # the kmax best, unordered
        order = np.argsort(-np.take_along_axis(s, cand, 1), axis=1, kind="stable")
        top = np.take_along_axis(cand, order, 1)
        hits += (labels[top] == labels[start:start + chunk, None]).sum(0)
    cum = np.cumsum(hits) / n  # expected same-label items among the first k
    out = {f"{prefix}_p{k}": float(cum[min(k, kmax) - 1] / min(k, kmax)) for k in ks}
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    out[f"{prefix}_chance"] = float(np.mean((counts[inverse] - 1) / (n - 1)))
    return out
