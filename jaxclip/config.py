"""Experiment configs: the defaults schema, config-file loading and command-line overrides.

An experiment is one Python file under `configs/` with `get_config(arg=None)` returning an
`ml_collections.ConfigDict` (the big_vision convention). The file only needs to set what differs
from `defaults()` below; `load` merges it onto the defaults, so every key the trainer reads exists
and every key the experiment sets is checked: a key that is not in the schema is an error naming it
(with the closest valid key), as is a value of the wrong type. Command-line overrides
(`--config.train.steps=200`) go through the same checks.

Sections owned by a registry are assembled here from it: each registered objective's own keys
form `loss.<name>` (jaxclip.losses.register), each tower kind's `model.<modality>.<kind>`
(jaxclip.models.towers.register), and `model.<modality>.kind` chooses among the registered kinds.
Open sections (`evals`, `loss.aux`, `optim.lr_mults`, `data.tokenizer`) hold user-chosen keys and
are validated by their owners (the evaluator, loss and tokenizer registries, the optimizer). A key
that moved keeps working under its old name (`RENAMED`), in config files, overrides and the
config.json of old checkpoints.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import math
import os
from typing import Any

import ml_collections

from jaxclip.losses import core as loss_registry
from jaxclip.models import heads, layers
from jaxclip.models import towers as tower_registry

ConfigDict = ml_collections.ConfigDict

# Old key -> its place now. Applied to every config read (files, overrides, stored config.json).
RENAMED = {
    "loss.label_smoothing": "loss.clip.label_smoothing",
    "loss.direction_reduce": "loss.clip.direction_reduce",
}

# Sections whose keys are chosen by the user, validated elsewhere.
OPEN_SECTIONS = ("evals", "loss.aux", "optim.lr_mults", "data.tokenizer")


class ConfigError(ValueError):
    """A config key or value that the schema rejects."""


def defaults() -> ConfigDict:
    """Every key the trainer understands, with its default. Comments say what each one means."""
    c = ConfigDict()
    c.seed = 0

    # Device mesh: sizes of the ("data", "fsdp", "tensor") axes; -1 means "all remaining devices".
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.model = m = ConfigDict()
    m.name = ""  # a registered size ("ViT-B-32", ...) that fills image/text/embed_dim; "" = custom
    m.embed_dim = 512
    m.dtype = "float32"  # compute dtype; "bfloat16" on accelerators. Params stay float32.
    m.scan_layers = True  # lax.scan over stacked layers (constant compile time in depth)
    # Activation checkpointing of each residual block (the towers' own `remat` override it):
    # none | full (recompute everything) | dots | dots_no_batch | minimal (= dots_no_batch, as
    # MaxText) | save_dot_except_mlp | save_qkv_proj | save_attn_out (keep those named
    # activations, recompute the rest; jaxclip/models/layers.py).
    m.remat = "none"
    # jax.nn.dot_product_attention implementation: xla | cudnn | auto (cuDNN flash attention on
    # an NVIDIA GPU with a bfloat16/float16 compute dtype and head dim a multiple of 8 up to 128,
    # xla everywhere else; models/layers.py resolve_attn_impl).
    m.attn_impl = "auto"
    m.logit_scale_init = math.log(1 / 0.07)
    m.logit_bias_init = None  # a float enables a learnable bias (SigLIP: -10.0)
    m.image = ConfigDict(
        dict(
            kind="vit",  # a registered image tower (jaxclip/models/towers.py)
            image_size=224,
            patch_size=32,
            width=768,
            depth=12,
            heads=12,
            mlp_ratio=4.0,
            pool="cls",  # cls | map | mean
            class_token=True,
            act="gelu",  # gelu | quick_gelu
            ln_eps=1e-5,
            locked=False,  # no gradients, no optimizer state (LiT)
            remat="",  # this tower's model.remat policy; "" = model.remat
            # Projection to embed_dim: "none" = the tower's own `proj` (CLIP layout, part of the
            # tower, locked with it); linear | mlp | patch_mlp = a separate trainable head
            # (`image_head/...`) on the unprojected features, trained even when the tower is
            # locked (LiT, frozen encoders + projectors). See jaxclip/models/heads.py.
            head="none",
            # The projection head of an image-image term (loss.aux.simclr; SLIP): an MLP of
            # `depth` layers, `hidden` wide, on the tower's pooled features, its L2-normalised
            # outputs (`out` dims) per view in Encoded.emb["image_views"]. out = 0: no head
            # (and no parameters: the checkpoint layout of a model without one is unchanged).
            view_head=ConfigDict(dict(out=0, hidden=512, depth=3)),
        )
    )
    m.text = ConfigDict(
        dict(
            vocab_size=49408,
            context_length=77,
            width=512,
            depth=12,
            heads=8,
            mlp_ratio=4.0,
            causal=True,
            pool="eot",  # eot (first end-of-text token) | last | mean | first
            eot_id=49407,
            pad_id=0,
            act="gelu",
            ln_eps=1e-5,
            proj_bias=False,
            locked=False,
            # A registered text tower: clip (pre-LN, causal) | bert (post-LN, bidirectional).
            kind="clip",
            remat="",  # as model.image.remat
            head="none",  # as model.image.head
        )
    )

    for kind in tower_registry.all_kinds():  # each tower kind's own settings
        if kind.config:
            m[kind.modality][kind.name] = ConfigDict(kind.config)

    c.loss = lo = ConfigDict()
    lo.name = "clip"  # a registered objective: clip | siglip | ...
    lo.impl = "all_gather"  # how the loss runs over the mesh: all_gather | ring | dense
    # ring: columns of the local logit block computed at a time (O(b x tile) scratch instead of
    # O(b^2)); must divide the per-device batch; 0 = the whole block (jaxclip.losses.ring).
    lo.tile = 0
    lo.scale_param = "logit_scale"  # logit_scale (exp of a log-scale) | temperature (ALIGN)
    lo.scale_max = math.log(100)  # clamp of the log-scale after every step; None disables
    lo.learn_scale = True
    lo.aux = ConfigDict()  # name -> weight of registered auxiliary terms
    # The two modalities the objective contrasts, in its (x, y) order: image -> text is the
    # first direction of CLIP's loss, and the image tower is the locked one in LiT.
    lo.pair = ("image", "text")
    # Each objective's own settings, as it registered them (loss.clip.label_smoothing, ...),
    # and the sections several objectives share (loss.teacher.path).
    for name, own in loss_registry.sections().items():
        lo[name] = ConfigDict(own)

    c.optim = o = ConfigDict()
    o.lr = 5e-4
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-6
    o.wd = 0.2
    o.grad_clip = 1.0  # global-norm clip; 0 disables
    o.schedule = "cosine"  # cosine | constant | linear
    o.warmup_steps = 0
    o.end_lr_frac = 0.0  # final lr as a fraction of lr
    # Regexes over parameter paths ("image/blocks/attn/query/kernel").
    o.no_decay = ["(^|/)(bias|scale)$", "pos_embed", "cls_token", "logit_(scale|bias)$"]
    o.frozen = []  # trained not at all: no gradient, no optimizer state
    o.lr_mults = ConfigDict()  # regex -> learning-rate multiplier
    # Layer-wise lr decay per tower (1.0 = off): block i of a depth-D tower gets decay^(D - i),
    # the embeddings decay^(D + 1), everything above the blocks 1 (jaxclip.optim).
    o.layer_decay = ConfigDict(dict(image=1.0, text=1.0))

    c.train = t = ConfigDict()
    t.steps = 1000
    t.batch_size = 256  # global batch, split over hosts and devices
    # Exact gradient accumulation (GradCache, jaxclip.accumulate): the full global batch's
    # gradient, every negative included, with about 1/k of the activation memory, for one extra
    # forward pass. Must divide the per-device batch.
    t.microbatches = 1
    t.log_every = 50
    t.ckpt_every = 500  # 0 disables periodic checkpoints (a final one is still written)
    t.keep_ckpts = 2  # keep the latest N ...
    t.keep_every = 0  # ... plus every M-th step (0: none)
    t.peak_tflops = 0.0  # per-device peak for MFU; 0 = datasheet table / measured on CPU
    t.progress = True  # terminal progress bar
    t.profile_steps = (0, 0)  # (a, b): jax.profiler trace of steps a..b into WORKDIR/profile
    # A hung step, save or restore ends the process (exit 3, all stacks logged) so the scheduler
    # restarts it (jaxclip.watchdog): limit = watchdog_multiple x median step time, at least
    # watchdog_floor_s; before the first step completes (compile, restore, step 1)
    # watchdog_first_floor_s. 0 disables the watchdog.
    t.watchdog_multiple = 10.0
    t.watchdog_floor_s = 600.0
    t.watchdog_first_floor_s = 3600.0
    # After a SIGTERM, a step that does not complete within this many seconds ends the process
    # at once (exit 143); a second SIGTERM or SIGINT always does (jaxclip.preemption).
    t.stop_grace_s = 60.0

    c.data = d = ConfigDict()
    # The training stream: a dataset directory of jaxclip records, or a built-in name that is
    # generated/converted into `data.cache_dir` on first use ("shapes", "fashion_mnist", "emoji").
    d.train = ConfigDict(dict(dataset="", split="train", mixture=[]))
    d.cache_dir = ""  # "" = $JAXCLIP_CACHE or ~/.cache/jaxclip
    # Tokenizer kind and its options (jaxclip.tokenizer.build_tokenizer); the context length is
    # always model.text.context_length.
    d.tokenizer = ConfigDict(dict(kind="clip"))
    d.image_size = -1  # -1 = model.image.image_size
    d.mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation
    d.std = (0.26862954, 0.26130258, 0.27577711)
    d.augment = ConfigDict(dict(kind="none", scale=(0.9, 1.0), ratio=(0.75, 1.3333)))
    # Which caption of a multi-caption record: random | first, or all: up to
    # `captions_per_image` (K) of them, text (B, K, T) with a (B, K) mask `text_mask` for images
    # with fewer (for objectives with several positives per image: loss.name = one_to_k).
    d.caption = "random"
    d.captions_per_image = 0  # K of caption = "all"
    # Crops of each training image (for image-image terms: loss.aux.simclr). With views > 1 the
    # batch's `image` is (B, views, H, W, 3): view 0 is the crop above (data.augment, what the
    # image-text loss sees); views 1.. are random resized crops with `view_augment`'s area scale
    # and aspect ratio, flipped horizontally with probability `flip` (jaxclip.data.pipeline).
    d.views = 1
    d.view_augment = ConfigDict(dict(scale=(0.3, 1.0), ratio=(0.75, 1.3333), flip=0.5))
    d.workers = 0  # multiprocess prefetch workers (0 = in-process threads)
    d.prefetch = 2
    # Steps ahead that a background thread reads the next batches and places them on the
    # devices (jaxclip.data.prefetch), so the step never waits for the host-to-device copy and
    # the `data_wait` metric counts only real input starvation. Each waiting batch occupies
    # device memory (its share of batch_size x image_size² x 3 bytes, plus tokens) on top of
    # the step's. 0 = read and place each batch in the training loop, synchronously.
    d.prefetch_to_device = 2
    d.shuffle_seed = -1  # -1 = seed

    c.evals = ConfigDict()  # name -> {type, every_steps, ...}; see jaxclip.evals

    # Initialise a fresh run (never a resumed one) from pretrained weights: a converted jaxclip
    # params dir, a HF CLIPModel/BertModel dir or an open_clip dir (jaxclip.interop.init).
    c.init = ConfigDict(dict(
        path="",
        select="",  # regex over parameter paths to load, e.g. "^text/"; "" = every parameter
    ))
    return c


def _is_open(path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS)


def _keys_under(cfg: ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        p = f"{prefix}{k}"
        out.append(p)
        if isinstance(v, ConfigDict):
            out.extend(_keys_under(v, p + "."))
    return out


def _unknown_key(path: str, schema: ConfigDict) -> ConfigError:
    close = difflib.get_close_matches(path, _keys_under(schema), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {path!r}{hint}")


def _check_type(path: str, default: Any, value: Any) -> Any:
    """Returns `value` coerced to the default's type, or raises naming the key."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list | tuple):
        if isinstance(value, list | tuple):
            return type(default)(value)
    else:
        return value
    raise ConfigError(
        f"config key {path!r} expects {type(default).__name__}, got {type(value).__name__} "
        f"({value!r})"
    )


