"""1-to-K contrastive loss: several captions of one image are all its positives.

From "Improving the Consistency in Cross-Lingual Cross-Modal Retrieval with 1-to-K Contrastive
Learning" (Nie et al., KDD 2024, arXiv 2406.18254). Each image i comes with K captions (languages
in the paper, templates or COCO's five captions here); the text side is the B·K captions of the
global batch, and a caption slot may be absent (an image with fewer than K captions), given by a
(B, K) mask.

  image -> text   one softmax row per image over every present caption of the batch; each of
                  the image's present captions is a target of that same row, so the K positives
                  compete only with the negatives, never against each other as K separate
                  one-hot rows would make them (which is what gives the paper's consistency);
  text -> image   one softmax row per present caption over the B images, target its own image.

  L = ½ [ (1/N) Σ_{(i,k) present} −log softmax_row(S_i)_{(i,k)}
        + (1/N) Σ_{(i,k) present} −log softmax_col(S)_{(i,k), i} ],    N = number present,
  S = t · X Yᵀ ∈ ℝ^{B × BK}, absent captions removed from every softmax (−∞ logits).

With K = 1 and no mask this is CLIP's symmetric InfoNCE exactly. Both directions are means over
the present captions, so each caption weighs the same in either direction and appending an absent
caption changes nothing. The paper's code divides the sum of the image -> text sums (per image,
over its K captions) and of the per-caption text -> image mean by 2K, which weighs the text ->
image direction K times less; that is not reproduced here.

Runs as all_gather (each shard: its images against every caption, its captions against every
image, O(b·B·K) logits) or dense; no ring form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip.losses.core import (
    gather,
    num_shards,
    register,
    scale_value,
    shard_index,
    sum_over,
)

# The objectives that read a modality given as K items per row (data.caption = "all"); every
# other objective expects one caption per image.
MULTI_CAPTION_OBJECTIVES = ("one_to_k",)


def _captions_and_mask(enc):
    """The pair's second modality as (b, K, D) with its (b, K) presence mask (all present when
    the batch has one caption per image)."""
    texts = enc.y
    present = enc.y_present
    if texts.ndim == 2:
        texts = texts[:, None, :]
    if present is None:
        present = jnp.ones(texts.shape[:2], bool)
    return texts, present.reshape(texts.shape[:2])


@register("one_to_k")
def one_to_k(enc, cfg, axis):
    """1-to-K contrastive (Nie et al. 2024): an image's K captions share one softmax row."""
    scale = scale_value(enc.logit_scale, cfg)
    images = enc.x.astype(jnp.float32)  # (b, D)
    texts, present = _captions_and_mask(enc)
    b, k, d = texts.shape
    flat_texts = texts.reshape(b * k, d).astype(jnp.float32)
    flat_present = present.reshape(b * k)
    own = jnp.arange(b) + b * shard_index(axis)  # global index of this shard's images

    # Image -> text: this shard's images against all B·K captions (shard-major, then slot).
    all_present = gather(flat_present, axis)
    logits_i2t = scale * images @ gather(flat_texts, axis).T  # (b, B·K)
    logits_i2t = jnp.where(all_present[None, :], logits_i2t, -jnp.inf)
    logp_i2t = jax.nn.log_softmax(logits_i2t, axis=-1)
    own_columns = own[:, None] * k + jnp.arange(k)[None, :]  # (b, K)
    logp_own = jnp.take_along_axis(logp_i2t, own_columns, axis=-1)
    i2t_sum = jnp.sum(jnp.where(present, -logp_own, 0.0))

    # Text -> image: this shard's captions against all B images.
    logits_t2i = scale * flat_texts @ gather(images, axis).T  # (b·K, B)
    labels = jnp.repeat(own, k)
    logp_t2i = jax.nn.log_softmax(logits_t2i, axis=-1)
    nll_t2i = -jnp.take_along_axis(logp_t2i, labels[:, None], axis=-1)[:, 0]
    t2i_sum = jnp.sum(jnp.where(flat_present, nll_t2i, 0.0))

    count = sum_over(jnp.sum(present).astype(jnp.float32), axis)
    loss = 0.5 * (sum_over(i2t_sum, axis) + sum_over(t2i_sum, axis)) / count

    # Diagnostics: an image's top caption is one of its own; a caption's top image is its own.
    hit_i2t = jnp.argmax(logits_i2t, axis=-1) // k == own
    hit_t2i = (jnp.argmax(logits_t2i, axis=-1) == labels) & flat_present
    pos_logit = jnp.sum(jnp.where(present, jnp.sum(images[:, None] * texts, -1), 0.0))
    metrics = {
        "i2t_acc": sum_over(jnp.sum(hit_i2t).astype(jnp.float32), axis) / (b * num_shards(axis)),
        "t2i_acc": sum_over(jnp.sum(hit_t2i).astype(jnp.float32), axis) / count,
        "pos_logit": scale * sum_over(pos_logit, axis) / count,
        "captions_per_image": count / (b * num_shards(axis)),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

