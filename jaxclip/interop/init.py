"""Initialising a fresh training run from pretrained weights (`init.path`, `init.select`).

`train.train` calls `apply` right after `init_state` when a run starts from step 0 (never on
resume: a resumed run continues from its own checkpoint). `init.path` is anything
`jaxclip.interop.sources.read` understands: a converted params dir, a HF CLIPModel or BertModel
dir, an open_clip dir, or another run's workdir. `init.select` is a regex over parameter paths
("^text/" loads the text tower only; "" every parameter). The selection is checked as a whole and
every problem is listed in one error:
  unknown     selected checkpoint parameters the run's model does not have;
  missing     parameters of the run's model that the regex selects but the checkpoint lacks
              (narrow the regex rather than silently keeping random values);
  mis-shaped  a parameter whose shape differs between checkpoint and model (except a text
              position table longer than the run's context_length, which is truncated: the
              positions beyond it are never read, e.g. BERT's 512 for 32-token captions);
  architecture  a selected tower whose activation, LayerNorm eps, kind, masking or pooling
              differ between the run's config and the checkpoint's (same shapes, wrong maths).
The optimizer state needs no change: Adam's moments start at zero whatever the parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import jax
import numpy as np

from jaxclip import tree
from jaxclip.interop import mapping, sources

# Config keys that change a tower's function without changing any parameter shape.
_ARCH_KEYS = {"image": ("kind", "act", "ln_eps", "pool"),
              "text": ("kind", "act", "ln_eps", "causal", "pool")}


def _arch_mismatches(run_model, src_model, towers) -> list[str]:
    out = []
    for tower in sorted(towers):
        keys = list(_ARCH_KEYS[tower])
        if tower == "text":
            # The pooling position depends on these ids, depending on the pooling.
            keys += ["eot_id"] if run_model.text.pool == "eot" else []
            keys += ["pad_id"] if run_model.text.pool in ("mean", "first") else []
        for key in keys:
            a, b = run_model[tower][key], src_model[tower][key]
            if a != b:
                out.append(f"model.{tower}.{key} is {a!r} in this run but {b!r} in the checkpoint")
    return out


def load_selected(cfg) -> dict[str, np.ndarray]:
    """The checkpoint parameters `cfg.init` selects, checked against `cfg.model`."""
    path, pattern = cfg.init.path, cfg.init.select
    pre = sources.read(path)
    chosen = sources.select(pre.params, pattern)
    ctx, table = cfg.model.text.context_length, chosen.get("text/pos_embed")
    if table is not None and table.shape[0] > ctx:
        # A run that tokenizes to fewer positions never reads the rest (BERT: 512 -> 32).
        logging.info("init: text/pos_embed %s truncated to the run's %d positions",
                     table.shape, ctx)
        chosen["text/pos_embed"] = table[:ctx]
    if not chosen:
        raise ValueError(f"init.select={pattern!r} matches none of the {len(pre.params)} "
                         f"parameters of init.path={path!r} (e.g. {sorted(pre.params)[:3]})")
    shapes = sources.model_shapes(cfg.model)
    wanted = {p for p in shapes if re.search(pattern, p)}
    towers = {p.split("/", 1)[0] for p in chosen} & set(_ARCH_KEYS)
    mapping.raise_problems(f"cannot initialise from init.path={path!r} "
                           f"with init.select={pattern!r}", {
        "unknown parameters (not in this run's model)": sorted(set(chosen) - set(shapes)),
        "missing parameters (selected, not in the checkpoint)": sorted(wanted - set(chosen)),
        "mis-shaped parameters": [f"{p}: checkpoint {tuple(v.shape)}, model {shapes[p]}"
                                  for p, v in sorted(chosen.items())
                                  if p in shapes and tuple(v.shape) != shapes[p]],
        "architecture mismatches": _arch_mismatches(cfg.model, pre.cfg.model, towers),
    })
    sources.warn_logit_scale(chosen, cfg.loss, path)
    return chosen


def _place(subtree: dict, shardings: dict, values: dict[str, np.ndarray]) -> dict:
    flat, flat_sh = tree.flatten(subtree), tree.flatten(shardings)
    for p in flat:
        if p in values:
            value = values[p]
            flat[p] = jax.make_array_from_callback(
                value.shape, flat_sh[p], lambda idx, v=value: np.asarray(v[idx], np.float32))
    return tree.unflatten(flat)


def apply(m, state):
    """`state` (a fresh TrainState of model `m`) with the selected parameters replaced."""
    values = load_selected(m.cfg)
    sh = m.state_shardings
    return dataclasses.replace(state, params=_place(state.params, sh.params, values),
                               frozen=_place(state.frozen, sh.frozen, values))
