"""Training objectives and their public functional API.

    jaxclip.losses.clip_loss(image_emb, text_emb, logit_scale, ...)            -> scalar
    jaxclip.losses.siglip_loss(image_emb, text_emb, logit_scale, logit_bias)   -> scalar

take the whole (global) batch. Inside the train step the same registered functions run per shard
under `shard_map` (`objective_over_mesh`), which is tested to give the same loss and gradients.

A new objective is one function registered with `@register(name)` in a module imported here, and
one config line (`loss.name = name`, or `loss.aux.name = weight` to add it as a weighted term).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from jaxclip.losses import contrastive, geometry  # noqa: F401  (registers the objectives)
from jaxclip.losses.core import Objective, get, names, register
from jaxclip.models.two_tower import Encoded
from jaxclip.sharding import BATCH_AXES


def _loss_cfg(**kw) -> ml_collections.ConfigDict:
    base = dict(impl="dense", label_smoothing=0.0, scale_param="logit_scale", learn_scale=True,
                direction_reduce="mean")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def clip_loss(image_emb, text_emb, logit_scale, *, label_smoothing: float = 0.0,
              scale_param: str = "logit_scale", direction_reduce: str = "mean") -> jax.Array:
    """Symmetric InfoNCE over a global batch of L2-normalised embeddings (CLIP; ALIGN options).

    logit_scale is the stored parameter: log t (scale_param="logit_scale") or the temperature
    itself (scale_param="temperature", ALIGN).
    """
    enc = Encoded(jnp.asarray(image_emb), jnp.asarray(text_emb), jnp.asarray(logit_scale))
    cfg = _loss_cfg(label_smoothing=label_smoothing, scale_param=scale_param,
                    direction_reduce=direction_reduce)
    return get("clip").fn(enc, cfg, None)[0]


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias) -> jax.Array:
    """Pairwise sigmoid loss over a global batch; logit_scale is log t, logit_bias is b."""
    enc = Encoded(jnp.asarray(image_emb), jnp.asarray(text_emb), jnp.asarray(logit_scale),
                  jnp.asarray(logit_bias))
    return get("siglip").fn(enc, _loss_cfg(), None)[0]


def total_objective(loss_cfg):
    """fn(enc, axis) -> (loss, metrics): the main objective plus weighted auxiliary terms."""
    main = get(loss_cfg.name)
    if loss_cfg.impl not in (*main.impls, "dense"):
        raise ValueError(f"objective {loss_cfg.name!r} has no {loss_cfg.impl!r} implementation; "
                         f"it supports {main.impls}")
    aux = {name: (get(name), float(w)) for name, w in loss_cfg.aux.items() if float(w) != 0.0}

    def fn(enc, axis):
        loss, metrics = main.fn(enc, loss_cfg, axis)
        metrics = dict(metrics)
        if aux:
            metrics[f"loss_{loss_cfg.name}"] = loss
        for name, (objective, weight) in aux.items():
            value, _ = objective.fn(enc, loss_cfg, axis)
            metrics[f"loss_{name}"] = value
            loss = loss + weight * value
        return loss, metrics

    return fn


def needs_tokens(loss_cfg) -> bool:
    return get(loss_cfg.name).needs_tokens or any(get(n).needs_tokens for n in loss_cfg.aux)


def objective_over_mesh(loss_cfg, mesh):
    """The objective as a function of globally sharded `Encoded` arrays.

    impl "dense" lets GSPMD partition the global formula; the others run the registered function
    per shard under shard_map with the batch split over ("data", "fsdp").
    """
    fn = total_objective(loss_cfg)
    if loss_cfg.impl == "dense" or mesh is None:
        return functools.partial(fn, axis=None)

    def spec(x):
        return P() if x.ndim == 0 else P(BATCH_AXES)

    def run(enc):
        in_specs = jax.tree.map(spec, enc)
        return jax.shard_map(functools.partial(fn, axis=BATCH_AXES), mesh=mesh,
                             in_specs=(in_specs,), out_specs=(P(), P()))(enc)

    return run


__all__ = ["Objective", "clip_loss", "get", "names", "needs_tokens", "objective_over_mesh",
           "register", "siglip_loss", "total_objective"]
