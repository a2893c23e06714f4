"""Evaluators declared in the config and run by the trainer (or `jaxclip eval`).

    config.evals.val = dict(type="retrieval", dataset="shapes", split="val", every_steps=200)
    config.evals.test = dict(type="zeroshot", dataset="fashion_mnist", split="test",
                             classes="fashion_mnist", templates="fashion_mnist")

An evaluator type is a registered function `fn(ctx, spec, params) -> {metric: value}`; the runner
prefixes the keys as `eval/<name>/<metric>` (e.g. `eval/val/i2t_r1`) and adds
`eval/<name>/seconds`. Each evaluator runs every `every_steps` steps (0: only at the end), at the
end of training, and at step 0 if `at_start`. The types and their keys are in `evaluators.py`;
a key that a type does not have is an error naming the valid ones, raised when `Evaluators` is
built (before training starts), as are bad values that can be checked without data.

The data an evaluator needs (decoded images, tokenised captions) is loaded once per run and
cached on the `Context`; embeddings are cached for the duration of one evaluation call only.

`evaluate(cfg, params)` runs the configured evaluators on any parameter tree (a restored
checkpoint, imported weights) without a trainer; `jaxclip eval` is built on it (standalone.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxclip import sharding

_TYPES: dict[str, tuple[Callable, dict, Callable | None]] = {}

_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}

# Keys every evaluator accepts, with defaults.
COMMON = dict(type="", every_steps=0, at_start=False, batch_size=256)


def register(name: str, *, check: Callable | None = None, **defaults):
    """`@register("retrieval", dataset="", split="val")`: the keyword defaults are its schema.

    `check(where, spec)`, if given, validates a resolved spec without loading data (raising
    ValueError), so that a bad value fails when the evaluators are built, not at the first eval.
    """

    def wrap(fn):
        _TYPES[name] = (fn, dict(COMMON, **defaults), check)
        return fn

    return wrap


def _plain(value):
    """A nested ConfigDict value as a plain dict (what the evaluator functions expect)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def resolve(name: str, ecfg) -> dict:
    """The evaluator's config with defaults filled in; unknown keys and bad values are errors."""
    from jaxclip.evals import evaluators  # noqa: F401  (registers the built-in types)

    ecfg = {k: _plain(v) for k, v in dict(ecfg).items()}
    kind = ecfg.get("type", "")
    if kind not in _TYPES:
        raise ValueError(f"evals.{name}: unknown type {kind!r}; registered: {sorted(_TYPES)}")
    _, schema, check = _TYPES[kind]
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
            word = str(spec[key]).lower()
            if word not in _BOOL_WORDS:
                raise ValueError(f"{where}: {key} must be true or false, got {spec[key]!r}")
            spec[key] = _BOOL_WORDS[word]
    if check is not None:
        check(where, spec)
    spec["name"] = name  # for error messages inside the evaluator
    return spec


