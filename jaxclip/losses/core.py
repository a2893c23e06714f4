"""The objective registry and the collectives every objective is written with.

An objective is a function `fn(enc, cfg, axis) -> (loss, metrics)`:
  enc   `jaxclip.models.Encoded`: this shard's rows of the batch (L2-normalised embeddings,
        optional token features) and the replicated logit scale / bias;
  cfg   the `loss` config section: the shared keys (impl, tile, scale_param, learn_scale, ...)
        and one subsection per objective with the keys it registered (`cfg.clip.label_smoothing`);
  axis  the mesh axis name(s) the batch is split over inside `shard_map`, or None when the whole
        batch is local (single device, or the public global-batch API).
It returns the loss of the *global* batch (identical on every shard) and a dict of scalar metrics.
Written this way, one function is both the reference and the distributed implementation, and
`shard_map` differentiates it: the transpose of `all_gather` is a sum reduce-scatter, the
replicated scale receives the sum of every shard's cotangent, and nothing is off by a factor of the
device count (the mistake open_clip's flag combinations allow).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxclip.losses.ring import after, vary  # noqa: F401  (after: part of this API)

Axis = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Objective:
    fn: Callable
    impls: tuple[str, ...] = ("all_gather", "dense")
    needs_tokens: bool = False  # token-level features (FILIP) must be computed by the model
    needs_teacher: bool = False  # reads a frozen teacher's embeddings (Encoded.teacher)
    doc: str = ""
    config: dict = dataclasses.field(default_factory=dict)  # its keys under loss.<name>
    choices: dict = dataclasses.field(default_factory=dict)  # key -> allowed values
    # check(cfg) -> None: what the objective needs of the rest of the config (a locked tower, a
    # data mode), raising ValueError naming the key; run by the trainer's preflight.
    check: Callable | None = None


_REGISTRY: dict[str, Objective] = {}
_SECTIONS: dict[str, dict] = {}


def register(name: str, *, impls=("all_gather", "dense"), needs_tokens=False,
             needs_teacher=False, config: dict | None = None, choices: dict | None = None,
             check: Callable | None = None):
    """Decorator: `@register("clip")` makes `loss.name = "clip"` (or `loss.aux.clip = w`) work.

    `config` holds the objective's own settings with their defaults; they become the config
    section `loss.<name>` (checked like every other key: unknown keys and wrong types are
    errors), and `choices` restricts a key to a set of values. Register before the config is
    loaded (a module imported by the experiment, or the test itself). `check(cfg)` is given the
    whole config before a run starts and raises ValueError for settings the objective cannot
    train with.
    """
    config, choices = dict(config or {}), dict(choices or {})
    if unknown := set(choices) - set(config):
        raise ValueError(f"objective {name!r}: choices for keys it does not have: {unknown}")

    def wrap(fn):
        if name in _REGISTRY or name in _SECTIONS:
            raise ValueError(f"objective {name!r} registered twice")
        _REGISTRY[name] = Objective(fn, tuple(impls), needs_tokens, needs_teacher,
                                    (fn.__doc__ or "").strip(), config, choices, check)
        return fn

    return wrap


def declare(name: str, config: dict) -> None:
    """A config section `loss.<name>` shared by several objectives rather than owned by one
    (the distillation teacher, `loss.teacher.path`), declared by the module that reads it."""
    if name in _REGISTRY or name in _SECTIONS:
        raise ValueError(f"loss section {name!r} declared twice")
    _SECTIONS[name] = dict(config)


def sections() -> dict[str, dict]:
    """Every loss config section: each objective's own keys and the shared ones."""
    out = {name: dict(obj.config) for name, obj in _REGISTRY.items() if obj.config}
    out.update({name: dict(keys) for name, keys in _SECTIONS.items()})
    return dict(sorted(out.items()))


def get(name: str) -> Objective:
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


# ---- collectives that degrade to the identity when the whole batch is local ----

def gather(x: jax.Array, axis: Axis) -> jax.Array:
    """All rows of the global batch, in shard order."""
    return x if axis is None else jax.lax.all_gather(x, axis, tiled=True)


def shard_index(axis: Axis) -> jax.Array:
    return jnp.int32(0) if axis is None else jax.lax.axis_index(axis)


def num_shards(axis: Axis) -> int:
    return 1 if axis is None else jax.lax.psum(1, axis)


def mean_over(x: jax.Array, axis: Axis) -> jax.Array:
    return x if axis is None else jax.lax.pmean(x, axis)


def sum_over(x: jax.Array, axis: Axis) -> jax.Array:
    return x if axis is None else jax.lax.psum(x, axis)


def ring_shift(x: jax.Array, axis: Axis, n: int) -> jax.Array:
    """Sends x to the next shard along the ring (shard k receives shard k-1's block)."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def scale_value(raw: jax.Array, cfg) -> jax.Array:
    """The multiplier of the cosine similarities from the stored scale parameter."""
    raw = raw.astype(jnp.float32)
    if not cfg.learn_scale:
        raw = jax.lax.stop_gradient(raw)
    if cfg.scale_param == "temperature":  # ALIGN stores the temperature itself
        return 1.0 / raw
    return jnp.exp(raw)
