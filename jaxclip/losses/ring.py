"""Memory-flat ring kernels for the softmax (CLIP) and sigmoid (SigLIP) losses (Inf-CL style).

Inside `shard_map`, shard k owns rows x_k (images) and y_k (texts), b of each. Only the text
tower travels: at ring step m shard k holds text block j = k - m and computes the b x b logits
L = s·x_k·y_jᵀ (+ bias), tile by tile (`tile` columns at a time, so scratch is O(b·tile)).

Forward (custom VJP residuals are the inputs plus O(b) vectors):
  softmax  the row log-sum-exp of L (image -> text) stays on shard k; the column log-sum-exp
           (text -> image) belongs to block j, so it travels with the text around the ring and is
           sent home by one last shift. One pass serves both directions of the symmetric loss, and
           each b x b block is multiplied once, not twice.
  sigmoid  the row sums of softplus(L) stay on shard k; nothing travels but the text.
Row / column maxima and their first global argmax travel alongside, for the accuracy metrics.

Backward: the blocks are recomputed while the text blocks travel the ring again together with
their gradient accumulator dy_j, so no shard ever stores another shard's embeddings; the
accumulator of block j comes home with one last shift.

Overlap: every step sends what the next step needs *before* multiplying the current block, and
the send does not depend on that multiply. Accumulators therefore trail their blocks by one step:
the accumulator a shard sends at step m is the one it finished at step m - 1, so each step has
exactly one collective-permute (data and accumulator packed together) in each pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NO_INDEX = float(2**30)  # "no argmax yet"; indices are stored as float32 (exact below 2**24)


def _shift(x, axis, n):
    """Shard k receives shard k-1's x (the identity when the batch is local)."""
    if axis is None or n == 1:
        return x
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def vary(tree, axis):
    """Marks replicated values as varying over `axis`, as scan carries and custom-VJP cotangents
    must have the same per-shard variance as the values they are combined with."""
    if axis is None:
        return tree
    names = axis if isinstance(axis, tuple) else (axis,)

    def varying(v):  # jax 0.10 keeps the set in `.mat.varying`, later versions in `.vma`
        aval = jax.typeof(v)
        return aval.vma if hasattr(aval, "vma") else aval.mat.varying

    def one(v):
        missing = tuple(a for a in names if a not in varying(v))
        return jax.lax.pcast(v, missing, to="varying") if missing else v

    return jax.tree.map(one, tree)


