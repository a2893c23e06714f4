"""CWCL: continuously weighted contrastive loss (Srinivasa et al. 2023, "CWCL: Cross-Modal
Transfer with Continuously Weighted Contrastive Loss", arXiv 2309.14580).

For runs where one tower U is a frozen pre-trained model (LiT-style) and the other, V, learns to
match it. CLIP's one-hot targets treat every other sample of the batch as equally wrong; CWCL
spreads each row's target over the batch by how similar the frozen tower finds the samples:

  w_ij = (1 + <p_i, p_j>) / 2  in [0, 1], w_ii = 1        (p: the frozen tower's embeddings)
  L_{U->V} = -(1/B) Σ_i (Σ_j w_ij)^-1 Σ_j w_ij log softmax_j(t·<p_i, q_j>)

The other direction, V->U, is plain CLIP (the reimplementations do that; the paper's exact
combination is not stated), or the same weighted form with `bidirectional`. The loss is the mean
of the two directions. With w = I it is CLIP.

The frozen side is a constant: its embeddings (and so the weights) are under stop-gradient, so no
gradient reaches it even through a trainable head on top of a locked tower. Use CWCL with the
weight tower locked and without a head of its own (configs/cwcl_lit.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip import tree
from jaxclip.losses.contrastive import batch_stats, smoothed_ce
from jaxclip.losses.core import gather, mean_over, register, scale_value, shard_index


def weighted_cross_entropy(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """Per row: -Σ_j w_ij log softmax(logits_i)_j / Σ_j w_ij (soft targets w_i / Σ_j w_ij)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(weights * logp, axis=-1) / jnp.sum(weights, axis=-1)


def _weight_tower_locked(cfg) -> None:
    """CWCL's weights come from a frozen model: with the weight tower training, its own
    embeddings would move the targets (and get no gradient from the loss), which is not CWCL."""
    tower = cfg.loss.cwcl.weight_tower
    if not cfg.model[tower].locked:
        raise ValueError(f"loss.cwcl.weight_tower={tower!r} gives the targets and gets no "
                         f"gradient, so it must be frozen: set model.{tower}.locked=true (or "
                         f"use loss.name=clip)")
    # A pattern that freezes the whole head subtree matches its bare prefix.
    if cfg.model[tower].head != "none" and not tree.matches(f"{tower}_head/", cfg.optim.frozen):
        raise ValueError(f"model.{tower}.head={cfg.model[tower].head!r} on the CWCL weight tower "
                         f"would train without ever getting a gradient: use model.{tower}."
                         f"head=none, or freeze it with optim.frozen=['^{tower}_head/']")


# weight_tower: the locked tower whose embeddings give the weights (image for LiT, text for a
# locked sentence encoder); it must be one of loss.pair. bidirectional: weight the
# trained -> frozen direction too (else it is plain CLIP).
@register("cwcl", config=dict(weight_tower="image", bidirectional=False),
          choices=dict(weight_tower=("image", "text")), check=_weight_tower_locked)
def cwcl(enc, cfg, axis):
    """Continuously weighted contrastive loss: the frozen tower's similarities weight targets."""
    own = cfg.cwcl
    if own.weight_tower not in enc.pair:
        raise ValueError(f"loss.cwcl.weight_tower={own.weight_tower!r} is not one of "
                         f"loss.pair={enc.pair}")
    frozen_first = own.weight_tower == enc.pair[0]
    frozen, trained = (enc.x, enc.y) if frozen_first else (enc.y, enc.x)
    frozen = jax.lax.stop_gradient(frozen.astype(jnp.float32))
    trained = trained.astype(jnp.float32)
    frozen_all, trained_all = gather(frozen, axis), gather(trained, axis)
    weights = 0.5 * (1.0 + frozen @ frozen_all.T)  # (b, B): this shard's rows; symmetric in i, j
    scale = scale_value(enc.logit_scale, cfg)
    logits_ft = scale * frozen @ trained_all.T  # this shard's frozen rows vs every trained column
    logits_tf = scale * trained @ frozen_all.T
    b = frozen.shape[0]
    labels = jnp.arange(b) + b * shard_index(axis)
    back = (weighted_cross_entropy(logits_tf, weights) if own.bidirectional
            else smoothed_ce(logits_tf, labels, 0.0))
    per_row = weighted_cross_entropy(logits_ft, weights) + back
    loss = 0.5 * mean_over(per_row.mean(), axis)
    # Metrics in the pair's orientation, like CLIP's (i2t: rows of loss.pair[0]).
    logits_xy, logits_yx = (logits_ft, logits_tf) if frozen_first else (logits_tf, logits_ft)
    metrics = batch_stats(logits_xy, labels, axis)
    metrics["t2i_acc"] = mean_over(jnp.mean(jnp.argmax(logits_yx, -1) == labels), axis)
    # How much of each row's target stays on its own pair (1 under CLIP; 1/B if the frozen tower
    # sees every sample as the same).
    own_weight = jnp.take_along_axis(weights, labels[:, None], -1)[:, 0] / weights.sum(-1)
    metrics["cwcl_target_on_pair"] = mean_over(own_weight.mean(), axis)
    return loss, metrics
