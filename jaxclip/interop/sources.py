"""Reading pretrained weights from any supported directory into one form, and jaxclip params dirs.

`read(path)` recognises
  jaxclip   a params dir written by `jaxclip convert`: `params.safetensors` (flat slash-path
            keys, the stacked layout of `nnx.to_pure_dict`, float32) + `config.json` (a full jaxclip
            config; its model section describes the parameters) [+ tokenizer.json, referenced by
            a relative `data.tokenizer.path`];
  workdir   a training workdir: `config.json` + Orbax checkpoints (the newest, or `step`);
  hf_clip   a HF transformers CLIPModel dir (config.json + model.safetensors, or a sharded
            model.safetensors.index.json) [+ preprocessor_config.json for mean/std];
  hf_bert   a HF BertModel dir (e.g. MiniLM) [+ tokenizer.json]: the text tower only;
  open_clip an open_clip hub-format dir (open_clip_config.json + open_clip_model.safetensors),
and returns a `Pretrained`: the full jaxclip config (defaults + the derived model and data
sections) and the flat parameters as float32 numpy arrays, converted and checked against the
model that config builds (unknown, missing and mis-shaped tensors are listed in one error).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re

import numpy as np

from jaxclip import config, tree
from jaxclip.interop import hf_bert, hf_clip, mapping, openclip, tensorfile

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
KINDS = ("jaxclip", "workdir", "hf_clip", "hf_bert", "open_clip")
_EXPECT = {"hf": ("hf_clip", "hf_bert"), "open_clip": ("open_clip",)}


@dataclasses.dataclass
class Pretrained:
    kind: str  # one of KINDS
    path: str
    cfg: config.ConfigDict  # full jaxclip config; model section matches `params`
    params: dict[str, np.ndarray]  # flat slash paths -> float32 arrays
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> file to carry along


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect(path: str) -> str:
    """Which kind of directory `path` is (see the module docstring)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    has = lambda name: os.path.exists(os.path.join(path, name))
    if has(PARAMS_FILE):
        return "jaxclip"
    if has("checkpoints") and has(CONFIG_FILE):
        return "workdir"
    if has(openclip.CONFIG):
        return "open_clip"
    if has(CONFIG_FILE):
        model_type = _json(os.path.join(path, CONFIG_FILE)).get("model_type")
        if model_type == "clip":
            return "hf_clip"
        if model_type == "bert":
            return "hf_bert"
        raise ValueError(f"{path}/config.json: HF model_type {model_type!r} is not supported "
                         "(jaxclip imports 'clip' and 'bert')")
    raise ValueError(f"{path}: no {PARAMS_FILE}, checkpoints/, {openclip.CONFIG} or config.json; "
                     "not a jaxclip, HF or open_clip checkpoint directory")


def model_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """Flat parameter shapes of the model a config builds (abstractly: nothing is allocated)."""
    from flax import nnx

    from jaxclip.models import TwoTower

    abstract = nnx.eval_shape(lambda: TwoTower(model_cfg, rngs=None))
    flat = tree.flatten(nnx.to_pure_dict(nnx.state(abstract)))
    return {p: tuple(x.shape) for p, x in flat.items()}


def check_params(params: dict, model_cfg, *, what: str, complete: bool = True) -> None:
    """Raises a MappingError listing unknown, missing (if `complete`) and mis-shaped params."""
    shapes = model_shapes(model_cfg)
    mapping.raise_problems(f"{what} does not match its model config", {
        "unknown parameters": sorted(set(params) - set(shapes)),
        "missing parameters": sorted(set(shapes) - set(params)) if complete else [],
        "mis-shaped parameters": [f"{p} {tuple(np.shape(x))}, expected {shapes[p]}"
                                  for p, x in sorted(params.items())
                                  if p in shapes and tuple(np.shape(x)) != shapes[p]],
    })