def _tiles(x, tile):
    """(b, ...) -> (b // tile, tile, ...): the column tiles of a block."""
    return x.reshape(x.shape[0] // tile, tile, *x.shape[1:])


def _untile(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _merge_max(a_max, a_idx, b_max, b_idx):
    """Running max with the first (lowest global index) argmax, as jnp.argmax breaks ties."""
    take = (b_max > a_max) | ((b_max == a_max) & (b_idx < a_idx))
    return jnp.where(take, b_max, a_max), jnp.where(take, b_idx, a_idx)


def _merge(kind, a, b):
    """Combines two partial statistics (reduction value, max, argmax) of the same rows."""
    red = jnp.logaddexp(a[0], b[0]) if kind == "softmax" else a[0] + b[0]
    return (red, *_merge_max(a[1], a[2], b[1], b[2]))


def _init(kind, b):
    red = jnp.full((b,), -jnp.inf if kind == "softmax" else 0.0, jnp.float32)
    return red, jnp.full((b,), -jnp.inf, jnp.float32), jnp.full((b,), _NO_INDEX, jnp.float32)


def _reduce(kind, logits, axis, offset):
    """Statistics of `logits` along `axis`: (log-sum-exp | softplus sum, max, global argmax)."""
    red = (jax.nn.logsumexp(logits, axis=axis) if kind == "softmax"
           else jax.nn.softplus(logits).sum(axis))
    idx = jnp.argmax(logits, axis=axis).astype(jnp.float32) + offset
    return red, logits.max(axis), idx


def _tile_size(b, tile):
    if tile <= 0 or tile >= b:
        return b
    if b % tile:
        raise ValueError(f"loss.tile={tile} must divide the per-device batch {b}")
    return tile


def _ring_fwd(kind, axis, n, tile, x, y, s, bias):
    """Per-row (and for softmax per-column, sent home) statistics over the whole global batch."""
    b, d = x.shape
    k = jnp.int32(0) if axis is None else jax.lax.axis_index(axis)
    t = _tile_size(b, tile)
    cols = kind == "softmax"

    def block(rows, yb, j):
        """Folds text block j into the row statistics; returns its column statistics."""

        def one_tile(rows, inp):
            yt, c0 = inp
            logits = s * (x @ yt.T) + bias  # (b, t): the only O(b·t) scratch
            rows = _merge(kind, rows, _reduce(kind, logits, 1, c0))
            col = _reduce(kind, logits, 0, (k * b).astype(jnp.float32)) if cols else ()
            return rows, col

        offsets = (j * b + jnp.arange(0, b, t)).astype(jnp.float32)
        rows, col = jax.lax.scan(one_tile, rows, (_tiles(yb, t), offsets))
        return rows, tuple(_untile(c) for c in col)

    def step(carry, m):
        yb, pend, rows = carry
        # Send first: the next block (and the column statistics finished last step) do not depend
        # on this step's matmul, so the permute can run while it computes.
        packed = jnp.concatenate([yb, jnp.stack(pend, 1)], 1) if cols else yb
        recv = _shift(packed, axis, n)
        rows, col = block(rows, yb, (k - m) % n)
        if cols:  # recv carries the partial column statistics of the block just multiplied
            pend = _merge(kind, tuple(recv[:, d + i] for i in range(3)), col)
        return (recv[:, :d], pend, rows), None

    pend0 = vary(_init(kind, b), axis) if cols else ()
    carry0 = (y, pend0, vary(_init(kind, b), axis))
    (_, pend, rows), _ = jax.lax.scan(step, carry0, jnp.arange(n))
    if cols:  # after n steps shard k holds block k+1's finished column statistics: send them home
        pend = tuple(_shift(jnp.stack(pend, 1), axis, n)[:, i] for i in range(3))
    return rows, pend


def _ring_bwd(kind, axis, n, tile, x, y, s, bias, row_red, col_red, g_row, g_col):
    """Gradients (dx, dy, ds, dbias) of Σ g_row·row_red (+ Σ g_col·col_red), blocks recomputed."""
    b, d = x.shape
    t = _tile_size(b, tile)
    cols = kind == "softmax"

    def block(acc, yb, lse_c, g_c):
        """d/dlogits of one text block, folded into dx, ds, dbias; returns dy of the block."""

        def one_tile(acc, inp):
            dx, ds, db = acc
            yt, lct, gct = inp
            dots = x @ yt.T
            logits = s * dots + bias
            if kind == "softmax":  # ∂lse_r/∂L_rj = softmax of row r; columns likewise
                grad = (g_row[:, None] * jnp.exp(logits - row_red[:, None])
                        + gct[None, :] * jnp.exp(logits - lct[None, :]))
            else:  # ∂softplus(L)/∂L = σ(L)
                grad = g_row[:, None] * jax.nn.sigmoid(logits)
            dx = dx + s * (grad @ yt)
            return (dx, ds + jnp.sum(grad * dots), db + jnp.sum(grad)), s * (grad.T @ x)

        acc, dyt = jax.lax.scan(one_tile, acc, (_tiles(yb, t), _tiles(lse_c, t), _tiles(g_c, t)))
        return acc, _untile(dyt)

    def step(carry, _):
        static, pend, acc = carry
        # One permute per step: the next block with its column residuals, and the accumulator of
        # the block multiplied last step (finished before this step's matmul starts).
        recv = _shift(jnp.concatenate([static, pend], 1), axis, n)
        yb, lse_c, g_c = static[:, :d], static[:, d], static[:, d + 1]
        acc, dyb = block(acc, yb, lse_c, g_c)
        # recv[:, -d:] is the accumulator of the block this step multiplied, from the previous
        # shard; this shard's share joins it and leaves next step.
        return (recv[:, :d + 2], recv[:, d + 2:] + dyb, acc), None

    zeros_b = jnp.zeros((b,), jnp.float32)
    static0 = jnp.concatenate([y, jnp.stack([col_red if cols else zeros_b,
                                             g_col if cols else zeros_b], 1)], 1)
    # The scalar accumulators differ per shard (shard_map sums them for the replicated inputs).
    acc0 = vary((jnp.zeros_like(x), jnp.float32(0.0), jnp.float32(0.0)), axis)
    pend0 = vary(jnp.zeros_like(y), axis)
    (_, pend, (dx, ds, db)), _ = jax.lax.scan(step, (static0, pend0, acc0), None, length=n)
    # After n steps shard k holds block k+1's finished gradient: one last shift sends it home.
    dy = _shift(pend, axis, n)
    return dx, dy, ds, db


def after(tree, dep, axis):
    """`tree` (floating arrays varying over `axis`) unchanged, but computed from `dep`.

    Use it to order a collective against a loop of collectives (the ring). XLA:CPU orders
    collectives only by start: a loop finishes asynchronously once its body hands work to the
    thread pool, so a collective with no data path from the loop may start while the loop's
    collectives still wait in their rendezvous. With several devices in one process this hangs
    (jax 0.10.2 aborted after 40 s). Only a value the later ops really read orders them at run
    time; an optimization_barrier orders the HLO schedule but adds no read.

    What is added is -0.0 computed from `dep`: x + (-0.0) == x for every x, and XLA does not fold
    0·s away for floats (it is NaN for infinite s), so the read survives. The cotangent of `dep`
    is an exact zero computed from the cotangent of `tree`, which orders the backward pass the
    other way round; pass `stop_gradient(dep)` where that is not wanted. An invariant `dep` with a
    gradient costs one scalar all-reduce in the backward pass (its varying cotangent is summed).
    """
    if axis is None:
        return tree
    s = sum(jnp.sum(d.astype(jnp.float32)) for d in jax.tree.leaves(dep))
    # Always -0.0; the select keeps an infinite or NaN `dep` from turning it into NaN.
    zero = jnp.where(jnp.isfinite(s), -(jnp.abs(s) * 0.0), -0.0)
    zero = vary(zero, axis)
    return jax.tree.map(lambda v: v + zero.astype(v.dtype), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def ring_stats(kind, axis, n, tile, x, y, s, bias):
    """((row_red, row_max, row_idx), (col_red, col_max, col_idx)) of L = s·x·Yᵀ + bias over the
    global batch; row_red is the log-sum-exp (softmax) or softplus sum (sigmoid) per row; the
    column statistics are empty for the sigmoid kind. Only row_red / col_red are differentiable.

    x, y: this shard's (b, d) float32 rows; s, bias: scalars varying over `axis` (pcast them) so
    that their per-shard cotangents are summed by shard_map.
    """
    return _ring_fwd(kind, axis, n, tile, x, y, s, bias)


def _stats_fwd(kind, axis, n, tile, x, y, s, bias):
    rows, cols = _ring_fwd(kind, axis, n, tile, x, y, s, bias)
    col_red = cols[0] if cols else None
    return (rows, cols), (x, y, s, bias, rows[0], col_red)


def _stats_bwd(kind, axis, n, tile, res, cot):
    x, y, s, bias, row_red, col_red = res
    # The sigmoid's backward reads nothing the forward loop computed (its row sums are not
    # needed), so without this read the two loops could run side by side (see `after`).
    x = after(x, row_red, axis)
    (g_row, _, _), col_cot = cot
    g_col = col_cot[0] if col_cot else None
    if kind == "softmax":
        g_col = jnp.zeros_like(row_red) if g_col is None else g_col
    dx, dy, ds, db = _ring_bwd(kind, axis, n, tile, x, y, s, bias, row_red, col_red,
                               g_row.astype(jnp.float32), g_col)
    return dx, dy, ds.astype(s.dtype), db.astype(bias.dtype)


ring_stats.defvjp(_stats_fwd, _stats_bwd)
