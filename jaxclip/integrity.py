"""Content fingerprints and finiteness of a (sharded) pytree, computed on the devices.

A checkpoint records, for every array it saves, a 64-bit fingerprint of the array's values and
whether they are all finite; restore recomputes both on what it read and refuses a mismatch.

Why on the devices and not a hash of the written bytes: the fingerprint must not depend on how
the array is laid out. A checkpoint written by 2 hosts x 4 devices is restored onto 1 x 8 (or
any other mesh), so per-shard or per-host hashes would not compare. Here each array's bits are
widened to uint32 words and summed with position-dependent odd weights, modulo 2**32: integer
addition is associative and commutative, so the partitioned program (local sums, then an
all-reduce) gives exactly the value a single device would, on any mesh. Two such sums with
different weights make 64 bits. Any change of a single word is always detected (an odd weight
times a non-zero difference below 2**32 is non-zero modulo 2**32); several changes escape both
sums with probability about 2**-64. It is not a cryptographic hash: it guards against bit rot
and torn writes, not against an adversary.

Finiteness is a separate, faster pass (a float sum per array): the trainer must know it before
a save, while the fingerprints can be computed while Orbax writes (`digests_later`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_W2_MULT = 0x9E3779B1  # odd (Fibonacci hashing constant): decorrelates the second sum's weights


def _words(x: jax.Array) -> jax.Array:
    """The array's bit patterns as uint32 (each element one word; 64-bit types are folded)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = 8 * x.dtype.itemsize
    if bits > 32:
        u = jax.lax.bitcast_convert_type(x, jnp.uint64)
        return (u ^ (u >> 32)).astype(jnp.uint32)
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Row-major linear index of every element (uint32, wrapping), built without a reshape so
    that it is partitioned like the array it weights."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride = (stride * shape[dim]) % (1 << 32)
    return index


def _leaf_digest(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    words = _words(x)
    pos = _position(x.shape)
    w1 = pos * np.uint32(2) + np.uint32(1)
    w2 = (pos * np.uint32(_W2_MULT)) | np.uint32(1)
    mixed = words ^ (words >> 15)  # the second sum sees other bit combinations than the first
    return jnp.stack([jnp.sum(words * w1, dtype=jnp.uint32),
                      jnp.sum(mixed * w2, dtype=jnp.uint32)])


@jax.jit
def _digests(leaves: list) -> list:
    return [_leaf_digest(x) for x in leaves]


@jax.jit
def _finite(leaves: list) -> list:
    # x * 0 is NaN exactly where x is inf or NaN, so one float sum per array decides it: float
    # reductions run at memory speed where XLA:CPU's integer and boolean ones do not.
    return [jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype), dtype=jnp.float32))
            if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in leaves]


def _host(x) -> np.ndarray:
    """A replicated result on this host (also when the array spans several processes)."""
    return np.asarray(x.addressable_data(0) if hasattr(x, "addressable_data") else x)


def leaf_paths(tree) -> list[str]:
    """'params/image/blocks/w'-style names of the tree's leaves, in `jax.tree.leaves` order."""
    def name(path) -> str:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
            else:
                parts.append(str(key))
        return "/".join(parts)

    return [name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def finite(tree) -> dict[str, bool]:
    """{leaf path: all values finite} (blocks until computed: a fast pass on the devices)."""
    return {path: bool(_host(f)) for path, f in zip(leaf_paths(tree), _finite(jax.tree.leaves(
        tree)), strict=True)}


def digests_later(tree) -> Callable[[], dict[str, str]]:
    """Dispatches the fingerprints of `tree` to the devices and returns at once; calling the
    result waits for them: {leaf path: 16 hex digits}. The device work is ordered before any
    later computation that donates these buffers, so the caller may go on training."""
    paths, pending = leaf_paths(tree), _digests(jax.tree.leaves(tree))

    def get() -> dict[str, str]:
        return {path: "".join(f"{int(v):08x}" for v in _host(d))
                for path, d in zip(paths, pending, strict=True)}

    return get


def summarize(tree) -> dict[str, dict]:
    """{leaf path: {"digest": "16 hex digits", "finite": bool}} of a pytree of arrays."""
    digests, flags = digests_later(tree)(), finite(tree)
    return {path: {"digest": digests[path], "finite": flags[path]} for path in digests}


def non_finite(summary: dict[str, dict]) -> list[str]:
    return [path for path, s in summary.items() if not s["finite"]]


def digest_mismatches(recorded: dict[str, str], actual: dict[str, dict]) -> list[str]:
    """Paths whose recorded digest differs from the actual one (paths absent from `recorded`
    are not checked: a partial restore reads a subset of what was saved)."""
    return [path for path, s in actual.items()
            if path in recorded and recorded[path] != s["digest"]]