def _safetensors_weights(path: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    for name in names:
        index = os.path.join(path, name + ".index.json")
        if os.path.exists(index):  # sharded: {"weight_map": {tensor: file}}
            files = sorted(set(_json(index)["weight_map"].values()))
            out = {}
            for f in files:
                out.update(tensorfile.read(os.path.join(path, f)))
            return out
        if os.path.exists(os.path.join(path, name)):
            return tensorfile.read(os.path.join(path, name))
    others = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*"))
              if p.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5"))]
    hint = (f"; found {others}, which need torch/flax to read: re-save them as safetensors "
            "(save_pretrained(..., safe_serialization=True))" if others else "")
    raise FileNotFoundError(f"{path}: no weights file {' or '.join(names)}{hint}")


def _build(kind: str, path: str, values: dict, params: dict, *, complete: bool = True,
           files: dict | None = None) -> Pretrained:
    cfg = config.from_dict(values)
    check_params(params, cfg.model, what=f"{path} ({kind})", complete=complete)
    return Pretrained(kind, path, cfg, params, files or {})


def _clip_tokenizer_section(vocab_size: int, path: str) -> tuple[dict, dict]:
    if vocab_size == 49408:
        return {"kind": "clip"}, {}
    tok = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok):
        return {"kind": "hf", "path": os.path.abspath(tok)}, {"tokenizer.json": tok}
    logging.warning("%s: vocabulary of %d is not CLIP's and there is no tokenizer.json; "
                    "set data.tokenizer yourself", path, vocab_size)
    return {"kind": "clip"}, {}


def _read_hf_clip(path: str) -> Pretrained:
    hf = _json(os.path.join(path, CONFIG_FILE))
    model = hf_clip.model_config(hf)
    data: dict = {}
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre):
        p = _json(pre)
        data.update(mean=tuple(p.get("image_mean", config.defaults().data.mean)),
                    std=tuple(p.get("image_std", config.defaults().data.std)))
    data["tokenizer"], files = _clip_tokenizer_section(model["text"]["vocab_size"], path)
    cfg = config.from_dict({"model": model})
    tensors = _safetensors_weights(path, (hf_clip.WEIGHTS,))
    params = mapping.import_params(hf_clip.rules(cfg.model), tensors, model_shapes(cfg.model),
                                   ignore=hf_clip.IGNORE, what=f"HF CLIPModel {path}")
    return _build("hf_clip", path, {"model": model, "data": data}, params, files=files)


def _read_hf_bert(path: str) -> Pretrained:
    model = hf_bert.model_config(_json(os.path.join(path, CONFIG_FILE)))
    cfg = config.from_dict({"model": model})
    shapes = {p: s for p, s in model_shapes(cfg.model).items() if p.startswith("text/")}
    tensors = hf_bert.strip_prefix(_safetensors_weights(path, (hf_bert.WEIGHTS,)))
    params = mapping.import_params(hf_bert.rules(cfg.model.text), tensors, shapes,
                                   ignore=hf_bert.IGNORE, what=f"HF BertModel {path}")
    data, files = {}, {}
    tok = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok):
        data["tokenizer"] = {"kind": "hf", "path": os.path.abspath(tok)}
        files["tokenizer.json"] = tok
    return _build("hf_bert", path, {"model": model, "data": data}, params, complete=False,
                  files=files)


def _read_open_clip(path: str) -> Pretrained:
    raw = _json(os.path.join(path, openclip.CONFIG))
    oc = raw.get("model_cfg", raw)
    tensors = openclip.uncustomize(_safetensors_weights(path, openclip.WEIGHTS))
    model = openclip.model_config(oc, tensors)
    cfg = config.from_dict({"model": model})
    params = mapping.import_params(openclip.rules(cfg.model), tensors, model_shapes(cfg.model),
                                   ignore=openclip.IGNORE, what=f"open_clip model {path}")
    pre = raw.get("preprocess_cfg", {})
    data: dict = {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}
    if pre.get("interpolation", "bicubic") != "bicubic" or \
            pre.get("resize_mode", "shortest") != "shortest":
        logging.warning("%s: preprocessing %s/%s; jaxclip.load resizes the shorter side "
                        "(bicubic) and centre-crops", path, pre.get("interpolation"),
                        pre.get("resize_mode"))
    hf_tok = oc.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_tok:
        logging.warning("%s: open_clip tokenizer %r; set data.tokenizer yourself", path, hf_tok)
    data["tokenizer"], files = _clip_tokenizer_section(model["text"]["vocab_size"], path)
    return _build("open_clip", path, {"model": model, "data": data}, params, files=files)


