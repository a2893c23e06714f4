"""m²-mix: geodesic multimodal mixup as hard negatives (Oh et al. 2023, "Geodesic Multi-Modal
Mixup for Robust Fine-Tuning", arXiv 2203.03897).

Each matched pair (x_j, y_j) is mixed on the unit sphere, m_j = slerp_λ(x_j, y_j), with one
λ ~ Beta(α, α) per step. The mixes replace the off-diagonal entries of two extra contrastive
problems at their own temperature τ (the diagonal keeps the pair's own similarity):

    ℓ^x_ij = ⟨x_i, y_i⟩ if i = j else ⟨x_i, m_j⟩,   ℓ^y_ij = ⟨y_i, x_i⟩ if i = j else ⟨y_i, m_j⟩
    term = CE_rows(ℓ^x / τ) + CE_rows(ℓ^y / τ)       (means over the global batch)

added to the main objective by weight: `loss.aux.m2mix = 0.01`, settings under `loss.m2mix`. λ
comes from the step's key (`Encoded.key`, set by the trainer from seed and step), so a resumed
run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclip.losses.core import gather, mean_over, register, shard_index

# Below this sin θ the two vectors (nearly) coincide or are antipodal; slerp's 1/sin θ is then
# unstable (the reference code divides anyway and returns NaN), so the normalised lerp is used.
_MIN_SIN = 1e-6


def slerp(a: jax.Array, b: jax.Array, lam) -> jax.Array:
    """The point at fraction λ from b to a on the great circle through unit vectors a and b:
    λ = 1 gives a, λ = 0 gives b. Rows of (..., D); falls back to the normalised lerp where
    sin θ < 1e-6, with finite gradients on both branches."""
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True), -1.0, 1.0)
    theta = jnp.arccos(jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7))
    sin = jnp.sin(theta)
    use_slerp = jnp.abs(sin) >= _MIN_SIN
    safe_sin = jnp.where(use_slerp, sin, 1.0)  # no 0/0 in the branch jnp.where discards
    geodesic = (jnp.sin(lam * theta) * a + jnp.sin((1.0 - lam) * theta) * b) / safe_sin
    lerp = lam * a + (1.0 - lam) * b
    lerp = lerp * jax.lax.rsqrt(jnp.maximum(jnp.sum(lerp * lerp, -1, keepdims=True), 1e-12))
    return jnp.where(use_slerp, geodesic, lerp)


def mixing_ratio(key: jax.Array | None, alpha: float) -> jax.Array:
    if key is None:
        raise ValueError("m2mix draws its mixing ratio from the step's key (Encoded.key), which "
                         "the trainer sets; pass one when calling the objective directly")
    return jax.random.beta(jax.random.fold_in(key, 0x6D32), alpha, alpha)


def _mixed_ce(anchor, own_pos, mixes_all, labels, scale):
    """Mean over rows of CE: the mixes as negatives, the pair's own similarity as positive."""
    logits = anchor @ mixes_all.T
    is_pos = jnp.arange(mixes_all.shape[0])[None, :] == labels[:, None]
    logits = scale * jnp.where(is_pos, own_pos[:, None], logits)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - scale * own_pos)


@register("m2mix", impls=("all_gather", "dense"), config=dict(alpha=0.5, temperature=0.07))
def m2mix(enc, cfg, axis):
    """Geodesic-mixup hard negatives (m²-mix); add it as `loss.aux.m2mix = weight`."""
    opts = cfg.m2mix
    lam = mixing_ratio(enc.key, opts.alpha)
    x, y = enc.x.astype(jnp.float32), enc.y.astype(jnp.float32)
    mixes_all = gather(slerp(x, y, lam), axis)
    pos = jnp.sum(x * y, axis=-1)
    labels = jnp.arange(x.shape[0]) + x.shape[0] * shard_index(axis)
    scale = 1.0 / opts.temperature
    term = _mixed_ce(x, pos, mixes_all, labels, scale) + _mixed_ce(y, pos, mixes_all, labels,
                                                                   scale)
    return mean_over(term, axis), {"m2mix_lambda": jax.lax.stop_gradient(lam)}
