"""open_clip (`CLIP` class) <-> jaxclip: names, layouts and configs.

The directory format is open_clip's own hub format: `open_clip_config.json`
({"model_cfg": ..., "preprocess_cfg": ...}) next to `open_clip_model.safetensors`, which
`open_clip.create_model("local-dir:DIR")` loads (strictly: no missing or unexpected keys).

Mapping (mapping.py): attention q/k/v are one fused `in_proj_weight` (3w, w), split in thirds;
projections (`text_projection`, `visual.proj`) are already (in, out) matrices; the text tower's
keys sit at the top level (a `CustomTextCLIP` checkpoint's `text.` prefix is accepted on
import). open_clip pools text at `argmax(ids)`, which is the first EOT when EOT is the largest
id (CLIP's 49407); for another EOT id the export uses its `eos` pooling with that id. The
`attn_mask` buffer is rebuilt by open_clip from the config and never stored.
"""

from __future__ import annotations

from jaxclip.interop import mapping as M
from jaxclip.interop.hf_clip import export_problems

CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
           "model.safetensors")
IGNORE = r"(^|\.)attn_mask$"

# open_clip config fields jaxclip reproduces only at their default value.
_VISION_DEFAULTS = dict(ls_init_value=None, attentional_pool=False, no_ln_pre=False,
                        pos_embed_type="learnable", final_ln_after_pool=False, pool_type="tok",
                        act_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                        scale_heads=False, scale_attn_inner=False, scale_attn=False,
                        scale_fc=False, timm_model_name=None)
_TEXT_DEFAULTS = dict(ls_init_value=None, embed_cls=False, no_causal_mask=False,
                      final_ln_after_pool=False, proj_bias=False, proj_type="linear",
                      act_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
                      scale_heads=False, scale_attn_inner=False, scale_attn=False,
                      scale_fc=False, hf_model_name=None)


def _blocks(dst: str, src: str, width: int, heads: int, depth: int) -> list[M.Rule]:
    layer = f"{src}transformer.resblocks.{{i}}"
    return [
        *M.layer_norm(f"{dst}/blocks/ln_1", f"{layer}.ln_1", depth),
        *M.attention_rules(f"{dst}/blocks/attn", f"{layer}.attn.in_proj", f"{layer}.attn.out_proj",
                           width=width, heads=heads, depth=depth),
        *M.layer_norm(f"{dst}/blocks/ln_2", f"{layer}.ln_2", depth),
        M.transposed(f"{dst}/blocks/mlp/fc1/kernel", f"{layer}.mlp.c_fc.weight", depth),
        M.copy(f"{dst}/blocks/mlp/fc1/bias", f"{layer}.mlp.c_fc.bias", depth),
        M.transposed(f"{dst}/blocks/mlp/fc2/kernel", f"{layer}.mlp.c_proj.weight", depth),
        M.copy(f"{dst}/blocks/mlp/fc2/bias", f"{layer}.mlp.c_proj.bias", depth),
    ]


