"""FILIP: token-wise late interaction (Yao et al. 2021, "FILIP: Fine-grained Interactive
Language-Image Pre-Training", arXiv 2111.07783).

Each sample is a set of L2-normalised tokens (image: patch tokens without the class token; text:
word tokens with a mask of the real ones). The similarity of image i and text j is not one dot
product but a late interaction of their token sets, and it is asymmetric:

  s^I_ij = mean over the patches k of i of  max over the real words r of j  <P_ik, W_jr>
  s^T_ij = mean over the real words r of j of  max over the patches k of i  <P_ik, W_jr>

The loss is CLIP's with these two logit matrices: ½[CE_rows(t·S^I) + CE_rows(t·(S^T)ᵀ)]. Both
are one function, `late_interaction(query, query_mask, keys, keys_mask)` (the mean over the
query's real tokens of their best match among the keys' real tokens), called with the roles of
the towers swapped; each shard computes its own rows of both matrices against the gathered other
tower.

Padding is masked with -inf inside the max, never zero-filled: a zero pad scores 0, which beats
every real token when all real similarities are negative (the MindSpore port's bug).

Memory. The token similarities of this shard's b samples against the B gathered ones are
b x B x n1 x n2 numbers; they are computed by a scan over chunks of `loss.filip.chunk` samples of
the other tower, each chunk reduced at once to its b x chunk late-interaction scores, and the
scan body is rematerialised in the backward pass, so one chunk's similarities are alive at a time.

Communication. Before the gather each shard may keep only the `keep_frac` share of each sample's
tokens that match best any real token of the shard's counterparts (FILIP keeps 25%), and send
them in `comm_dtype` (FILIP: fp16). The selection depends on which samples share a shard, as in
the paper, so with keep_frac < 1 the loss changes with the per-device batch.

There is no ring form: it is possible (the rows are ordinary softmax rows, so a ring could fold
b x b blocks of both matrices into running log-sum-exps, passing both towers' token blocks, as
Inf-CL does for CLIP), but the gathered tokens (B x kept tokens x d, 200 MB at B = 32k, 12 kept
tokens of 256-d in bf16) are far smaller than the towers' activations, and the ring kernel would
need a second backward pass through the token maxima.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxclip.losses.contrastive import batch_stats, smoothed_ce
from jaxclip.losses.core import gather, mean_over, register, scale_value, shard_index

COMM_DTYPES = ("float32", "bfloat16", "float16")


def _chunk_size(n: int, chunk: int) -> int:
    """The largest divisor of n not above `chunk` (0 or more than n: n, one step)."""
    if chunk <= 0 or chunk >= n:
        return n
    return max(d for d in range(1, chunk + 1) if n % d == 0)


def _over_chunks(fn, others, chunk: int) -> jax.Array:
    """fn applied to successive chunks of `others` (arrays sharing their leading axis), stacked:
    (number of chunks, ...). The scan body is rematerialised in the backward pass, so only one
    chunk's token similarities are alive at a time."""
    n = jax.tree.leaves(others)[0].shape[0]
    size = _chunk_size(n, chunk)
    if size == n:
        return fn(others)[None]
    blocks = jax.tree.map(lambda a: a.reshape(n // size, size, *a.shape[1:]), others)
    body = jax.checkpoint(lambda carry, block: (carry, fn(block)), prevent_cse=False)
    return jax.lax.scan(body, None, blocks)[1]


def _similarities(query, keys, keys_mask):
    """(b, c, n_query, n_keys) token similarities; the keys' pads are -inf, so no max picks them."""
    sim = jnp.einsum("ind,jmd->ijnm", query, keys, preferred_element_type=jnp.float32)
    return jnp.where(keys_mask[None, :, None, :], sim, -jnp.inf)


def late_interaction(query, query_mask, keys, keys_mask):
    """(b, c): for query set i and key set j, the mean over i's real tokens of the best
    similarity with any real token of j."""
    best = jnp.max(_similarities(query, keys, keys_mask), axis=-1)  # (b, c, n_query)
    # A select, not a product: a key set with no real token gives -inf, and -inf·0 is NaN.
    total = jnp.sum(jnp.where(query_mask[:, None, :], best, 0.0), axis=-1)
    return total / jnp.sum(query_mask, axis=-1)[:, None]


def pack_token_sets(tokens, mask=None) -> jax.Array:
    """(N, T, D) L2-normalised token features and their (N, T) bool mask (None: all real) as one
    (N, T, D + 1) float32 array whose last coordinate is the mask: the form in which token sets
    go through the retrieval runner (evals/retrieval.py pads and shards one array per side)."""
    tokens = jnp.asarray(tokens, jnp.float32)
    mask = jnp.ones(tokens.shape[:2], jnp.float32) if mask is None else jnp.asarray(mask, bool)
    return jnp.concatenate([tokens, mask.astype(jnp.float32)[..., None]], axis=-1)


def unpack_token_sets(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `pack_token_sets`: (tokens (..., T, D), mask (..., T) bool)."""
    return packed[..., :-1], packed[..., -1] > 0.5


def late_interaction_logits(query, query_mask, keys, keys_mask, chunk: int) -> jax.Array:
    """(b, B) late-interaction scores of each local query set against every key set, computed
    chunk by chunk of the key sets."""
    scores = _over_chunks(lambda blk: late_interaction(query, query_mask, *blk),
                          (keys, keys_mask), chunk)  # (chunks, b, c)
    return jnp.moveaxis(scores, 0, 1).reshape(query.shape[0], -1)


def keep_best_tokens(tokens, mask, others, others_mask, keep_frac: float, chunk: int):
    """The ceil(keep_frac·n) tokens of each set that best match any real token of any of
    `others` (FILIP's selection among the shard's own counterparts), with their mask. Real tokens
    are kept before pads; the selection itself is not differentiated, the kept tokens are."""
    n = tokens.shape[1]
    keep = max(1, math.ceil(keep_frac * n))
    if keep >= n:
        return tokens, mask
    query = jax.lax.stop_gradient(tokens)

    def best_match(block):
        return jnp.max(_similarities(query, *block), axis=(1, 3))  # (b, n)

    score = jnp.max(_over_chunks(best_match, jax.lax.stop_gradient((others, others_mask)),
                                 chunk), axis=0)
    _, idx = jax.lax.top_k(jnp.where(mask, score, -jnp.inf), keep)
    return (jnp.take_along_axis(tokens, idx[..., None], axis=1),
            jnp.take_along_axis(mask, idx, axis=1))


def _token_set(tokens, mask):
    if tokens is None:
        raise ValueError("loss 'filip' needs per-token features; the model computes them when "
                         "the objective is registered with needs_tokens=True")
    tokens = tokens.astype(jnp.float32)
    return tokens, jnp.ones(tokens.shape[:2], bool) if mask is None else mask.astype(bool)


# keep_frac: share of each sample's tokens sent to the other shards (1.0: all; FILIP uses 0.25).
# comm_dtype: dtype of the gathered tokens (FILIP sends fp16); the local side stays float32.
# chunk: samples of the other tower per scan step (0: all at once); peak memory of the loss is
# about b·chunk·n1·n2 floats. label_smoothing: as in loss.clip (the MindSpore port uses 0.1).
@register("filip", needs_tokens=True,
          config=dict(keep_frac=1.0, comm_dtype="float32", chunk=256, label_smoothing=0.0),
          choices=dict(comm_dtype=COMM_DTYPES))
def filip(enc, cfg, axis):
    """FILIP's token-wise late-interaction contrastive loss over the global batch."""
    own = cfg.filip
    if not 0.0 < own.keep_frac <= 1.0:
        raise ValueError(f"loss.filip.keep_frac must be in (0, 1], got {own.keep_frac}")
    x, x_mask = _token_set(enc.x_tokens, enc.x_mask)
    y, y_mask = _token_set(enc.y_tokens, enc.y_mask)
    if own.keep_frac < 1.0:
        x, x_mask, y, y_mask = (*keep_best_tokens(x, x_mask, y, y_mask, own.keep_frac, own.chunk),
                                *keep_best_tokens(y, y_mask, x, x_mask, own.keep_frac, own.chunk))
    # The other tower's tokens pass through comm_dtype on every layout (dense included), so the
    # sharded loss equals the single-device one at any setting.
    comm = jnp.dtype(own.comm_dtype)

    def everyone(tokens):
        return gather(tokens.astype(comm), axis).astype(jnp.float32)

    x_all, y_all = everyone(x), everyone(y)
    x_mask_all, y_mask_all = gather(x_mask, axis), gather(y_mask, axis)
    scale = scale_value(enc.logit_scale, cfg)
    logits_xy = scale * late_interaction_logits(x, x_mask, y_all, y_mask_all, own.chunk)  # S^I
    logits_yx = scale * late_interaction_logits(y, y_mask, x_all, x_mask_all, own.chunk)  # S^Tᵀ
    b = x.shape[0]
    labels = jnp.arange(b) + b * shard_index(axis)
    eps = own.label_smoothing
    per_row = smoothed_ce(logits_xy, labels, eps) + smoothed_ce(logits_yx, labels, eps)
    loss = 0.5 * mean_over(per_row.mean(), axis)
    metrics = batch_stats(logits_xy, labels, axis)
    metrics["t2i_acc"] = mean_over(jnp.mean(jnp.argmax(logits_yx, -1) == labels), axis)
    for modality, mask in zip(enc.pair, (x_mask, y_mask)):
        metrics[f"{modality}_tokens_kept"] = mean_over(jnp.sum(mask, -1).mean(), axis)
    return loss, metrics
