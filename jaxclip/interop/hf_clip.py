"""Hugging Face transformers `CLIPModel` <-> jaxclip: names, layouts and configs.

Mapping (mapping.py): HF keeps q/k/v/out as separate PyTorch Linears (out, in); jaxclip keeps
per-head kernels (in, heads, head_dim), a transpose and a reshape. The patch embedding is a conv
weight OIHW in HF and HWIO in jaxclip. Projections are bias-free Linears (HF) vs (in, out) matrices.
`logit_scale` is log-space in both and is copied verbatim. HF's `post_layernorm` on the pooled
CLS equals jaxclip's `ln_post` on every token followed by CLS pooling (LayerNorm is per token), and
HF's text pooling (first `eos_token_id`) is jaxclip's "eot" pooling.

Representable in `CLIPModel`: CLS pooling with a class token, EOT pooling with a causal mask, no
text projection bias, no logit bias, no separate projection heads, the CLIP text tower (not
BERT), activations gelu / quick_gelu. `export_problems` names every feature that is not.
"""

from __future__ import annotations

from jaxclip.interop import mapping as M

WEIGHTS = "model.safetensors"
IGNORE = r"(^|\.)position_ids$"  # buffers in older hub files
ACTS = ("gelu", "quick_gelu")
# CLIPTextConfig / CLIPVisionConfig defaults (ViT-B/32), for keys a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, pad_token_id=1,
                     bos_token_id=49406, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _blocks(dst: str, src: str, width: int, heads: int, depth: int) -> list[M.Rule]:
    layer = f"{src}.encoder.layers.{{i}}"
    att = f"{layer}.self_attn"
    return [
        *M.layer_norm(f"{dst}/blocks/ln_1", f"{layer}.layer_norm1", depth),
        *M.attention_rules(f"{dst}/blocks/attn", (f"{att}.q_proj", f"{att}.k_proj",
                                                  f"{att}.v_proj"),
                           f"{att}.out_proj", width=width, heads=heads, depth=depth),
        *M.layer_norm(f"{dst}/blocks/ln_2", f"{layer}.layer_norm2", depth),
        M.transposed(f"{dst}/blocks/mlp/fc1/kernel", f"{layer}.mlp.fc1.weight", depth),
        M.copy(f"{dst}/blocks/mlp/fc1/bias", f"{layer}.mlp.fc1.bias", depth),
        M.transposed(f"{dst}/blocks/mlp/fc2/kernel", f"{layer}.mlp.fc2.weight", depth),
        M.copy(f"{dst}/blocks/mlp/fc2/bias", f"{layer}.mlp.fc2.bias", depth),
    ]


