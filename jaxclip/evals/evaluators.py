"""Evaluator types: each loads its data through the data layer and scores embeddings.

retrieval   image<->text Recall@K, mean/median rank over a held-out split of jaxclip records
            (every caption of a record counts as a positive of its image).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxclip.data import pipeline, records
from jaxclip.evals import register
from jaxclip.evals.retrieval import retrieval_metrics


@dataclasses.dataclass
class EvalSet:
    images: np.ndarray  # (N, H, W, 3) uint8, preprocessed (resize + centre crop)
    tokens: np.ndarray  # (M, T) int32, every caption of every record
    text_to_image: np.ndarray  # (M,) int32: the record index of each caption
    labels: dict[str, np.ndarray]  # label name -> (N,) int


def load_eval_set(ctx, dataset: str, split: str, max_examples: int = 0) -> EvalSet:
    """Decodes a split once per run (cached on the context)."""
    cfg = ctx.cfg
    key = (dataset, split, max_examples)
    if key in ctx.cache:
        return ctx.cache[key]
    directory = pipeline.dataset_dir(dataset, cfg.data.cache_dir)
    recs = []
    for rec in records.iter_records(records.shard_paths(directory, split)):
        recs.append(rec)
        if max_examples and len(recs) >= max_examples:
            break
    size = cfg.data.image_size if cfg.data.image_size > 0 else cfg.model.image.image_size

    def decode(rec):
        return np.asarray(pipeline.resize_center(pipeline.decode_image(rec["image"]), size),
                          np.uint8)

    with ThreadPoolExecutor(4) as pool:
        images = np.stack(list(pool.map(decode, recs)))
    captions, owner = [], []
    for i, rec in enumerate(recs):
        captions += rec["captions"]
        owner += [i] * len(rec["captions"])
    tokens = ctx.tokenizer(captions, context_length=cfg.model.text.context_length)
    label_names = set().union(*(r["labels"].keys() for r in recs)) if recs else set()
    labels = {k: np.asarray([r["labels"].get(k, -1) for r in recs]) for k in label_names}
    out = EvalSet(images, tokens.astype(np.int32), np.asarray(owner, np.int32), labels)
    ctx.cache[key] = out
    return out


@register("retrieval", dataset="", split="val", max_examples=0, ks=(1, 5, 10))
def retrieval(ctx, spec, params) -> dict[str, float]:
    data = load_eval_set(ctx, spec["dataset"] or ctx.cfg.data.train.dataset, spec["split"],
                         spec["max_examples"])
    img = ctx.embed(ctx.encode_image, params, data.images, spec["batch_size"])
    txt = ctx.embed(ctx.encode_text, params, data.tokens, spec["batch_size"])
    return retrieval_metrics(img, txt, data.text_to_image, ks=tuple(spec["ks"]), mesh=ctx.mesh)
