"""SimCLR's NT-Xent between two views of each image: SLIP's image-image term.

SLIP (Mu et al. 2021, "SLIP: Self-supervision meets Language-Image Pre-training", arXiv
2112.12750) trains L_CLIP + c·L_SimCLR with c = 1. L_SimCLR is SimCLR's loss (Chen et al. 2020,
arXiv 2002.05709) over the 2B views of a global batch of B images, each view through a
projection head (models/heads.py `ViewHead`) and L2-normalised:

    ℓ(u) = -log  exp(⟨u, u⁺⟩/τ) / Σ_{w ≠ u} exp(⟨u, w⟩/τ)        L = mean of ℓ over all 2B views

u⁺ is the other view of u's image, and the sum runs over the other 2B − 1 views of the global
batch (u⁺ and 2B − 2 negatives). SLIP's τ is 0.1, fixed. "Cross the Gap" (Mistretta et al.
2025, arXiv 2502.04263) shows CLIP's image-image retrieval suffering from intra-modal
misalignment and names such an intra-modal term as one remedy.

Config: `loss.aux.simclr = c` (the weight), `loss.simclr.temperature = τ`. It reads
`Encoded.emb["image_views"]` (B, V, E'), which the model gives when the batch has several views
of each image (`data.views = 2`) and the image tower a view head (`model.image.view_head.out`);
views 0 and 1 are the pair. Under shard_map each shard holds its images' views, gathers the
global batch's, and scores its own rows against all of them: the loss of the whole global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip.losses.core import gather, mean_over, register, shard_index

VIEWS_KEY = "image_views"
# The registered terms that read VIEWS_KEY (the trainer refuses data.views > 1 without one).
VIEW_OBJECTIVES = ("simclr",)


def _rows_loss(own, own_all, other_all, labels, scale):
    """ℓ of this shard's rows of one view: the candidates are every row of the other view (the
    positive at `labels`) and every row of the same view except the row itself."""
    pos_logits = scale * own @ other_all.T  # (b, B)
    same = scale * own @ own_all.T
    self_mask = jnp.arange(own_all.shape[0])[None, :] == labels[:, None]
    same = jnp.where(self_mask, -jnp.inf, same)
    lse = jax.nn.logsumexp(jnp.concatenate([pos_logits, same], axis=-1), axis=-1)
    positive = jnp.take_along_axis(pos_logits, labels[:, None], -1)[:, 0]
    # Top-1 among the 2B - 1 candidates: the positive beats every other view of both kinds.
    hit = (positive >= pos_logits.max(-1)) & (positive > same.max(-1))
    return lse - positive, hit


def _views_given(cfg) -> None:
    """The term contrasts views 0 and 1 through the view head: both must be configured."""
    term = "loss.name=simclr" if cfg.loss.name == "simclr" else "loss.aux.simclr"
    if cfg.data.views < 2:
        raise ValueError(f"{term} contrasts two views of each image: set data.views=2 (it is "
                         f"{cfg.data.views})")
    if cfg.model.image.view_head.out < 1:
        raise ValueError(f"{term} needs a view head: set model.image.view_head.out (e.g. 128)")


@register("simclr", config=dict(temperature=0.1), check=_views_given)
def simclr(enc, cfg, axis):
    """SimCLR's NT-Xent between two views of each image (SLIP); `loss.aux.simclr = weight`."""
    if VIEWS_KEY not in enc.emb:
        raise ValueError("loss.aux.simclr contrasts two views of each image: it needs "
                         "data.views >= 2 and a view head (model.image.view_head.out > 0)")
    views = enc.emb[VIEWS_KEY].astype(jnp.float32)
    if views.ndim != 3 or views.shape[1] < 2:
        raise ValueError(f"loss.aux.simclr needs (B, V >= 2, E) view embeddings, got "
                         f"{views.shape}")
    a, b = views[:, 0], views[:, 1]
    a_all, b_all = gather(a, axis), gather(b, axis)
    labels = jnp.arange(a.shape[0]) + a.shape[0] * shard_index(axis)
    scale = 1.0 / cfg.simclr.temperature
    loss_a, hit_a = _rows_loss(a, a_all, b_all, labels, scale)
    loss_b, hit_b = _rows_loss(b, b_all, a_all, labels, scale)
    loss = mean_over(0.5 * (loss_a.mean() + loss_b.mean()), axis)
    metrics = {
        # How often a view's nearest of the other 2B - 1 views is its own image's other view.
        "simclr_acc": mean_over(0.5 * (hit_a.mean() + hit_b.mean()), axis),
        # Mean cosine between the two views of an image (1: the head ignores the augmentation).
        "simclr_pos_cos": mean_over(jnp.mean(jnp.sum(a * b, -1)), axis),
    }
    return loss, jax.lax.stop_gradient(metrics)