def _read_jaxclip(path: str) -> Pretrained:
    values = _json(os.path.join(path, CONFIG_FILE))
    tok = values.get("data", {}).get("tokenizer", {})
    files = {}
    if tok.get("path") and not os.path.isabs(tok["path"]):
        # Relative tokenizer paths are relative to the params dir, which may have moved.
        files[os.path.basename(tok["path"])] = os.path.join(path, tok["path"])
        tok["path"] = os.path.abspath(os.path.join(path, tok["path"]))
    params = {k: np.asarray(v, np.float32) if v.dtype != np.float32 else v
              for k, v in tensorfile.read(os.path.join(path, PARAMS_FILE)).items()}
    return _build("jaxclip", path, values, params, complete=False, files=files)


def _read_workdir(path: str, step: int | None) -> Pretrained:
    from jaxclip import runtime

    cfg, params, _ = runtime.restore(path, step)
    flat = {p: runtime.to_host(x) for p, x in tree.flatten(params).items()}
    return Pretrained("workdir", path, cfg, flat)


def read(path: str, *, step: int | None = None, expect: str | None = None) -> Pretrained:
    """Reads any supported directory; `expect` ("hf" | "open_clip") checks its kind."""
    path = os.fspath(path)
    kind = detect(path)
    if expect is not None and kind not in _EXPECT[expect]:
        raise ValueError(f"{path} is a {kind} directory, not {expect}")
    if step is not None and kind != "workdir":
        raise ValueError(f"step={step} applies to training workdirs; {path} is a {kind} dir")
    if kind == "workdir":
        return _read_workdir(path, step)
    return {"jaxclip": _read_jaxclip, "hf_clip": _read_hf_clip, "hf_bert": _read_hf_bert,
            "open_clip": _read_open_clip}[kind](path)


def warn_logit_scale(params: dict, loss_cfg, where: str) -> None:
    """open_clip users see the scale jump on resume when a checkpoint exceeds the clamp (#305)."""
    if "logit_scale" not in params or loss_cfg.scale_param != "logit_scale" or \
            loss_cfg.scale_max is None:
        return
    value = float(params["logit_scale"])
    if value > loss_cfg.scale_max:
        logging.warning("%s: logit_scale %.4f exceeds loss.scale_max %.4f (ln %.0f); it was "
                        "copied verbatim and training will clamp it after the first step",
                        where, value, loss_cfg.scale_max, math.exp(loss_cfg.scale_max))


def truncate_context(pre: Pretrained, length: int) -> Pretrained:
    """Keeps the first `length` rows of the text position table (and sets the context length):
    a shorter tokenized length never reads the rest."""
    have = pre.cfg.model.text.context_length
    if not 0 < length <= have:
        raise ValueError(f"context length {length} must be in 1..{have} (the checkpoint's)")
    pre.params["text/pos_embed"] = pre.params["text/pos_embed"][:length]
    pre.cfg.model.text.context_length = length
    return pre


def write(pre: Pretrained, out: str) -> None:
    """Writes `pre` as a jaxclip params dir (tokenizer files copied, referenced relatively)."""
    import shutil

    os.makedirs(out, exist_ok=True)
    cfg = config.from_dict(pre.cfg.to_dict())
    tok = cfg.data.tokenizer
    for name, src in pre.files.items():
        shutil.copyfile(src, os.path.join(out, name))
        if "path" in tok and os.path.basename(tok.path) == name:
            tok.path = name
    tensorfile.save(os.path.join(out, PARAMS_FILE), pre.params,
                    {"format": "jaxclip", "source": pre.kind})
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json(cfg))


def convert(src: str, out: str, *, source_format: str, context_length: int | None = None
            ) -> Pretrained:
    """`jaxclip convert`: a HF or open_clip dir -> a jaxclip params dir."""
    pre = read(src, expect=source_format)
    if context_length is not None:
        truncate_context(pre, context_length)
    warn_logit_scale(pre.params, pre.cfg.loss, src)
    write(pre, out)
    return pre


def select(params: dict, pattern: str) -> dict:
    return {p: v for p, v in params.items() if re.search(pattern, p)}