def upgrade(values: dict | ConfigDict) -> dict:
    """A nested config dict with the keys of `RENAMED` moved to their new places."""
    out = values.to_dict() if isinstance(values, ConfigDict) else _copy_dict(values)
    for old, new in RENAMED.items():
        *parents, last = old.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        *parents, last = new.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(last, value)  # a value already at the new place wins
    return out


def _copy_dict(d):
    return {k: _copy_dict(v) if isinstance(v, dict | ConfigDict) else v for k, v in d.items()}


def _merge(base: ConfigDict, update: ConfigDict | dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if _is_open(path) and key not in base:
            base[key] = value
            continue
        if key not in base:
            raise _unknown_key(path, defaults())
        current = base[key]
        if isinstance(current, ConfigDict):
            if not isinstance(value, dict | ConfigDict):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            if _is_open(path):  # user keys are added next to the defaults, unchecked here
                with current.unlocked():
                    for k, v in value.items():
                        current[k] = v
            else:
                _merge(current, value, path + ".")
        else:
            with base.ignore_type():
                base[key] = _check_type(path, current, value)


def _load_module(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "jaxclip_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    return module


def sibling(config_file: str, name: str):
    """The module of the config file `name` beside `config_file`, for an experiment that extends
    another: `sibling(__file__, "demo.py").get_config(arg)`."""
    return _load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def _locked(cfg: ConfigDict) -> ConfigDict:
    """The resolved config, locked (ml_collections): a key that does not exist can no longer be
    created by assignment (`cfg.train.stepz = 5` raises, naming the closest key), so code that
    adjusts a config after loading cannot silently write to a typo. Open sections stay open."""
    cfg.lock()
    for path in OPEN_SECTIONS:
        get_path(cfg, path).unlock()
    return cfg


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ConfigDict:
    """Loads `path[:arg]`, merges it onto the defaults and applies `a.b.c=value` overrides.

    A `model.name` (from the file or an override) first fills the model section from the size
    registry; the experiment's explicit model keys and the overrides then take precedence.
    """
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    user = module.get_config(arg or None) if takes_arg else module.get_config()
    if not isinstance(user, dict | ConfigDict):
        raise ConfigError(f"get_config() in {path} returned {type(user).__name__}, not a "
                          "ConfigDict (is a `return config` missing?)")
    cfg = defaults()
    user = upgrade(user)
    name = user.get("model", {}).get("name", "")
    for item in overrides:
        key, _, value = item.removeprefix("config.").partition("=")
        if key == "model.name":
            name = value
    if name:
        from jaxclip.models.sizes import model_overrides

        _merge(cfg, {"model": model_overrides(name)})
    _merge(cfg, user)
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return _locked(cfg)


def load_or_size(spec: str | None, model_name: str, overrides=()) -> ConfigDict:
    """The config file `spec` with `overrides`, or without one the defaults with the registry
    size `model_name` (standard geometry), then the overrides (what the tools/ benchmarks take)."""
    if spec:
        return load(spec, overrides)
    from jaxclip.models.sizes import model_overrides

    cfg = from_dict({"model": dict(model_overrides(model_name), name=model_name)})
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return _locked(cfg)


def from_dict(values: dict) -> ConfigDict:
    """The defaults merged with a (possibly partial) nested dict, e.g. a saved config.json."""
    cfg = defaults()
    _merge(cfg, upgrade(values))
    validate(cfg)
    return _locked(cfg)


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_bool(value: Any) -> bool | None:
    """True/False for a bool or a yes/no word (true, 1, yes / false, 0, no); None otherwise."""
    if isinstance(value, bool):
        return value
    return _BOOL_WORDS.get(str(value).strip().lower())


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        word = parse_bool(text)
        return text if word is None else word  # a non-word is rejected by _check_type
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(cfg: ConfigDict, item: str) -> None:
    """Applies one `a.b.c=value` override; the key must exist (except in open sections)."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like key=value")
    key = key.removeprefix("config.")
    key = RENAMED.get(key, key)
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if part not in node:
            if _is_open(path):
                node[part] = ConfigDict()
            else:
                raise _unknown_key(key, defaults())
        node = node[part]
        if not isinstance(node, ConfigDict):
            raise ConfigError(f"config key {path!r} is not a section")
    last = parts[-1]
    if last not in node:
        if _is_open(key):
            node[last] = _parse_value(text, None)
            return
        raise _unknown_key(key, defaults())
    current = node[last]
    if isinstance(current, ConfigDict):
        value = _parse_value(text, None)
        if _is_open(key) and isinstance(value, dict):  # e.g. optim.lr_mults="{'^text/': 0.1}"
            node[last] = ConfigDict(value)
            return
        raise ConfigError(f"config key {key!r} is a section; set one of its keys instead")
    value = _check_type(key, current, _parse_value(text, current))
    with node.ignore_type():
        node[last] = value


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": layers.REMAT_CHOICES,
    "model.image.remat": ("", *layers.REMAT_CHOICES),
    "model.text.remat": ("", *layers.REMAT_CHOICES),
    "model.attn_impl": ("xla", "cudnn", "auto"),
    "model.image.pool": ("cls", "map", "mean"),
    "model.image.act": ("gelu", "quick_gelu"),
    "model.text.act": ("gelu", "quick_gelu"),
    "model.text.pool": ("eot", "last", "mean", "first"),
    "model.image.head": heads.HEADS,
    "model.text.head": heads.HEADS,
    "loss.scale_param": ("logit_scale", "temperature"),
    "optim.schedule": ("cosine", "constant", "linear"),
    "data.caption": ("random", "first", "all"),
}


def get_path(cfg: ConfigDict, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def validate(cfg: ConfigDict) -> None:
    """Checks values that have a fixed set of choices or must be positive."""
    owned = {f"loss.{name}.{key}": allowed for name in loss_registry.names()
             for key, allowed in loss_registry.get(name).choices.items()}
    owned.update({f"model.{kind.modality}.{kind.name}.{key}": allowed
                  for kind in tower_registry.all_kinds() for key, allowed in kind.choices.items()})
    owned.update({f"model.{m}.kind": tuple(tower_registry.kinds(m))
                  for m in tower_registry.MODALITIES})
    for path, choices in {**_CHOICES, **owned}.items():
        value = get_path(cfg, path)
        if value not in choices:
            raise ConfigError(f"config key {path!r} must be one of {choices}, got {value!r}")
    for path in ("train.steps", "train.batch_size", "train.log_every", "data.views"):
        if get_path(cfg, path) <= 0:
            raise ConfigError(f"config key {path!r} must be positive, got {get_path(cfg, path)}")
    pair = tuple(cfg.loss.pair)
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(tower_registry.MODALITIES):
        raise ConfigError(f"config key 'loss.pair' must name two different modalities of "
                          f"{tower_registry.MODALITIES}, got {pair}")
    if cfg.loss.tile < 0:
        raise ConfigError(f"config key 'loss.tile' must be >= 0, got {cfg.loss.tile}")
    for path in ("train.watchdog_multiple", "train.watchdog_floor_s",
                 "train.watchdog_first_floor_s", "train.stop_grace_s", "data.prefetch_to_device"):
        if get_path(cfg, path) < 0:
            raise ConfigError(f"config key {path!r} must be >= 0, got {get_path(cfg, path)}")
    img = cfg.model.image
    if img.image_size % img.patch_size:
        raise ConfigError(
            f"model.image.image_size={img.image_size} is not a multiple of "
            f"model.image.patch_size={img.patch_size}"
        )
    for tower in ("image", "text"):
        t = cfg.model[tower]
        if t.width % t.heads:
            raise ConfigError(f"model.{tower}.width={t.width} is not divisible by heads={t.heads}")
        decay = cfg.optim.layer_decay[tower]
        if not 0 < decay <= 1:
            raise ConfigError(f"config key 'optim.layer_decay.{tower}' must be in (0, 1], "
                              f"got {decay}")
    if cfg.model.text.kind == "bert" and cfg.model.text.pool not in ("mean", "first"):
        raise ConfigError("model.text.kind='bert' pools 'mean' or 'first' ([CLS]), got "
                          f"model.text.pool={cfg.model.text.pool!r}")
    if cfg.model.text.proj_bias and cfg.model.text.head != "none":
        raise ConfigError("model.text.proj_bias belongs to the tower's own projection; with "
                          f"model.text.head={cfg.model.text.head!r} the head has its own bias")
    views = cfg.data.view_augment
    if not (len(views.scale) == 2 and 0 < views.scale[0] <= views.scale[1] <= 1
            and 0 <= views.flip <= 1):
        raise ConfigError("data.view_augment needs 0 < scale[0] <= scale[1] <= 1 and flip in "
                          f"[0, 1], got scale={tuple(views.scale)}, flip={views.flip}")
    head = img.view_head
    if head.out < 0 or head.depth < 1 or (head.depth > 1 and head.hidden < 1):
        raise ConfigError("model.image.view_head needs out >= 0 (0: none), depth >= 1 and "
                          f"hidden >= 1 when depth > 1, got {head.to_dict()}")
    if img.head == "patch_mlp" and img.pool != "cls":
        raise ConfigError("model.image.head='patch_mlp' projects the CLS token and the patch "
                          f"tokens; it needs model.image.pool='cls', got {img.pool!r}")


def to_json(cfg: ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
