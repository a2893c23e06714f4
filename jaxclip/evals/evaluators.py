"""Evaluator types: each loads its data through the data layer and scores embeddings.

Every type also takes the common keys: type, every_steps (0: only at the end), at_start,
batch_size (global, rounded up to the device count). `dataset` is a jaxclip dataset directory or
a built-in name (default: data.train.dataset); `max_examples` (0: all) takes the split's first N
records; `query_chunk` bounds the on-device score block (queries x gallery/devices).

retrieval   image<->text R@k (`ks`, default 1/5/10), mean and median rank over `split`; every
            caption of a record is a positive of its image. Keys `i2t_r1`, `t2i_median_rank`, ...
    postproc      none | qbnorm | dbnorm | invgc: hubness correction (hubness.py) with banks of
                  the first `bank_size` records of `bank_split` (default train) of `bank_dataset`
                  (default: the same dataset), never the evaluated split itself; reported next to
                  the raw metrics as `qbnorm_i2t_r1`, ... (t2i uses the bank's captions as query
                  bank and its images as gallery bank; i2t the other way round).
    beta, k, dynamic       QB-Norm's inverse temperature (20), top-k of the activation set (1),
                           dynamic=None: the method's default (QB-Norm DIS, DBNorm plain dual IS)
    beta_q, beta_g         DBNorm's query-bank and gallery-bank inverse temperatures (1/1.99, 3)
    r_g, r_q               InvGC's rates against the gallery bank and the query bank (0.1, 0.1;
                           the paper tunes them on validation data, there is no universal value:
                           at 1 the demo's val R@1 fell from 0.40 to 0.05, since its bank holds
                           near-duplicates of every test item)
    local_adj, pool_rate   InvGC's LocalAdj graph (true) and its neighbours per item as a fraction
                           of the bank (0.01)
    geometry      adds modality_gap, alignment, uniformity_image/_text, uniformity_loss
    skew_k        > 0 adds the skewness of the k-occurrence counts, `t2i_skew10` (hubness)
    scoring       pooled (cosine of the pooled embeddings) | late: FILIP's token-wise late
                  interaction over the towers' token features, as `loss.name = filip` trains
                  (image queries by s^I, caption queries by s^T); it keeps N x T x D token sets
                  of the split on the host, and cannot be combined with postproc/geometry/skew_k
    mrv           adds `t2i_mrv`, the Mean Rank Variance (`mrv_reduce` var | std) of each image's
                  caption ranks, when every record has the same number (> 1) of captions
zeroshot    top-k accuracy (`top1`, `top5`) of `split`'s images against a classifier built from
            `classes` x `templates`: each class's prompt embeddings are normalised, averaged and
            renormalised. `label` names the record label holding the class index ("class").
    classes       a named list (imagenet, imagenet_v2, imagenet_sketch, imagenet_a/_r/_o, cifar10,
                  cifar100, fashion_mnist; see prompts.py), an explicit list, or "" for the
                  dataset manifest's info.class_names
    templates     openai80 | openai7 | openai8 | cifar | fashion_mnist, or an explicit list of
                  strings with a "{}" (or "{c}") placeholder

Data. A split is read once per run (`load_eval_set`, cached on the context): captions and labels
are kept; decoded images are kept too unless they would exceed `IMAGE_CACHE_BYTES`, in which case
they are decoded again, chunk by chunk, at every evaluation (ImageNet's 50k validation images at
224 px would be 7.5 GB). Captions are tokenised only for evaluators that need them.

Within one evaluation call (one step), embeddings and zero-shot classifiers are cached per
(data, batch size), so evaluators that share a split, a bank or a class/template set compute them
once; the cache is dropped when the call ends, since the parameters change between calls.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxclip.data import builtin, records, stream
from jaxclip.data.images import decode_image, resize_center
from jaxclip.evals import geometry, hubness, intra, prompts, zeroshot
from jaxclip.evals.registry import register
from jaxclip.evals.retrieval import DEFAULT_QUERY_CHUNK, retrieval_metrics

# Decoded eval images above this size are streamed at each evaluation instead of kept in memory.
IMAGE_CACHE_BYTES = 2 << 30
_DECODE_THREADS = 4


@dataclasses.dataclass
class EvalSet:
    """One split of a jaxclip dataset, as evaluators see it."""

    key: tuple  # (directory, split, max_examples): identifies the data in the caches
    n: int
    image_size: int
    captions: list[list[str]]  # per record
    labels: dict[str, np.ndarray]  # label name -> (N,) int, -1 where a record lacks the label
    info: dict  # the manifest's `info` (e.g. class_names)
    paths: list[str]  # shard files, for streaming
    images: np.ndarray | None  # (N, H, W, 3) uint8 when cached, else None

    @property
    def text_to_image(self) -> np.ndarray:
        return np.repeat(np.arange(self.n, dtype=np.int32), [len(c) for c in self.captions])

    def label(self, name: str, where: str) -> np.ndarray:
        if name not in self.labels:
            raise ValueError(f"{where}: the records have no label {name!r}; they have "
                             f"{sorted(self.labels) or 'no labels'}")
        values = self.labels[name]
        if np.any(values < 0):
            raise ValueError(f"{where}: {int(np.sum(values < 0))} records lack label {name!r}")
        return values

    def image_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The decoded images in order, `rows` at a time (from the cache or decoded afresh)."""
        if self.images is not None:
            for start in range(0, self.n, rows):
                yield self.images[start:start + rows]
            return
        chunk = []
        with ThreadPoolExecutor(_DECODE_THREADS) as pool:
            for rec in _records(self.paths, self.n):
                chunk.append(rec["image"])
                if len(chunk) == rows:
                    yield _decode_all(pool, chunk, self.image_size)
                    chunk = []
            if chunk:
                yield _decode_all(pool, chunk, self.image_size)


