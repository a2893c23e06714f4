"""Training objectives and their public functional API.

    jaxclip.losses.clip_loss(image_emb, text_emb, logit_scale, ...)            -> scalar
    jaxclip.losses.siglip_loss(image_emb, text_emb, logit_scale, logit_bias)   -> scalar
    jaxclip.losses.filip_loss(image_tokens, text_tokens, text_mask, logit_scale) -> scalar
    jaxclip.losses.cwcl_loss(frozen_emb, trained_emb, logit_scale)             -> scalar
    jaxclip.losses.kd_loss(image_emb, text_emb, logit_scale,
                           teacher_image_emb, teacher_text_emb, teacher_logit_scale) -> scalar
    jaxclip.losses.modx_loss(image_emb, text_emb, old_image_emb, old_text_emb)  -> scalar
    jaxclip.losses.simclr_loss(view_a, view_b, temperature)                     -> scalar

take the whole (global) batch; with `impl="ring"|"all_gather", mesh=mesh` they run sharded over
the mesh's batch axes (the arrays may be globally sharded). Inside the train step the same
registered functions run per shard under `shard_map` (`objective_over_mesh`), which is tested to
give the same loss and gradients.

A new objective is one function registered with `@register(name)` in a module imported here, and
one config line (`loss.name = name`, or `loss.aux.name = weight` to add it as a weighted term).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from jaxclip.losses import (  # noqa: F401  (registers the objectives)
    contrastive,
    distill,
    geometry,
    mixup,
    multi_positive,
    simclr,
    tokenwise,
    weighted,
)
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


def filip_loss(image_tokens, text_tokens, text_mask, logit_scale, *, keep_frac: float = 1.0,
               comm_dtype: str = "float32", chunk: int = 256, label_smoothing: float = 0.0,
               impl: str = "dense", mesh=None) -> jax.Array:
    """FILIP's token-wise late-interaction loss over a global batch.

    image_tokens (B, N, D) patch tokens and text_tokens (B, T, D), each token L2-normalised;
    text_mask (B, T) bool, True on real tokens; logit_scale is log t. keep_frac, comm_dtype and
    chunk are loss.filip's keys (tokenwise.py); `impl` ("all_gather" | "dense") and `mesh` as in
    `clip_loss`.
    """
    image_tokens, text_tokens = jnp.asarray(image_tokens), jnp.asarray(text_tokens)
    # FILIP reads only the tokens; Encoded carries pooled rows for every objective, any will do.
    enc = Encoded({"image": image_tokens.mean(1), "text": text_tokens.mean(1)},
                  jnp.asarray(logit_scale), tokens={"image": image_tokens, "text": text_tokens},
                  masks={"text": jnp.asarray(text_mask, bool)})
    own = dict(keep_frac=keep_frac, comm_dtype=comm_dtype, chunk=chunk,
               label_smoothing=label_smoothing)
    cfg = _loss_cfg(name="filip", impl=impl, filip=dict(get("filip").config, **own))
    return _over_mesh(cfg, mesh, enc)


def cwcl_loss(frozen_emb, trained_emb, logit_scale, *, bidirectional: bool = False,
              impl: str = "dense", mesh=None) -> jax.Array:
    """CWCL over a global batch of L2-normalised embeddings: frozen_emb (B, D) from the locked
    tower (weights and logits, under stop-gradient), trained_emb (B, D) from the tower that
    learns; logit_scale is log t. The frozen -> trained direction is the weighted cross-entropy,
    the other plain CLIP unless `bidirectional`; the result is their mean. `impl` and `mesh` as
    in `clip_loss`."""
    enc = Encoded.of_pair(jnp.asarray(frozen_emb), jnp.asarray(trained_emb),
                          jnp.asarray(logit_scale))
    cfg = _loss_cfg(name="cwcl", impl=impl,
                    cwcl=dict(weight_tower="image", bidirectional=bool(bidirectional)))
    return _over_mesh(cfg, mesh, enc)

def one_to_k_loss(image_emb, text_emb, logit_scale, text_mask=None, *, impl: str = "dense",
                  mesh=None) -> jax.Array:
    """1-to-K contrastive loss over a global batch (losses/multi_positive.py).

    image_emb (B, D) and text_emb (B, K, D) L2-normalised, K captions per image; text_mask
    (B, K) bool marks the captions that exist (None: all). logit_scale is log t. With K = 1 it
    equals `clip_loss`. `impl` ("all_gather" | "dense") and `mesh` as in `clip_loss`.
    """
    present = {} if text_mask is None else {"text": jnp.asarray(text_mask, bool)}
    enc = Encoded({"image": jnp.asarray(image_emb), "text": jnp.asarray(text_emb)},
                  jnp.asarray(logit_scale), present=present)
    return _over_mesh(_loss_cfg(name="one_to_k", impl=impl), mesh, enc)


def _with_teacher(image_emb, text_emb, logit_scale, teacher_image_emb, teacher_text_emb,
                  teacher_logit_scale) -> Encoded:
    teacher = Encoded.of_pair(jnp.asarray(teacher_image_emb), jnp.asarray(teacher_text_emb),
                              jnp.asarray(teacher_logit_scale, jnp.float32))
    enc = Encoded.of_pair(jnp.asarray(image_emb), jnp.asarray(text_emb),
                          jnp.asarray(logit_scale, jnp.float32))
    return dataclasses.replace(enc, teacher=teacher)


def kd_loss(image_emb, text_emb, logit_scale, teacher_image_emb, teacher_text_emb,
            teacher_logit_scale, *, impl: str = "dense", mesh=None) -> jax.Array:
    """open_clip's distillation term over a global batch: the cross-entropy from the teacher's
    softmax over the batch to the student's, rows and columns averaged (losses/distill.py).

    image_emb, text_emb (B, D) the student's L2-normalised embeddings, logit_scale its log t;
    teacher_image_emb, teacher_text_emb (B, D') the teacher's (any width D'), teacher_logit_scale
    the teacher's own log t. Only the KD term, without CLIP. `impl` ("all_gather" | "dense") and
    `mesh` as in `clip_loss`."""
    enc = _with_teacher(image_emb, text_emb, logit_scale, teacher_image_emb, teacher_text_emb,
                        teacher_logit_scale)
    return _over_mesh(_loss_cfg(name="kd", impl=impl), mesh, enc)


def modx_loss(image_emb, text_emb, old_image_emb, old_text_emb, *, temperature: float = 1.0,
              screen_wrong_rows: bool = True, impl: str = "dense", mesh=None) -> jax.Array:
    """Mod-X's off-diagonal distillation term over a global batch (losses/distill.py): the mean
    over rows and columns of KL(softmax S_old ‖ softmax S) with S = X Yᵀ / temperature, rows
    (columns) the old model ranks wrongly screened out. Embeddings L2-normalised; the old ones
    may have another width. Only the Mod-X term, without CLIP. `impl` and `mesh` as in
    `clip_loss`."""
    enc = _with_teacher(image_emb, text_emb, 0.0, old_image_emb, old_text_emb, 0.0)
    own = dict(temperature=float(temperature), screen_wrong_rows=bool(screen_wrong_rows))
    return _over_mesh(_loss_cfg(name="modx", impl=impl, modx=own), mesh, enc)


def simclr_loss(view_a, view_b, temperature: float = 0.1, *, impl: str = "dense",
                mesh=None) -> jax.Array:
    """SimCLR's NT-Xent (SLIP's image-image term, losses/simclr.py) over a global batch.

    view_a, view_b (B, E): L2-normalised projections of two views of each of B images; each
    view's positive is its image's other view, its negatives the other 2B - 2 views. temperature
    τ is fixed (SLIP: 0.1). `impl` ("all_gather" | "dense") and `mesh` as in `clip_loss`.
    """
    views = jnp.stack([jnp.asarray(view_a), jnp.asarray(view_b)], axis=1)
    if mesh is not None:
        views = jax.device_put(views, jax.sharding.NamedSharding(mesh, P(BATCH_AXES)))
    cfg = _loss_cfg(name="simclr", impl=impl, simclr=dict(temperature=float(temperature)))
    # The pair is unused by the term; the views ride in Encoded next to a stand-in pair.
    enc = Encoded({"image": views[:, 0], "text": views[:, 1], simclr.VIEWS_KEY: views},
                  jnp.float32(0.0))
    return _over_mesh(cfg, mesh, enc)


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
        gap = geometry.modality_gap(*jax.lax.stop_gradient((enc.x, enc.y)), axis,
                                    enc.x_present, enc.y_present)
        if loss_cfg.impl == "ring":
            enc = dataclasses.replace(enc, emb=after(enc.emb, gap, axis))
        loss, metrics = main.fn(enc, loss_cfg, axis)
        metrics = dict(metrics, modality_gap=gap)
        if aux:
            metrics[f"loss_{loss_cfg.name}"] = loss
        for name, (objective, weight) in aux.items():
            # Each term reads the embeddings through the total so far, so its collectives come
            # after the ring's forward loop and its backward pass before the ring's backward
            # loop (core.after). The all_gather form has no loop to order against.
            term_enc = enc
            if loss_cfg.impl == "ring":  # every embedding a term may read (image_views too)
                term_enc = dataclasses.replace(enc, emb=after(enc.emb, loss, axis))
            value, term_metrics = objective.fn(term_enc, loss_cfg, axis)
            metrics.update(term_metrics)  # a term's own diagnostics (m2mix_lambda, ...)
            metrics[f"loss_{name}"] = value
            loss = loss + weight * value
        return loss, metrics

    return fn


def check_config(cfg) -> None:
    """Each objective's own requirements on the rest of the config (`register(check=...)`),
    for the main loss and every weighted auxiliary term; raises ValueError."""
    for name in [cfg.loss.name, *(n for n, w in cfg.loss.aux.items() if float(w) != 0.0)]:
        if (check := get(name).check) is not None:
            check(cfg)


def needs_tokens(loss_cfg) -> bool:
    return get(loss_cfg.name).needs_tokens or any(get(n).needs_tokens for n in loss_cfg.aux)


def needs_teacher(loss_cfg) -> bool:
    """Whether an objective with a non-zero weight reads a teacher's embeddings."""
    return get(loss_cfg.name).needs_teacher or any(
        get(n).needs_teacher for n, w in loss_cfg.aux.items() if float(w) != 0.0)


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


__all__ = ["Objective", "check_config", "clip_loss", "cwcl_loss", "filip_loss", "get", "kd_loss",
           "modx_loss", "names", "needs_teacher", "needs_tokens", "objective_over_mesh",
           "one_to_k_loss", "register", "siglip_loss", "simclr_loss", "total_objective"]
