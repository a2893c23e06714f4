"""Models: `TwoTower(config.model, rngs=seed)` is the initialised dual encoder; `build_model`
builds the same with its initialisation compiled as one function (fast on every backend).

Towers come from the registry in `towers.py`; parameter drawing is in `init.py`.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxclip.models.init import draw_params, init_params
from jaxclip.models.sizes import SIZES, model_overrides
from jaxclip.models.two_tower import Encoded, TwoTower, l2_normalize


def build_model(model_cfg, seed: int = 0) -> TwoTower:
    """The initialised model; initialisation runs as one compiled function."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoTower(model_cfg, rngs=None)))
    state = jax.jit(lambda: nnx.state(TwoTower(model_cfg, rngs=seed)))()
    return nnx.merge(graphdef, state)


__all__ = ["SIZES", "Encoded", "TwoTower", "build_model", "draw_params", "init_params",
           "l2_normalize", "model_overrides"]