def rules(model_cfg) -> list[M.Rule]:
    t, v = model_cfg.text, model_cfg.image
    conv = M.Rule(("image/patch_embed",), ("vision_model.embeddings.patch_embedding.weight",),
                  M.one(lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
                  M.one(lambda k: k.transpose(3, 2, 0, 1)))
    return [
        M.copy("logit_scale", "logit_scale"),
        M.copy("text/token_embed", "text_model.embeddings.token_embedding.weight"),
        M.copy("text/pos_embed", "text_model.embeddings.position_embedding.weight"),
        *_blocks("text", "text_model", t.width, t.heads, t.depth),
        *M.layer_norm("text/ln_final", "text_model.final_layer_norm"),
        M.transposed("text/proj", "text_projection.weight"),
        conv,
        M.copy("image/cls_token", "vision_model.embeddings.class_embedding"),
        M.copy("image/pos_embed", "vision_model.embeddings.position_embedding.weight"),
        *M.layer_norm("image/ln_pre", "vision_model.pre_layrnorm"),  # sic
        *_blocks("image", "vision_model", v.width, v.heads, v.depth),
        *M.layer_norm("image/ln_post", "vision_model.post_layernorm"),
        M.transposed("image/proj", "visual_projection.weight"),
    ]


def _mlp_ratio(hidden: int, intermediate: int, where: str) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        raise ValueError(f"{where}: intermediate_size {intermediate} is not representable as "
                         f"int(hidden_size * mlp_ratio) for hidden_size {hidden}")
    return ratio


def _act(name: str, where: str) -> str:
    if name not in ACTS:
        raise ValueError(f"{where}.hidden_act={name!r} is not supported (jaxclip: {ACTS})")
    return name


def model_config(hf: dict) -> dict:
    """The jaxclip `model` section for a HF CLIPConfig dict (config.json)."""
    if hf.get("model_type") != "clip":
        raise ValueError(f"not a HF CLIPModel config (model_type={hf.get('model_type')!r})")
    tc = {**TEXT_DEFAULTS, **hf.get("text_config", {})}
    vc = {**VISION_DEFAULTS, **hf.get("vision_config", {})}
    if vc["num_channels"] != 3:
        raise ValueError(f"vision_config.num_channels={vc['num_channels']}; jaxclip takes RGB")
    eos = tc["eos_token_id"]
    if eos == 2:
        # HF's legacy configs pool at argmax(input_ids), i.e. at the largest id, which is the
        # CLIP tokenizer's EOT (the last vocabulary entry).
        eos = tc["vocab_size"] - 1
    return dict(
        embed_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
        logit_bias_init=None,
        text=dict(
            kind="clip", head="none", vocab_size=tc["vocab_size"], width=tc["hidden_size"],
            context_length=tc["max_position_embeddings"], depth=tc["num_hidden_layers"],
            heads=tc["num_attention_heads"],
            mlp_ratio=_mlp_ratio(tc["hidden_size"], tc["intermediate_size"], "text_config"),
            act=_act(tc["hidden_act"], "text_config"), ln_eps=tc["layer_norm_eps"],
            causal=True, pool="eot", eot_id=eos, pad_id=0, proj_bias=False),
        image=dict(
            head="none", image_size=vc["image_size"], patch_size=vc["patch_size"],
            width=vc["hidden_size"], depth=vc["num_hidden_layers"],
            heads=vc["num_attention_heads"],
            mlp_ratio=_mlp_ratio(vc["hidden_size"], vc["intermediate_size"], "vision_config"),
            act=_act(vc["hidden_act"], "vision_config"), ln_eps=vc["layer_norm_eps"],
            pool="cls", class_token=True),
    )


def export_problems(model_cfg, *, logit_bias_ok: bool = False) -> list[str]:
    """Features of a jaxclip model that a CLIPModel (or open_clip's CLIP) cannot represent."""
    m, img, txt = model_cfg, model_cfg.image, model_cfg.text
    problems = []
    if img.pool != "cls":
        problems.append(f"model.image.pool={img.pool!r} (only CLS-token pooling)")
    if not img.class_token:
        problems.append("model.image.class_token=False (the formats always have one)")
    for tower, t in (("image", img), ("text", txt)):
        if t.head != "none":
            problems.append(f"model.{tower}.head={t.head!r} (only the tower's own linear "
                            "projection)")
        if t.act not in ACTS:
            problems.append(f"model.{tower}.act={t.act!r}")
    if txt.kind != "clip":
        problems.append(f"model.text.kind={txt.kind!r} (only the CLIP text transformer)")
    if txt.pool != "eot":
        problems.append(f"model.text.pool={txt.pool!r} (only end-of-text pooling)")
    if not txt.causal:
        problems.append("model.text.causal=False (the text tower is always causal)")
    if txt.proj_bias:
        problems.append("model.text.proj_bias=True (the text projection has no bias)")
    if m.logit_bias_init is not None and not logit_bias_ok:
        problems.append("model.logit_bias_init (a learnable logit bias, SigLIP-style)")
    return problems


def hf_config(model_cfg, logit_scale: float) -> dict:
    """The HF CLIPConfig dict (config.json) of an exportable jaxclip model."""
    problems = export_problems(model_cfg)
    if model_cfg.text.eot_id == 2:
        problems.append("model.text.eot_id=2 (HF then pools at the largest id instead)")
    if problems:
        raise ValueError("cannot export to a HF CLIPModel: " + "; ".join(problems))
    t, v, e = model_cfg.text, model_cfg.image, model_cfg.embed_dim
    clip_vocab = t.vocab_size == 49408
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "dtype": "float32",
        "projection_dim": e,
        # CLIPModel initialises its parameter from this; the weights file carries the value.
        "logit_scale_init_value": float(logit_scale),
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": t.vocab_size,
            "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length, "hidden_act": t.act,
            "layer_norm_eps": t.ln_eps, "projection_dim": e,
            # HF pools at the first eos_token_id; the others only matter to the tokenizer
            # (HF's CLIP configs say pad 1, though its tokenizer pads with EOT).
            "eos_token_id": t.eot_id, "pad_token_id": 1 if clip_vocab else t.pad_id,
            **({"bos_token_id": 49406} if clip_vocab else {}),
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": v.act, "layer_norm_eps": v.ln_eps,
            "projection_dim": e,
        },
    }


def image_processor_config(image_size: int, mean, std) -> dict:
    """preprocessor_config.json for CLIPImageProcessor: jaxclip's own resize and crop (shorter
    side to image_size, bicubic, centre crop) and normalisation."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std],
        "do_convert_rgb": True,
    }