def rules(model_cfg) -> list[M.Rule]:
    t, v = model_cfg.text, model_cfg.image
    conv = M.Rule(("image/patch_embed",), ("visual.conv1.weight",),
                  M.one(lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
                  M.one(lambda k: k.transpose(3, 2, 0, 1)))
    out = [
        # open_clip's nonscalar_logit_scale stores shape (1,); jaxclip a scalar.
        M.Rule(("logit_scale",), ("logit_scale",), M.one(lambda x: x.reshape(())),
               M.one(lambda x: x)),
        M.copy("text/token_embed", "token_embedding.weight"),
        M.copy("text/pos_embed", "positional_embedding"),
        *_blocks("text", "", t.width, t.heads, t.depth),
        *M.layer_norm("text/ln_final", "ln_final"),
        M.copy("text/proj", "text_projection"),
        conv,
        M.copy("image/cls_token", "visual.class_embedding"),
        M.copy("image/pos_embed", "visual.positional_embedding"),
        *M.layer_norm("image/ln_pre", "visual.ln_pre"),
        *_blocks("image", "visual.", v.width, v.heads, v.depth),
        *M.layer_norm("image/ln_post", "visual.ln_post"),
        M.copy("image/proj", "visual.proj"),
    ]
    if model_cfg.logit_bias_init is not None:
        out.append(M.Rule(("logit_bias",), ("logit_bias",), M.one(lambda x: x.reshape(())),
                          M.one(lambda x: x)))
    return out


def uncustomize(tensors: dict) -> dict:
    """A CustomTextCLIP state dict (text tower under `text.`) in the CLIP class's key layout."""
    if "text.token_embedding.weight" not in tensors:
        return tensors
    return {k.removeprefix("text."): v for k, v in tensors.items()}


def _unsupported(cfg: dict, defaults: dict, where: str) -> list[str]:
    return [f"{where}.{k}={cfg[k]!r}" for k, d in defaults.items() if cfg.get(k, d) != d]


def _eps(cfg: dict) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def model_config(oc: dict, tensors: dict | None = None) -> dict:
    """The jaxclip `model` section for an open_clip model config (`model_cfg`)."""
    vc, tc = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
    problems = _unsupported(vc, _VISION_DEFAULTS, "vision_cfg")
    problems += _unsupported(tc, _TEXT_DEFAULTS, "text_cfg")
    if "multimodal_cfg" in oc:
        problems.append("multimodal_cfg (CoCa)")
    if not isinstance(vc.get("layers", 12), int):
        problems.append(f"vision_cfg.layers={vc['layers']!r} (a ResNet tower)")
    pool = tc.get("pool_type", "argmax")
    vocab = tc.get("vocab_size", 49408)
    if pool == "argmax":
        eot = vocab - 1  # argmax(ids) is the first EOT when EOT is the largest id
    elif pool == "eos":
        eot = tc.get("eos_id", 2)
    else:
        problems.append(f"text_cfg.pool_type={pool!r}")
        eot = vocab - 1
    if problems:
        raise ValueError("open_clip model uses features jaxclip does not implement: "
                         + ", ".join(problems))
    act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"
    v_width = vc.get("width", 768)
    size = vc.get("image_size", 224)
    patch = vc.get("patch_size", 16)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise ValueError(f"non-square image_size {size!r} / patch_size {patch!r}")
    bias = None
    if oc.get("init_logit_bias") is not None or (tensors is not None and "logit_bias" in tensors):
        bias = float(oc.get("init_logit_bias") or 0.0)
    return dict(
        embed_dim=oc["embed_dim"], logit_bias_init=bias,
        text=dict(kind="clip", head="none", vocab_size=vocab,
                  context_length=tc.get("context_length", 77), width=tc.get("width", 512),
                  heads=tc.get("heads", 8), depth=tc.get("layers", 12),
                  mlp_ratio=float(tc.get("mlp_ratio", 4.0)), act=act, ln_eps=_eps(tc),
                  causal=True, pool="eot", eot_id=eot, pad_id=tc.get("pad_id", 0),
                  proj_bias=False),
        image=dict(head="none", image_size=size, patch_size=patch, width=v_width,
                   depth=vc.get("layers", 12), heads=v_width // vc.get("head_width", 64),
                   mlp_ratio=float(vc.get("mlp_ratio", 4.0)), act=act, ln_eps=_eps(vc),
                   pool="cls", class_token=True),
    )


def open_clip_config(model_cfg, image_size: int, mean, std) -> dict:
    """open_clip_config.json of an exportable jaxclip model."""
    m, t, v = model_cfg, model_cfg.text, model_cfg.image
    problems = export_problems(m, logit_bias_ok=True)
    if v.act != t.act:
        problems.append(f"model.image.act={v.act!r} differs from model.text.act={t.act!r} "
                        "(open_clip has one quick_gelu flag for both towers)")
    if v.width % v.heads:
        problems.append(f"model.image.width {v.width} not divisible by heads {v.heads}")
    if problems:
        raise ValueError("cannot export to open_clip: " + "; ".join(problems))
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                    heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_ratio, pad_id=t.pad_id)
    if t.eot_id != t.vocab_size - 1:
        text_cfg.update(pool_type="eos", eos_id=t.eot_id)
    vision_cfg = dict(image_size=v.image_size, layers=v.depth, width=v.width,
                      head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                      patch_size=v.patch_size)
    for cfg, eps in ((text_cfg, t.ln_eps), (vision_cfg, v.ln_eps)):
        if eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": eps}
    model = dict(embed_dim=m.embed_dim, quick_gelu=v.act == "quick_gelu", vision_cfg=vision_cfg,
                 text_cfg=text_cfg)
    if m.logit_bias_init is not None:
        model["init_logit_bias"] = float(m.logit_bias_init)
    preprocess = dict(size=image_size, mean=[float(x) for x in mean],
                      std=[float(x) for x in std], interpolation="bicubic",
                      resize_mode="shortest")
    return {"model_cfg": model, "preprocess_cfg": preprocess}
