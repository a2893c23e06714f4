"""Training objectives and their public functional API.

    jaxclip.losses.clip_loss(image_emb, text_emb, logit_scale, ...)            -> scalar
    jaxclip.losses.siglip_loss(image_emb, text_emb, logit_scale, logit_bias)   -> scalar

take the whole (global) batch; with `impl="ring"|"all_gather", mesh=mesh` they run sharded over
the mesh's batch axes (the arrays may be globally sharded). Inside the train step the same
registered functions run per shard under `shard_map` (`objective_over_mesh`), which is tested to
give the same loss and gradients.

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
from jaxclip.losses.core import Objective, after, get, names, register
from jaxclip.models.two_tower import Encoded
from jaxclip.sharding import BATCH_AXES


def _loss_cfg(**kw) -> ml_collections.ConfigDict:
    own = {k: kw.pop(k) for k in ("label_smoothing", "direction_reduce") if k in kw}
    base = dict(name="clip", impl="dense", scale_param="logit_scale", learn_scale=True, tile=0,
                aux={}, pair=("image", "text"), clip=dict(get("clip").config, **own))
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _over_mesh(cfg, mesh, enc) -> jax.Array:
    if mesh is None:  # the whole batch is local: the registered function with axis=None
        return get(cfg.name).fn(enc, cfg, None)[0]
    return jax.jit(objective_over_mesh(cfg, mesh))(enc)[0]


def clip_loss(image_emb, text_emb, logit_scale, *, label_smoothing: float = 0.0,
              scale_param: str = "logit_scale", direction_reduce: str = "mean",
              impl: str = "dense", mesh=None, tile: int = 0) -> jax.Array:
    """Symmetric InfoNCE over a global batch of L2-normalised embeddings (CLIP; ALIGN options).

    logit_scale is the stored parameter: log t (scale_param="logit_scale") or the temperature
    itself (scale_param="temperature", ALIGN). With a `mesh`, the (globally sharded) batch is
    split over its ("data", "fsdp") axes and `impl` ("all_gather" | "ring" | "dense") says how
    the loss runs over them; `tile` is the ring's column tile (0 = whole block).
    """
    enc = Encoded.of_pair(jnp.asarray(image_emb), jnp.asarray(text_emb), jnp.asarray(logit_scale))
    cfg = _loss_cfg(label_smoothing=label_smoothing, scale_param=scale_param,
                    direction_reduce=direction_reduce, impl=impl, tile=tile)
    return _over_mesh(cfg, mesh, enc)


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, impl: str = "dense", mesh=None,
                tile: int = 0) -> jax.Array:
    """Pairwise sigmoid loss over a global batch; logit_scale is log t, logit_bias is b.
    `impl`, `mesh` and `tile` as in `clip_loss`."""
    enc = Encoded.of_pair(jnp.asarray(image_emb), jnp.asarray(text_emb),
                          jnp.asarray(logit_scale), jnp.asarray(logit_bias))
    return _over_mesh(_loss_cfg(name="siglip", impl=impl, tile=tile), mesh, enc)


def total_objective(loss_cfg):
    """fn(enc, axis) -> (loss, metrics): the main objective plus weighted auxiliary terms."""
    main = get(loss_cfg.name)
    if loss_cfg.impl not in (*main.impls, "dense"):
        raise ValueError(f"objective {loss_cfg.name!r} has no {loss_cfg.impl!r} implementation; "
                         f"it supports {main.impls}")
    aux = {name: (get(name), float(w)) for name, w in loss_cfg.aux.items() if float(w) != 0.0}

    pair = tuple(loss_cfg.get("pair", ("image", "text")))

    def fn(enc, axis):
        enc = enc.contrasting(pair)
        # A diagnostic of every objective, without gradient. It has no backward pass to order
        # against the ring's backward loop, so its psum goes first and the ring's embeddings
        # read it (core.after): then it precedes both ring loops.
        gap = geometry.modality_gap(*jax.lax.stop_gradient((enc.x, enc.y)), axis)
        if loss_cfg.impl == "ring":
            enc = enc.with_pair(*after((enc.x, enc.y), gap, axis))
        loss, metrics = main.fn(enc, loss_cfg, axis)
        metrics = dict(metrics, modality_gap=gap)
        if aux:
            metrics[f"loss_{loss_cfg.name}"] = loss
        for name, (objective, weight) in aux.items():
            # Each term reads the embeddings through the total so far, so its collectives come
            # after the ring's forward loop and its backward pass before the ring's backward
            # loop (core.after). The all_gather form has no loop to order against.
            term_enc = enc
            if loss_cfg.impl == "ring":
                term_enc = enc.with_pair(*after((enc.x, enc.y), loss, axis))
            value, _ = objective.fn(term_enc, loss_cfg, axis)
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