@dataclasses.dataclass
class Context:
    """What evaluators share: the mesh, jitted encoders and the data config."""

    cfg: Any
    mesh: jax.sharding.Mesh
    encode_image: Callable  # (params, uint8 images (E, H, W, 3)) -> (E, D), batch-sharded
    encode_text: Callable  # (params, int32 tokens (E, T)) -> (E, D)
    tokenizer: Any
    cache: dict = dataclasses.field(default_factory=dict)  # for the whole run (data, tokens)
    call_cache: dict = dataclasses.field(default_factory=dict)  # for one evaluation call

    def global_batch(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of the devices (and hosts) it is split over."""
        divisor = sharding.batch_divisor(self.mesh) * jax.process_count()
        return max(divisor, -(-batch_size // divisor) * divisor)

    def embed(self, encode: Callable, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        """Embeds all rows of `inputs` in fixed-size global batches; returns (N, D) on host.

        Every host holds the full `inputs` and contributes its slice of each global batch, so the
        same code runs on one or many hosts. The last batch is padded and the padding dropped.
        """
        E = self.global_batch(batch_size)
        n = len(inputs)
        h, hosts = jax.process_index(), jax.process_count()
        e = E // hosts
        out = []
        for start in range(0, n, E):
            chunk = inputs[start:start + E]
            if len(chunk) < E:
                pad = np.zeros((E - len(chunk), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            batch = sharding.global_batch({"x": chunk[h * e:(h + 1) * e]}, self.mesh)["x"]
            emb = encode(params, batch)
            out.append(np.asarray(multihost_utils.process_allgather(emb, tiled=True)))
        return np.concatenate(out)[:n] if out else np.zeros((0, 0), np.float32)


# Jitted encoders per Model (by identity), so that building Evaluators again for the same model
# (jaxclip eval over several configs, `evaluate` called in a loop, tests) does not recompile
# them. An entry holds its model, so an id cannot be reused while its entry exists.
_ENCODERS: dict[int, tuple[Any, tuple[Callable, Callable]]] = {}
_MAX_MODELS = 4


def _encoders(model) -> tuple[Callable, Callable]:
    from jaxclip.train import make_encoders

    hit = _ENCODERS.get(id(model))
    if hit is None or hit[0] is not model:
        if len(_ENCODERS) >= _MAX_MODELS:
            _ENCODERS.pop(next(iter(_ENCODERS)))
        hit = _ENCODERS[id(model)] = (model, make_encoders(model))
    return hit[1]


class Evaluators:
    """Runs the configured evaluators on the trainer's schedule."""

    def __init__(self, cfg, model, tokenizer):
        self.specs = {name: resolve(name, e) for name, e in cfg.evals.items()}
        self._model = model
        self._ctx = None
        if self.specs:
            enc_img, enc_txt = _encoders(model)
            self._ctx = Context(cfg, model.mesh, enc_img, enc_txt, tokenizer)

    @property
    def context(self) -> Context | None:
        """The shared evaluation context (None when no evaluator is configured)."""
        return self._ctx

    def due(self, step: int, *, final: bool = False, at_start: bool = False) -> list[str]:
        names = []
        for name, spec in self.specs.items():
            if at_start:
                if spec["at_start"]:
                    names.append(name)
            elif final or (spec["every_steps"] > 0 and step % spec["every_steps"] == 0):
                names.append(name)
        return names

    def run(self, state, step: int, *, final: bool = False, at_start: bool = False,
            names: list[str] | None = None) -> dict[str, float]:
        """The due evaluators' metrics for a TrainState ({} if none is due)."""
        names = self.due(step, final=final, at_start=at_start) if names is None else names
        if not names:
            return {}
        return self.evaluate(self._model.full_params(state), names, step=step)

    def evaluate(self, params, names: list[str] | None = None, *, step: int | None = None
                 ) -> dict[str, float]:
        """Runs the named evaluators (default: all) on a full parameter tree, placed like the
        model's parameter shardings; returns {"eval/<name>/<metric>": value}."""
        names = list(self.specs) if names is None else list(names)
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise ValueError(f"no evaluator named {unknown}; configured: {sorted(self.specs)}")
        out = {}
        at = "" if step is None else f" at step {step}"
        try:
            for name in names:
                spec = self.specs[name]
                t0 = time.perf_counter()
                metrics = _TYPES[spec["type"]][0](self._ctx, spec, params)
                seconds = time.perf_counter() - t0
                out.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
                out[f"eval/{name}/seconds"] = seconds
                logging.info("eval %s%s (%.1fs): %s", name, at, seconds,
                             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        finally:
            # Embeddings belong to these parameters; the next call has new ones.
            self._ctx.call_cache.clear()
        return out


def types() -> list[str]:
    from jaxclip.evals import evaluators  # noqa: F401  (registers the built-in types)

    return sorted(_TYPES)


def schema(kind: str) -> dict:
    """The keys of an evaluator type with their defaults."""
    from jaxclip.evals import evaluators  # noqa: F401

    if kind not in _TYPES:
        raise ValueError(f"unknown evaluator type {kind!r}; registered: {sorted(_TYPES)}")
    return dict(_TYPES[kind][1])


def place_params(params, model) -> Any:
    """A full parameter tree (numpy or jax arrays) placed with the model's parameter shardings.

    The tree must have exactly the model's parameters with the model's shapes; any mismatch is an
    error that names the offending paths.
    """
    from jaxclip import tree

    want = tree.flatten(model.full_params(model.abstract_state))  # ShapeDtypeStructs
    got = tree.flatten(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"parameter tree does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    bad = [f"{k}: {tuple(np.shape(got[k]))} != {want[k].shape}" for k in sorted(got)
           if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"parameter shapes do not match the model: {bad[:8]}")
    return jax.device_put(tree.unflatten(got), model.param_shardings)


def evaluate(cfg, params, names: list[str] | None = None, *, model=None, tokenizer=None,
             step: int | None = None) -> dict[str, float]:
    """Runs `cfg.evals` (or the `names` among them) on `params`: {"eval/<name>/<metric>": v}.

    params: the full parameter tree of the model `cfg.model` describes (nested dicts of numpy or
    jax arrays, as `nnx.to_pure_dict` gives; a restored checkpoint or imported weights); it is
    placed on the current devices with the model's shardings. model (`train.build(cfg)`) and
    tokenizer (`train.make_tokenizer(cfg)`) are built from cfg when not given.
    """
    from jaxclip import train

    if not cfg.evals:
        raise ValueError("the config has no evaluators (config.evals is empty)")
    model = model if model is not None else train.build(cfg)
    tokenizer = tokenizer if tokenizer is not None else train.make_tokenizer(cfg)
    runner = Evaluators(cfg, model, tokenizer)
    return runner.evaluate(place_params(params, model), names, step=step)
