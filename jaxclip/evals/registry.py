"""The evaluator registry: each type's function, its keys with defaults, and its check.

Built-in types register themselves in `evaluators.py`, which the package imports; a new type
is a `@register(...)` function anywhere, imported before the config is resolved.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxclip import config

TYPES: dict[str, tuple[Callable, dict, Callable | None]] = {}


# Keys every evaluator accepts, with defaults.
COMMON = dict(type="", every_steps=0, at_start=False, batch_size=256)


def register(name: str, *, check: Callable | None = None, **defaults):
    """`@register("retrieval", dataset="", split="val")`: the keyword defaults are its schema.

    `check(where, spec)`, if given, validates a resolved spec without loading data (raising
    ValueError), so that a bad value fails when the evaluators are built, not at the first eval.
    """

    def wrap(fn):
        TYPES[name] = (fn, dict(COMMON, **defaults), check)
        return fn

    return wrap


def _plain(value):
    """A nested ConfigDict value as a plain dict (what the evaluator functions expect)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def resolve(name: str, ecfg) -> dict:
    """The evaluator's config with defaults filled in; unknown keys and bad values are errors."""
    ecfg = {k: _plain(v) for k, v in dict(ecfg).items()}
    kind = ecfg.get("type", "")
    if kind not in TYPES:
        raise ValueError(f"evals.{name}: unknown type {kind!r}; registered: {sorted(TYPES)}")
    _, schema, check = TYPES[kind]
    unknown = sorted(set(ecfg) - set(schema))
    if unknown:
        raise ValueError(f"evals.{name}: unknown keys {unknown} for type {kind!r}; "
                         f"valid keys: {sorted(schema)}")
    spec = dict(schema, **ecfg)
    where = f"evals.{name}"
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(spec["every_steps"]) or spec["every_steps"] < 0:
        raise ValueError(f"{where}: every_steps must be an int >= 0, got {spec['every_steps']!r}")
    if not is_int(spec["batch_size"]) or spec["batch_size"] <= 0:
        raise ValueError(f"{where}: batch_size must be a positive int, got {spec['batch_size']!r}")
    for key, default in schema.items():
        if isinstance(default, bool) and not isinstance(spec[key], bool):
            # `--config.evals.val.geometry=true` for a key the config file did not set arrives
            # as the string "true" (the config layer has no type for it); the schema does.
            word = config.parse_bool(spec[key])
            if word is None:
                raise ValueError(f"{where}: {key} must be true or false, got {spec[key]!r}")
            spec[key] = word
    if check is not None:
        check(where, spec)
    spec["name"] = name  # for error messages inside the evaluator
    return spec
