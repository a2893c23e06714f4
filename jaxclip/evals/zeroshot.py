"""Zero-shot classification: prompt formatting, prompt-ensembled classifiers and top-k accuracy.

CLIP's zero-shot protocol (arXiv 2103.00020): every class name is put into each of T prompt
templates, the text tower embeds the C x T prompts, each class's T embeddings are averaged and
re-normalised into one classifier row, and an image is classified by its most similar row. Top-k
accuracy is then retrieval with the classifier as gallery and one positive per image, so it runs
on the same chunked, sharded rank kernel as retrieval (ties broken by class index, as a stable
sort would).

Class-name lists and template sets live with the dataset definitions, not here.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip.evals import retrieval
from jaxclip.evals.retrieval import DEFAULT_QUERY_CHUNK

Template = str | Callable[[str], str]


def _fill(template: Template, name: str) -> str:
    """One prompt; str templates use `{}` or `{c}` placeholders (`{{`/`}}` for literal braces)."""
    if callable(template):
        return template(name)
    parts, n_fields = [], 0
    for literal, field, spec, conversion in string.Formatter().parse(template):
        parts.append(literal)
        if field is None:
            continue
        if field not in ("", "c") or spec or conversion:
            raise ValueError(f"template {template!r}: only {{}} or {{c}} placeholders are allowed")
        parts.append(name)
        n_fields += 1
    if n_fields == 0:
        raise ValueError(f"template {template!r} has no {{}} or {{c}} placeholder")
    return "".join(parts)


def format_prompts(class_names: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All prompts, class-major: [t(c) for c in class_names for t in templates].

    The class-major order is what lets the (C * T, d) text embeddings be reshaped to (C, T, d)
    for build_classifier. Templates are strings with `{}` or `{c}` placeholders (each occurrence
    is replaced by the class name) or callables name -> prompt (open_clip's lambda style).
    """
    if not templates:
        raise ValueError("need at least one template")
    return [_fill(t, name) for name in class_names for t in templates]


@jax.jit
def _ensemble(emb: jax.Array) -> jax.Array:
    def normalise(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    # Normalising each prompt first (a no-op for normalised inputs) keeps any one prompt from
    # dominating the average through its norm, as in CLIP's zero-shot notebook.
    return normalise(jnp.mean(normalise(emb), axis=1))


def build_classifier(text_emb_per_class) -> jax.Array:
    """(C, T, d) prompt embeddings -> (C, d) unit rows: mean over templates, renormalised."""
    emb = jnp.asarray(text_emb_per_class, jnp.float32)
    if emb.ndim != 3:
        raise ValueError(f"need (n_classes, n_templates, d) embeddings, got shape {emb.shape}")
    return _ensemble(emb)


def classification_metrics(
    image_emb,
    classifier,
    labels,
    ks: Sequence[int] = (1, 5),
    *,
    mesh: jax.sharding.Mesh | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    return_ranks: bool = False,
) -> dict:
    """Top-k accuracy ({"top1": ..., "top5": ...}, fractions) of images against classifier rows.

    image_emb (N, d) and classifier (C, d) are L2-normalised; labels (N,) are class indices. An
    image counts as correct at k if its class is within its first k classes by similarity, ties
    broken by class index. return_ranks adds the 1-based rank of the true class ("ranks").
    """
    labels = np.asarray(labels).astype(np.int64)
    n_classes = np.shape(classifier)[0]
    if labels.shape != (np.shape(image_emb)[0],):
        raise ValueError(f"need one label per image, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    ranks = retrieval.retrieval_ranks(
        image_emb,
        classifier,
        labels,
        np.arange(n_classes),
        query_chunk=query_chunk,
        mesh=mesh,
    )
    out: dict = {f"top{k}": float(np.mean(ranks <= k)) for k in ks}
    if return_ranks:
        out["ranks"] = ranks
    return out
