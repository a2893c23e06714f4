"""Evaluators declared in the config and run by the trainer (or `jaxclip eval`).

    config.evals.val = dict(type="retrieval", dataset="shapes", split="val", every_steps=200)

An evaluator type is a registered function `fn(ctx, ecfg, params) -> {metric: value}`; the runner
prefixes the keys as `eval/<name>/<metric>` (e.g. `eval/val/i2t_r1`). Each evaluator runs every
`every_steps` steps (0: only at the end), at the end of training, and at step 0 if `at_start`.
The data an evaluator needs (decoded images, tokenised captions) is loaded once and cached.
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

_TYPES: dict[str, tuple[Callable, dict]] = {}

# Keys every evaluator accepts, with defaults.
COMMON = dict(type="", every_steps=0, at_start=False, batch_size=256)


def register(name: str, **defaults):
    """`@register("retrieval", dataset="", split="val")`: the keyword defaults are its schema."""

    def wrap(fn):
        _TYPES[name] = (fn, dict(COMMON, **defaults))
        return fn

    return wrap


def resolve(name: str, ecfg) -> dict:
    """The evaluator's config with defaults filled in; unknown keys are errors naming them."""
    ecfg = dict(ecfg)
    kind = ecfg.get("type", "")
    if kind not in _TYPES:
        raise ValueError(f"evals.{name}: unknown type {kind!r}; registered: {sorted(_TYPES)}")
    schema = _TYPES[kind][1]
    unknown = sorted(set(ecfg) - set(schema))
    if unknown:
        raise ValueError(f"evals.{name}: unknown keys {unknown} for type {kind!r}; "
                         f"valid keys: {sorted(schema)}")
    return dict(schema, **ecfg)


@dataclasses.dataclass
class Context:
    """What evaluators share: the mesh, jitted encoders and the data config."""

    cfg: Any
    mesh: jax.sharding.Mesh
    encode_image: Callable  # (params, uint8 images (E, H, W, 3)) -> (E, D), batch-sharded
    encode_text: Callable  # (params, int32 tokens (E, T)) -> (E, D)
    tokenizer: Any
    cache: dict = dataclasses.field(default_factory=dict)

    def embed(self, encode: Callable, params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        """Embeds all rows of `inputs` in fixed-size global batches; returns (N, D) on host.

        Every host holds the full `inputs` and contributes its slice of each global batch, so the
        same code runs on one or many hosts. The last batch is padded and the padding dropped.
        """
        divisor = sharding.batch_divisor(self.mesh) * jax.process_count()
        E = max(divisor, -(-batch_size // divisor) * divisor)
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


class Evaluators:
    """Runs the configured evaluators on the trainer's schedule."""

    def __init__(self, cfg, model, tokenizer):
        from jaxclip.evals import evaluators  # noqa: F401  (registers the types)
        from jaxclip.train import make_encoders

        self.specs = {name: resolve(name, e) for name, e in cfg.evals.items()}
        self._model = model
        self._ctx = None
        if self.specs:
            enc_img, enc_txt = make_encoders(model)
            self._ctx = Context(cfg, model.mesh, enc_img, enc_txt, tokenizer)

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
        names = self.due(step, final=final, at_start=at_start) if names is None else names
        if not names:
            return {}
        params = self._model.full_params(state)
        out = {}
        for name in names:
            spec = self.specs[name]
            t0 = time.perf_counter()
            metrics = _TYPES[spec["type"]][0](self._ctx, spec, params)
            seconds = time.perf_counter() - t0
            out.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
            out[f"eval/{name}/seconds"] = seconds
            logging.info("eval %s at step %d (%.1fs): %s", name, step, seconds,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return out


def types() -> list[str]:
    return sorted(_TYPES)
