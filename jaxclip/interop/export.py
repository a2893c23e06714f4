"""`jaxclip export`: a training workdir (or any readable checkpoint dir) -> HF or open_clip.

  hf         a transformers `CLIPModel` dir: config.json, model.safetensors, the tokenizer files
             (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json,
             special_tokens_map.json) and preprocessor_config.json, so `CLIPModel`,
             `CLIPProcessor` and `AutoTokenizer.from_pretrained(OUT)` work offline;
  open_clip  open_clip's hub format: open_clip_config.json (model + preprocessing) and
             open_clip_model.safetensors, for `open_clip.create_model("local-dir:OUT")`.

Only architectures the target can represent are exported; anything else (MAP or mean image
pooling, a text projection bias, separate projection heads, the BERT text tower, ...) is an
error naming every such feature, raised before any checkpoint is read.

From a workdir the parameters are restored sharded (jaxclip.runtime.restore) and the weights file
is streamed: its header is computed from the shapes, then each foreign tensor (one layer's slice
of a stacked parameter) is gathered, converted, written and dropped. Only process 0 writes; the
other processes take part in the gathers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np

from jaxclip import checkpoint, runtime, tree
from jaxclip.interop import hf_clip, mapping, openclip, sources, tensorfile
from jaxclip.models.two_tower import TRAINING_ONLY

FORMATS = ("hf", "open_clip")


def _problems(cfg, fmt: str) -> None:
    """Raises before anything is read when the model cannot be represented in `fmt`."""
    if fmt == "hf":
        hf_clip.hf_config(cfg.model, 0.0)
    elif fmt == "open_clip":
        openclip.open_clip_config(cfg.model, 1, (0, 0, 0), (1, 1, 1))
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")


def _write_json(path: str, value: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")


def _write_weights(path: str, rules, shapes: dict, get, metadata: dict) -> None:
    specs = mapping.export_specs(rules, shapes)
    tensors = mapping.export_tensors(rules, get)
    if jax.process_index() == 0:
        tensorfile.write(path, [(n, s, np.float32) for n, s in specs],
                         ((n, np.asarray(a, np.float32)) for n, a in tensors), metadata)
    else:
        for _ in tensors:  # the gathers inside are collective
            pass


def _clip_tokenizer_json() -> tuple[str, dict, list]:
    """HF's CLIP tokenizer pipeline (transformers' CLIPTokenizer) over jaxclip's vocabulary."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    from jaxclip.tokenizer import _clip_bpe

    bpe = json.loads(_clip_bpe().to_str())["model"]
    merges = [tuple(m.split() if isinstance(m, str) else m) for m in bpe["merges"]]
    tok = Tokenizer(models.BPE(bpe["vocab"], merges, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False,
                               unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                   r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", 49407), ("<|startoftext|>", 49406), trim_offsets=False,
        add_prefix_space=False)
    tok.add_special_tokens([AddedToken("<|startoftext|>", normalized=True, special=True),
                            AddedToken("<|endoftext|>", normalized=True, special=True)])
    return tok.to_str(), bpe["vocab"], merges


def write_hf_tokenizer(cfg, out: str) -> None:
    spec, ctx = cfg.data.tokenizer, cfg.model.text.context_length
    if spec.kind == "clip":
        text, vocab, merges = _clip_tokenizer_json()
        specials = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
        if jax.process_index() != 0:
            return
        with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        _write_json(os.path.join(out, "vocab.json"), vocab)
        with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        _write_json(os.path.join(out, "special_tokens_map.json"), specials)
        _write_json(os.path.join(out, "tokenizer_config.json"), dict(
            specials, tokenizer_class="CLIPTokenizer", model_max_length=ctx,
            clean_up_tokenization_spaces=False))
    elif spec.kind == "hf":
        if jax.process_index() == 0:
            shutil.copyfile(spec.path, os.path.join(out, "tokenizer.json"))
        _write_json(os.path.join(out, "tokenizer_config.json"),
                    dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=ctx))
    else:
        logging.warning("tokenizer kind %r has no HF tokenizer export; %s has no tokenizer files",
                        spec.kind, out)


def _open(path: str, step: int | None, fmt: str):
    """(config, {path: shape}, get(path, layer)) of a workdir (sharded) or any other source."""
    if sources.detect(path) == "workdir":
        _problems(checkpoint.load_config(path), fmt)
        cfg, params, step = runtime.restore(path, step)
        flat = tree.flatten(params)
        logging.info("exporting %s step %d", path, step)
        return cfg, {p: tuple(x.shape) for p, x in flat.items()}, \
            lambda p, i: runtime.to_host(flat[p] if i is None else flat[p][i])
    pre = sources.read(path, step=step)
    _problems(pre.cfg, fmt)
    sources.check_params(pre.params, pre.cfg.model, what=path)
    flat = pre.params
    return pre.cfg, {p: x.shape for p, x in flat.items()}, \
        lambda p, i: flat[p] if i is None else flat[p][i]


def _refuse_inside_workdir(out: str) -> None:
    """An export written into a training workdir would replace its config.json (the HF one has
    the same name) and mix files of two kinds: refuse any path at or under a workdir."""
    here = os.path.abspath(out)
    while True:
        if os.path.isdir(os.path.join(here, "checkpoints")):
            raise ValueError(f"--out {out} is inside the training workdir {here}; export to a "
                             "directory of its own")
        parent = os.path.dirname(here)
        if parent == here:
            return
        here = parent


def export(path: str, out: str, fmt: str, *, step: int | None = None) -> None:
    """Writes the checkpoint at `path` (workdir: newest or `step`) to `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    _refuse_inside_workdir(out)
    cfg, shapes, get = _open(os.fspath(path), step, fmt)
    dropped = sorted(p for p in shapes if p.split("/")[0] in TRAINING_ONLY)
    if dropped:
        logging.info("not exported (used only in training): %s", ", ".join(dropped))
        shapes = {p: s for p, s in shapes.items() if p not in dropped}
    os.makedirs(out, exist_ok=True)
    mean, std, size = cfg.data.mean, cfg.data.std, cfg.model.image.image_size
    logit_scale = float(get("logit_scale", None))
    if fmt == "hf":
        _write_json(os.path.join(out, "config.json"), hf_clip.hf_config(cfg.model, logit_scale))
        _write_json(os.path.join(out, "preprocessor_config.json"),
                    hf_clip.image_processor_config(size, mean, std))
        write_hf_tokenizer(cfg, out)
        _write_weights(os.path.join(out, hf_clip.WEIGHTS), hf_clip.rules(cfg.model), shapes, get,
                       {"format": "pt"})
    else:
        if cfg.data.tokenizer.kind != "clip":
            logging.warning("open_clip tokenizes with its CLIP BPE unless told otherwise; this "
                            "model was trained with a %r tokenizer", cfg.data.tokenizer.kind)
        _write_json(os.path.join(out, openclip.CONFIG),
                    openclip.open_clip_config(cfg.model, size, mean, std))
        _write_weights(os.path.join(out, openclip.WEIGHTS[0]), openclip.rules(cfg.model), shapes,
                       get, {"format": "pt"})