def _records(paths: list[str], limit: int) -> Iterator[dict[str, Any]]:
    for i, rec in enumerate(records.iter_records(paths)):
        if i >= limit:
            return
        yield rec


def _decode(data: bytes, size: int) -> np.ndarray:
    return np.asarray(resize_center(decode_image(data), size), np.uint8)


def _decode_all(pool: ThreadPoolExecutor, blobs: list[bytes], size: int) -> np.ndarray:
    # Pillow releases the GIL while decoding and resizing, so threads do run in parallel.
    return np.stack(list(pool.map(_decode, blobs, [size] * len(blobs))))


def load_eval_set(ctx, dataset: str, split: str, max_examples: int = 0) -> EvalSet:
    """Reads a split once per run (cached on the context); see the module docstring."""
    cfg = ctx.cfg
    directory = builtin.dataset_dir(dataset, cfg.data.cache_dir)
    key = (directory, split, int(max_examples))
    if key in ctx.cache:
        return ctx.cache[key]
    manifest = records.read_manifest(directory)
    paths = records.shard_paths(directory, split)
    n = manifest.num_records(split)
    if max_examples:
        n = min(n, max_examples)
    if n == 0:
        raise ValueError(f"dataset {dataset!r} split {split!r} has no records")
    size = stream.image_size(cfg)
    keep = n * size * size * 3 <= IMAGE_CACHE_BYTES
    captions, labels, blobs = [], [], []
    for rec in _records(paths, n):
        captions.append(list(rec["captions"]))
        labels.append(rec["labels"])
        if keep:
            blobs.append(rec["image"])
    images = None
    if keep:
        with ThreadPoolExecutor(_DECODE_THREADS) as pool:
            images = _decode_all(pool, blobs, size)
    else:
        logging.info("eval set %s/%s: %d images at %d px exceed the %.1f GB cache; they are "
                     "decoded at every evaluation", dataset, split, n, size,
                     IMAGE_CACHE_BYTES / 1e9)
    names = sorted(set().union(*(lab.keys() for lab in labels)))
    out = EvalSet(
        key=key, n=len(captions), image_size=size, captions=captions,
        labels={k: np.asarray([lab.get(k, -1) for lab in labels], np.int64) for k in names},
        info=dict(manifest.info), paths=paths, images=images)
    ctx.cache[key] = out
    return out


def tokens_of(ctx, data: EvalSet) -> np.ndarray:
    """(M, T) int32 tokens of every caption of every record, record-major (cached per run)."""
    key = ("tokens", data.key)
    if key not in ctx.cache:
        flat = [c for caps in data.captions for c in caps]
        ctx.cache[key] = ctx.tokenizer(
            flat, context_length=ctx.cfg.model.text.context_length).astype(np.int32)
    return ctx.cache[key]


def image_embeddings(ctx, params, data: EvalSet, batch_size: int, *,
                     token_sets: bool = False) -> np.ndarray:
    """(N, D) image embeddings of a split, cached for the current evaluation call; with
    token_sets, (N, T, D + 1) packed patch-token sets (losses.tokenwise.pack_token_sets)."""
    key = ("image_emb", data.key, batch_size, token_sets)
    if key not in ctx.call_cache:
        encode = ctx.encode_image_tokens if token_sets else ctx.encode_image
        # Whole global batches per chunk, so streaming pads no more than the cached path does.
        rows = ctx.global_batch(batch_size) * 8
        parts = [ctx.embed(encode, params, chunk, batch_size)
                 for chunk in data.image_chunks(rows)]
        ctx.call_cache[key] = np.concatenate(parts)
    return ctx.call_cache[key]


