"""Distillation from a frozen teacher: open_clip's KD term and Mod-X's screened KL.

Both are auxiliary terms (`loss.aux.kd = w`, `loss.aux.modx = w`) that compare the student's
image-text similarity matrix with the teacher's on the same global batch. The teacher (a jaxclip
workdir or params dir, a HF CLIPModel or an open_clip directory, `loss.teacher.path`) is run by the
trainer in inference mode and its L2-normalised embeddings arrive in `Encoded.teacher`, sharded
like the student's, with its own log logit scale. Teacher and student may differ in size and
embedding width: only the B x B similarity matrices are compared.

KD (open_clip's `DistillClipLoss`, as used for the distilled open_clip models):
    S = t_s·X Yᵀ (student, its own scale), T = t_t·X° Y°ᵀ (teacher, the teacher's own scale)
    L_KD = ½[H(softmax T_i, log_softmax S_i) averaged over rows i
             + the same over columns]                     (H(p, log q) = -Σ_j p_j log q_j)
Its gradient is softmax S - softmax T per row, so a student that equals the teacher gets none.

Mod-X (Ni et al., ICML 2023, "Continual Vision-Language Representation Learning with Off-Diagonal
Information", arXiv 2305.07437), for continual training where the teacher is the previous model:
    S = X Yᵀ / τ, S° = X° Y°ᵀ / τ     (raw cosines; τ = 1 in the paper, i.e. no scale)
    rows whose old argmax is not the diagonal are screened ("cognition align": the reference
    code replaces S°_i by S_i, so the row's KL is 0), the same for columns;
    L_ModX = ½[(1/B) Σ_i KL(softmax S°_i ‖ softmax S_i) + the same over columns].
The paper sums the KL over the rows of each GPU's batch (70 in its scripts), which ties its weight
α = 20 to that batch size. Here it is the mean over the global batch, so the weight does not change
with the batch: α_mean = α_sum · b, i.e. the paper's setting is `loss.aux.modx = 20 * 70 = 1400`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxclip.losses.core import (
    after,
    declare,
    gather,
    mean_over,
    register,
    scale_value,
    shard_index,
)

# The teacher every distillation term reads, loaded once by the trainer (jaxclip/teacher.py).
# path: a jaxclip workdir or params dir, a HF CLIPModel dir or an open_clip dir ("" = none);
# step: the workdir checkpoint to read (0 = the newest).
declare("teacher", dict(path="", step=0))


def _teacher_pair(enc, axis):
    """The teacher's (x, y) embeddings, float32 and without gradient.

    Read through the student's pair so that their gathers come after whatever the student's
    embeddings wait for (the ring's loops: core.after), with no gradient path back."""
    t = enc.teacher
    if t is None:
        raise ValueError("a distillation term needs the teacher's embeddings (Encoded.teacher); "
                         "set loss.teacher.path")
    tx, ty = (jax.lax.stop_gradient(t.emb[m].astype(jnp.float32)) for m in enc.pair)
    return after((tx, ty), jax.lax.stop_gradient((enc.x, enc.y)), axis)


def _both_directions(x, y, tx, ty, axis):
    """This shard's rows of S = X Yᵀ and of its transpose (columns), for student and teacher,
    as cosines, and the rows' global labels."""
    b = x.shape[0]
    labels = jnp.arange(b) + b * shard_index(axis)
    student = (x @ gather(y, axis).T, y @ gather(x, axis).T)
    teacher = (tx @ gather(ty, axis).T, ty @ gather(tx, axis).T)
    return student, teacher, labels


def soft_cross_entropy(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per row: H(softmax target, log_softmax logits) = -Σ_j p_j log q_j."""
    p = jax.nn.softmax(target_logits, axis=-1)
    return -jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def kl_rows(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per row: KL(softmax target ‖ softmax logits)."""
    logp = jax.nn.log_softmax(target_logits, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - jax.nn.log_softmax(logits, axis=-1)), axis=-1)


def _teacher_given(cfg) -> None:
    """Both terms read a teacher: its directory must be named and exist before a run starts (the
    trainer loads it in build, jaxclip/teacher.py)."""
    path = cfg.loss.teacher.path
    if not path:
        raise ValueError("loss.aux.kd / loss.aux.modx distil from a teacher: set "
                         "loss.teacher.path (a jaxclip workdir, HF or open_clip dir)")
    if not os.path.isdir(path):
        raise ValueError(f"loss.teacher.path={path}: not a directory")


@register("kd", impls=("all_gather", "dense"), needs_teacher=True, check=_teacher_given)
def kd(enc, cfg, axis):
    """open_clip's distillation term: cross-entropy from the teacher's softmax to the
    student's, rows and columns, each at its own model's logit scale."""
    x, y = enc.x.astype(jnp.float32), enc.y.astype(jnp.float32)
    tx, ty = _teacher_pair(enc, axis)
    student, teacher, labels = _both_directions(x, y, tx, ty, axis)
    # The student's scale as its loss reads it (learnable or not); the teacher's is a constant,
    # stored as the log of its multiplier whatever the teacher's own scale_param was.
    s_scale = scale_value(enc.logit_scale, cfg)
    t_scale = jnp.exp(jax.lax.stop_gradient(enc.teacher.logit_scale.astype(jnp.float32)))
    per_row = sum(soft_cross_entropy(t_scale * t, s_scale * s) for s, t in zip(student, teacher))
    loss = 0.5 * mean_over(per_row.mean(), axis)
    # Diagnostics: how often the student's top match is the teacher's, and the teacher's own
    # retrieval accuracy on the batch (what the student is being pulled towards).
    agree = jnp.argmax(student[0], -1) == jnp.argmax(teacher[0], -1)
    metrics = {"kd_agreement": mean_over(agree.mean(), axis),
               "kd_teacher_acc": mean_over(jnp.mean(jnp.argmax(teacher[0], -1) == labels), axis),
               "kd_teacher_scale": t_scale}
    return loss, metrics


@register("modx", impls=("all_gather", "dense"), needs_teacher=True, check=_teacher_given,
          config=dict(temperature=1.0, screen_wrong_rows=True))
def modx(enc, cfg, axis):
    """Mod-X: KL from the old model's similarity rows (and columns) to the new model's, with
    the rows the old model gets wrong screened out; mean over the global batch."""
    own = cfg.modx
    if own.temperature <= 0:
        raise ValueError(f"loss.modx.temperature must be > 0, got {own.temperature}")
    x, y = enc.x.astype(jnp.float32), enc.y.astype(jnp.float32)
    tx, ty = _teacher_pair(enc, axis)
    student, teacher, labels = _both_directions(x, y, tx, ty, axis)
    loss, metrics = 0.0, {}
    for name, s, t in zip(("rows", "cols"), student, teacher):
        kept = jnp.ones(labels.shape, jnp.float32)
        if own.screen_wrong_rows:
            kept = (jnp.argmax(t, -1) == labels).astype(jnp.float32)
        # A screened row contributes exactly 0 and no gradient (the reference code's S°_i <- S_i).
        per_row = kept * kl_rows(t / own.temperature, s / own.temperature)
        loss = loss + 0.5 * mean_over(per_row.mean(), axis)
        metrics[f"modx_screened_{name}"] = 1.0 - mean_over(kept.mean(), axis)
    return loss, metrics
