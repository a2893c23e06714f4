"""The frozen teacher of the distillation terms (`loss.aux.kd`, `loss.aux.modx`).

Loaded once per run from `loss.teacher.path` (a jaxclip workdir or params dir, a HF CLIPModel dir or
an open_clip dir: `interop.sources.read`) and placed on the student's mesh with its own layout's
shardings. It is not part of the train state: no optimizer state, never checkpointed, passed to the
jitted step as its own (non-donated) argument and reloaded from the path on resume. Inside the step
it encodes the step's batch in inference mode, under stop_gradient, from the raw uint8 images
(normalised with the teacher's mean/std and resized to its image size) and the student's tokens
(padded to the teacher's context length), micro-batch by micro-batch under `train.microbatches`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import accumulate, config, losses, runtime, tree
from jaxclip.data.images import normalize_images
from jaxclip.models import Encoded
from jaxclip.tokenizer import from_config as tokenizer_from_config

# Captions the two tokenizers must encode identically (case, punctuation, digits, rare words).
_PROBES = ("a photo of a dog.", "A LARGE red circle above a small blue square",
           "two 3D-printed cats, 1999; naïve café #tag")


@dataclasses.dataclass
class Teacher:
    layout: runtime.Layout  # the teacher's model on the student's mesh
    params: dict  # full parameter tree, placed with layout.param_shardings; never updated
    path: str

    cfg = property(lambda self: self.layout.cfg)


def _check_tokenizers(cfg, tcfg, path: str) -> None:
    """The batch's tokens come from the student's tokenizer; the teacher must read them alike."""
    t_len, s_len = tcfg.model.text.context_length, cfg.model.text.context_length
    if t_len < s_len:  # cutting captions would drop their end token, which CLIP text pools at
        raise config.ConfigError(
            f"loss.teacher.path={path}: the teacher's text context_length {t_len} is shorter than "
            f"the student's {s_len}; set model.text.context_length <= {t_len}")
    student, teacher = tokenizer_from_config(cfg), tokenizer_from_config(tcfg)
    if student.vocab_size != teacher.vocab_size or student.pad_id != teacher.pad_id or any(
            (student(p, s_len) != teacher(p, s_len)).any() for p in _PROBES):
        raise config.ConfigError(
            f"loss.teacher.path={path}: the teacher's tokenizer ({dict(tcfg.data.tokenizer)}) "
            f"differs from the student's data.tokenizer ({dict(cfg.data.tokenizer)}); the "
            "teacher would read the student's token ids as other words")


def load(cfg, mesh) -> Teacher | None:
    """The teacher `cfg.loss.teacher` names, placed on `mesh`; None if no term reads one."""
    from jaxclip.interop import sources

    if not losses.needs_teacher(cfg.loss):
        return None
    path = cfg.loss.teacher.path  # named and a directory: checked in preflight (losses.distill)
    try:
        pre = sources.read(path, step=cfg.loss.teacher.step or None)
    except (ValueError, FileNotFoundError) as e:
        raise config.ConfigError(f"loss.teacher.path={path}: {e}") from None
    _check_tokenizers(cfg, pre.cfg, path)
    lay = runtime.layout(pre.cfg, mesh)
    return Teacher(lay, runtime.place_params(tree.unflatten(pre.params), lay), path)


def _log_scale(params: dict, tcfg) -> jax.Array:
    """The log of the teacher's logit multiplier, whichever way its config stores it."""
    raw = params["logit_scale"].astype(jnp.float32)
    return -jnp.log(raw) if tcfg.loss.scale_param == "temperature" else raw


def encode(teacher: Teacher, params: dict, images: jax.Array, text: jax.Array,
           microbatches: int = 1, mesh=None) -> Encoded:
    """The teacher's `Encoded` of a batch (uint8 images (B, H, W, 3), the student's tokens
    (B, T)), without gradient; embeddings only, and its log logit scale."""
    tcfg = teacher.cfg
    size = tcfg.model.image.image_size
    pad = tcfg.model.text.context_length - text.shape[-1]
    model = nnx.merge(teacher.layout.graphdef, params)

    def embed(x):
        # Per micro-batch, so that no full-batch float copy of the pixels is kept either.
        pixels = normalize_images(x["image"], tcfg.data.mean, tcfg.data.std)
        if pixels.shape[1:3] != (size, size):
            pixels = jax.image.resize(pixels, (pixels.shape[0], size, size, 3), "bilinear")
        tokens = x["text"]
        if pad:  # longer than the student's: the rest is padding (checked at load)
            tokens = jnp.pad(tokens, ((0, 0), (0, pad)), constant_values=tcfg.model.text.pad_id)
        return model.encode_all({"image": pixels, "text": tokens}).emb

    emb = accumulate.forward(embed, {"image": images, "text": text}, microbatches, mesh)
    return jax.lax.stop_gradient(Encoded(emb, _log_scale(params, tcfg)))