def text_embeddings(ctx, params, data: EvalSet, batch_size: int, *,
                    token_sets: bool = False) -> np.ndarray:
    """(M, D) embeddings of every caption, cached for the current evaluation call; with
    token_sets, (M, T, D + 1) packed word-token sets."""
    key = ("text_emb", data.key, batch_size, token_sets)
    if key not in ctx.call_cache:
        encode = ctx.encode_text_tokens if token_sets else ctx.encode_text
        ctx.call_cache[key] = ctx.embed(encode, params, tokens_of(ctx, data), batch_size)
    return ctx.call_cache[key]


def _dataset(ctx, spec) -> str:
    """The evaluator's dataset, defaulting to the training dataset."""
    name = spec["dataset"] or ctx.cfg.data.train.dataset
    if not name:
        raise ValueError(f"evals.{spec['name']}: no dataset; set evals.{spec['name']}.dataset "
                         "(a dataset directory or a built-in name)")
    return name


def _check_ks(where: str, ks) -> None:
    if not isinstance(ks, list | tuple) or not ks or not all(_is_int(k, 1) for k in ks):
        raise ValueError(f"{where}: ks must be a non-empty list of positive ints, got {ks!r}")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_common(where: str, spec) -> None:
    if not _is_int(spec["max_examples"], 0):
        raise ValueError(f"{where}: max_examples must be an int >= 0 (0: all), "
                         f"got {spec['max_examples']!r}")
    if not _is_int(spec["query_chunk"], 1):
        raise ValueError(f"{where}: query_chunk must be a positive int, "
                         f"got {spec['query_chunk']!r}")


# ----------------------------------------------------------------------------------------------
# Retrieval


POSTPROCS = ("none", "qbnorm", "dbnorm", "invgc")
SCORINGS = ("pooled", "late")
# Late interaction scores a (query chunk x gallery shard) block through (chunk, G, Tq, Tg) token
# similarities; the query chunk shrinks to keep that block under this many floats (128 MB).
LATE_BLOCK_FLOATS = 1 << 25


def _check_retrieval(where: str, spec) -> None:
    _check_ks(where, spec["ks"])
    _check_common(where, spec)
    if not isinstance(spec["intra_label"], str):
        raise ValueError(f"{where}: intra_label must be a record label's name (or \"\"), got "
                         f"{spec['intra_label']!r}")
    if spec["postproc"] not in POSTPROCS:
        raise ValueError(f"{where}: postproc must be one of {POSTPROCS}, got {spec['postproc']!r}")
    if spec["scoring"] not in SCORINGS:
        raise ValueError(f"{where}: scoring must be one of {SCORINGS}, got {spec['scoring']!r}")
    late_only = [k for k in ("postproc", "geometry", "skew_k", "intra_label")
                 if spec["scoring"] == "late" and spec[k] not in ("none", False, 0, "")]
    if late_only:
        raise ValueError(f"{where}: scoring='late' ranks by token-set late interaction, which "
                         f"{late_only} (defined on pooled embeddings) cannot use; add a second "
                         "retrieval evaluator with scoring='pooled' for them")
    if spec["mrv_reduce"] not in ("var", "std"):
        raise ValueError(f"{where}: mrv_reduce must be 'var' or 'std', got {spec['mrv_reduce']!r}")
    for key in ("bank_size", "skew_k", "k"):
        if not _is_int(spec[key], 0):
            raise ValueError(f"{where}: {key} must be a non-negative int, got {spec[key]!r}")
    for key in ("beta", "beta_q", "beta_g"):
        if not _is_number(spec[key]) or spec[key] <= 0:
            raise ValueError(f"{where}: {key} must be a positive number, got {spec[key]!r}")
    for key in ("r_g", "r_q"):
        if not _is_number(spec[key]) or spec[key] < 0:
            raise ValueError(f"{where}: {key} must be a number >= 0, got {spec[key]!r}")
    if not _is_number(spec["pool_rate"]) or not 0 < spec["pool_rate"] <= 1:
        raise ValueError(f"{where}: pool_rate must be in (0, 1], got {spec['pool_rate']!r}")
    if spec["dynamic"] not in (None, True, False):
        raise ValueError(f"{where}: dynamic must be true, false or None (the method's default)")
    if spec["postproc"] != "none" and not spec["bank_split"]:
        raise ValueError(f"{where}: postproc={spec['postproc']!r} needs bank_split (held-out "
                         "queries and gallery items, e.g. the training split)")


