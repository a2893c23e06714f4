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

from jaxclip import runtime, sharding, tree
from jaxclip.evals import evaluators  # noqa: F401  (registers the built-in types)
from jaxclip.evals.registry import COMMON, TYPES, register, resolve

__all__ = ["COMMON", "Context", "Evaluators", "evaluate", "register", "resolve"]

@dataclasses.dataclass
class Context:
    """What evaluators share: the mesh, jitted encoders and the data config."""

    cfg: Any
    mesh: jax.sharding.Mesh
    encode_image: Callable  # (params, uint8 images (E, H, W, 3)) -> (E, D), batch-sharded
    encode_text: Callable  # (params, int32 tokens (E, T)) -> (E, D)
    tokenizer: Any
    # (params, inputs) -> packed token sets (B, T, D + 1), for late-interaction scoring; built
    # only when an evaluator asks for it (runtime.token_encoders).
    encode_image_tokens: Callable | None = None
    encode_text_tokens: Callable | None = None
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


class Evaluators:
    """Runs the configured evaluators on the trainer's schedule."""

    def __init__(self, cfg, layout: runtime.Layout, tokenizer):
        self.specs = {name: resolve(name, e) for name, e in cfg.evals.items()}
        self._ctx = None
        if self.specs:
            enc_img, enc_txt = runtime.encoders(layout)
            late = any(spec.get("scoring") == "late" for spec in self.specs.values())
            tok_img, tok_txt = runtime.token_encoders(layout) if late else (None, None)
            self._ctx = Context(cfg, layout.mesh, enc_img, enc_txt, tokenizer, tok_img, tok_txt)

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
        return self.evaluate(tree.merge(state.params, state.frozen), names, step=step)

    def evaluate(self, params, names: list[str] | None = None, *, step: int | None = None
                 ) -> dict[str, float]:
        """Runs the named evaluators (default: all) on a full parameter tree, placed like the
        layout's parameter shardings; returns {"eval/<name>/<metric>": value}."""
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
                metrics = TYPES[spec["type"]][0](self._ctx, spec, params)
                seconds = time.perf_counter() - t0
                out.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
                out[f"eval/{name}/seconds"] = seconds
                logging.info("eval %s%s (%.1fs): %s", name, at, seconds,
                             ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        finally:
            # Embeddings belong to these parameters; the next call has new ones.
            self._ctx.call_cache.clear()
        return out


def evaluate(cfg, params, names: list[str] | None = None, *, layout=None, tokenizer=None,
             step: int | None = None) -> dict[str, float]:
    """Runs `cfg.evals` (or the `names` among them) on `params`: {"eval/<name>/<metric>": v}.

    params: the full parameter tree of the model `cfg.model` describes (nested dicts of numpy or
    jax arrays, as `nnx.to_pure_dict` gives; a restored checkpoint or imported weights); it is
    placed on the current devices with the layout's shardings. layout (`runtime.layout(cfg)`)
    and tokenizer (`tokenizer.from_config(cfg)`) are built from cfg when not given.
    """
    from jaxclip.tokenizer import from_config

    if not cfg.evals:
        raise ValueError("the config has no evaluators (config.evals is empty)")
    layout = layout if layout is not None else runtime.layout(cfg)
    tokenizer = tokenizer if tokenizer is not None else from_config(cfg)
    runner = Evaluators(cfg, layout, tokenizer)
    return runner.evaluate(runtime.place_params(params, layout), names, step=step)