def _postprocessors(spec, bank_img: np.ndarray, bank_txt: np.ndarray) -> dict[str, Any]:
    """{"i2t": ..., "t2i": ...} post-processors with each direction's banks (hubness.py)."""
    kind = spec["postproc"]
    if kind == "qbnorm":
        kw = dict(beta=float(spec["beta"]), k=spec["k"])
        if spec["dynamic"] is not None:
            kw["dynamic"] = spec["dynamic"]
        return {"t2i": hubness.QBNorm(bank_txt, **kw), "i2t": hubness.QBNorm(bank_img, **kw)}
    if kind == "invgc":
        kw = dict(r_g=float(spec["r_g"]), r_q=float(spec["r_q"]), local_adj=spec["local_adj"],
                  pool_rate=float(spec["pool_rate"]))
        return {"t2i": hubness.InvGC(bank_txt, bank_img, **kw),
                "i2t": hubness.InvGC(bank_img, bank_txt, **kw)}
    kw = dict(beta_q=float(spec["beta_q"]), beta_g=float(spec["beta_g"]), k=spec["k"])
    if spec["dynamic"] is not None:
        kw["dynamic"] = spec["dynamic"]
    return {"t2i": hubness.DBNorm(bank_txt, bank_img, **kw),
            "i2t": hubness.DBNorm(bank_img, bank_txt, **kw)}


def _skew(img, txt, k, mesh, query_chunk, postproc=None) -> dict[str, float]:
    """Skewness of the k-occurrence counts of each direction's gallery (hubness; 0 = none)."""
    pp = postproc or {}
    out = {}
    for direction, (q, g) in (("t2i", (txt, img)), ("i2t", (img, txt))):
        kk = min(k, len(g))
        counts = hubness.k_occurrence(q, g, kk, postproc=pp.get(direction), mesh=mesh,
                                      query_chunk=query_chunk)
        out[f"{direction}_skew{k}"] = hubness.skewness(counts)
    return out


@register("retrieval", check=_check_retrieval, dataset="", split="val", max_examples=0,
          ks=(1, 5, 10), query_chunk=DEFAULT_QUERY_CHUNK,
          # Hubness correction (hubness.py): none | qbnorm | dbnorm | invgc, banks from
          # bank_split.
          postproc="none", bank_dataset="", bank_split="train", bank_size=5000,
          beta=20.0, beta_q=1 / 1.99, beta_g=3.0, k=1, dynamic=None,
          r_g=0.1, r_q=0.1, local_adj=True, pool_rate=0.01,
          # Diagnostics: geometry (gap, alignment, uniformity), k-occurrence skewness (0: off),
          # MRV over each record's captions (when all records have the same number K > 1).
          geometry=False, skew_k=0, mrv=True, mrv_reduce="var",
          # pooled: cosine of the pooled embeddings; late: FILIP's token-wise late interaction
          # (each direction scored as FILIP trains it: s^I for image queries, s^T for text ones).
          scoring="pooled",
          # Intra-modal retrieval (intra.py): with a record label's name, image->image P@k
          # (k in ks) of same-label neighbours, i2i_p{k}, and its chance level i2i_chance.
          intra_label="")
def retrieval(ctx, spec, params) -> dict[str, float]:
    where = f"evals.{spec['name']}"
    data = load_eval_set(ctx, _dataset(ctx, spec), spec["split"], spec["max_examples"])
    bs, mesh, chunk = spec["batch_size"], ctx.mesh, spec["query_chunk"]
    late = spec["scoring"] == "late"
    img = image_embeddings(ctx, params, data, bs, token_sets=late)
    txt = text_embeddings(ctx, params, data, bs, token_sets=late)
    t2i = data.text_to_image
    if late:
        tokens = img.shape[1] * txt.shape[1]
        gallery = -(-max(len(img), len(txt)) // ctx.mesh.devices.size)
        chunk = max(1, min(chunk, LATE_BLOCK_FLOATS // (tokens * gallery)))
    raw = retrieval_metrics(img, txt, t2i, ks=tuple(spec["ks"]), mesh=mesh, query_chunk=chunk,
                            return_ranks=True)
    raw.pop("i2t_ranks")
    t2i_ranks = raw.pop("t2i_ranks")
    out = dict(raw)
    counts = {len(c) for c in data.captions}
    if spec["mrv"] and len(counts) == 1 and counts.pop() > 1:
        grouped = geometry.group_ranks(t2i_ranks, t2i)
        out["t2i_mrv"] = geometry.mean_rank_variance(grouped, spec["mrv_reduce"])
    if spec["geometry"]:
        out.update(geometry.geometry_metrics(img, txt, t2i, mesh=mesh, query_chunk=chunk))
    if spec["skew_k"]:
        out.update(_skew(img, txt, spec["skew_k"], mesh, chunk))
    if spec["intra_label"]:
        labels = data.label(spec["intra_label"], where)
        out.update(intra.same_label_precision(img, labels, tuple(spec["ks"])))
    if spec["postproc"] != "none":
        bank_name = spec["bank_dataset"] or _dataset(ctx, spec)
        bank = load_eval_set(ctx, bank_name, spec["bank_split"], spec["bank_size"])
        if bank.key[:2] == data.key[:2]:
            raise ValueError(f"{where}: the hubness bank ({bank_name}/{spec['bank_split']}) is the "
                             "evaluation split itself; use held-out data such as the train split")
        postproc = _postprocessors(spec, image_embeddings(ctx, params, bank, bs),
                                   text_embeddings(ctx, params, bank, bs))
        kind = spec["postproc"]
        normed = retrieval_metrics(img, txt, t2i, ks=tuple(spec["ks"]), mesh=mesh,
                                   query_chunk=chunk, postproc=postproc)
        out.update({f"{kind}_{k}": v for k, v in normed.items()})
        if spec["skew_k"]:
            skew = _skew(img, txt, spec["skew_k"], mesh, chunk, postproc)
            out.update({f"{kind}_{k}": v for k, v in skew.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Zero-shot classification


def _check_zeroshot(where: str, spec) -> None:
    _check_ks(where, spec["ks"])
    _check_common(where, spec)
    try:
        # Named lists and template placeholders are checked now, not at the first evaluation.
        temps = prompts.templates(spec["templates"])
        names = prompts.class_names(spec["classes"]) if spec["classes"] != "" else ["x"]
        zeroshot.format_prompts(names[:1], temps)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def class_prompts(spec, data: EvalSet | None = None) -> tuple[list[str], list[str]]:
    """(class names, prompts class-major: every template for class 0, then class 1, ...)."""
    names = prompts.class_names(spec["classes"], data.info if data is not None else None)
    return names, zeroshot.format_prompts(names, prompts.templates(spec["templates"]))


def zeroshot_classifier(ctx, params, prompt_list: list[str], n_classes: int,
                        batch_size: int) -> np.ndarray:
    """(C, D) classifier rows for class-major prompts; cached for the current evaluation call."""
    key = ("classifier", tuple(prompt_list), n_classes, batch_size)
    if key not in ctx.call_cache:
        tkey = ("prompt_tokens", tuple(prompt_list))
        if tkey not in ctx.cache:
            ctx.cache[tkey] = ctx.tokenizer(
                prompt_list, context_length=ctx.cfg.model.text.context_length).astype(np.int32)
        emb = ctx.embed(ctx.encode_text, params, ctx.cache[tkey], batch_size)
        per_class = emb.reshape(n_classes, len(prompt_list) // n_classes, emb.shape[-1])
        ctx.call_cache[key] = np.asarray(zeroshot.build_classifier(per_class))
    return ctx.call_cache[key]


@register("zeroshot", check=_check_zeroshot, dataset="", split="test", max_examples=0,
          label="class", classes="", templates="openai80", ks=(1, 5),
          query_chunk=DEFAULT_QUERY_CHUNK)
def zeroshot_classification(ctx, spec, params) -> dict[str, float]:
    where = f"evals.{spec['name']}"
    data = load_eval_set(ctx, _dataset(ctx, spec), spec["split"], spec["max_examples"])
    labels = data.label(spec["label"], where)
    try:
        names, prompt_list = class_prompts(spec, data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if labels.max() >= len(names):
        raise ValueError(f"{where}: label {spec['label']!r} goes up to {labels.max()}, but the "
                         f"class list has {len(names)} names")
    bs = spec["batch_size"]
    classifier = zeroshot_classifier(ctx, params, prompt_list, len(names), bs)
    img = image_embeddings(ctx, params, data, bs)
    return zeroshot.classification_metrics(img, classifier, labels, ks=tuple(spec["ks"]),
                                           mesh=ctx.mesh, query_chunk=spec["query_chunk"])

