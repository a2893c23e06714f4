"""Hugging Face `BertModel` -> jaxclip's BERT text tower (`model.text.kind = "bert"`), import only.

Mapping: embeddings.{word,position}_embeddings -> text/{token,pos}_embed, row 0 of
token_type_embeddings -> text/type_embed (captions are one segment), embeddings.LayerNorm ->
text/ln_embed; per layer, attention.self.{query,key,value} -> blocks/attn/* (per-head kernels),
attention.output.dense -> blocks/attn/out, attention.output.LayerNorm -> blocks/ln_1 (post-LN),
intermediate.dense -> blocks/mlp/fc1, output.dense -> blocks/mlp/fc2, output.LayerNorm ->
blocks/ln_2. The pooler (dense + tanh on [CLS]) is not used by mean pooling and is skipped, as are
`position_ids` buffers. Checkpoints of BertFor* heads carry the encoder under `bert.`; that prefix
is stripped and the task heads are rejected as unknown tensors.

The imported tower has no projection: its config uses `model.text.head = "linear"`, a trainable
head into the joint space (LiT's recipe for a pretrained text tower).
"""

from __future__ import annotations

from jaxclip.interop import mapping as M

WEIGHTS = "model.safetensors"
IGNORE = r"(^|\.)position_ids$|^pooler\."
ACTS = {"gelu": "gelu"}  # HF's "gelu" is the exact erf GELU; "gelu_new" (tanh) is not supported


def rules(text_cfg) -> list[M.Rule]:
    w, h, depth = text_cfg.width, text_cfg.heads, text_cfg.depth
    layer = "encoder.layer.{i}"
    att = f"{layer}.attention"
    return [
        M.copy("text/token_embed", "embeddings.word_embeddings.weight"),
        M.copy("text/pos_embed", "embeddings.position_embeddings.weight"),
        M.Rule(("text/type_embed",), ("embeddings.token_type_embeddings.weight",),
               M.one(lambda t: t[0]), None),
        *M.layer_norm("text/ln_embed", "embeddings.LayerNorm"),
        *M.attention_rules("text/blocks/attn", (f"{att}.self.query", f"{att}.self.key",
                                                f"{att}.self.value"),
                           f"{att}.output.dense", width=w, heads=h, depth=depth),
        *M.layer_norm("text/blocks/ln_1", f"{att}.output.LayerNorm", depth),
        M.transposed("text/blocks/mlp/fc1/kernel", f"{layer}.intermediate.dense.weight", depth),
        M.copy("text/blocks/mlp/fc1/bias", f"{layer}.intermediate.dense.bias", depth),
        M.transposed("text/blocks/mlp/fc2/kernel", f"{layer}.output.dense.weight", depth),
        M.copy("text/blocks/mlp/fc2/bias", f"{layer}.output.dense.bias", depth),
        *M.layer_norm("text/blocks/ln_2", f"{layer}.output.LayerNorm", depth),
    ]


def strip_prefix(tensors: dict) -> dict:
    if "bert.embeddings.word_embeddings.weight" not in tensors:
        return tensors
    return {k.removeprefix("bert."): v for k, v in tensors.items()}


def model_config(hf: dict) -> dict:
    """The jaxclip `model` section (text tower only) for a HF BertConfig dict."""
    if hf.get("model_type") != "bert":
        raise ValueError(f"not a HF BERT config (model_type={hf.get('model_type')!r})")
    problems = []
    act = hf.get("hidden_act", "gelu")
    if act not in ACTS:
        problems.append(f"hidden_act={act!r} (supported: {sorted(ACTS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf['position_embedding_type']!r}")
    if hf.get("is_decoder", False):
        problems.append("is_decoder=True")
    width, inter = hf.get("hidden_size", 768), hf.get("intermediate_size", 3072)
    ratio = inter / width
    if int(width * ratio) != inter:
        problems.append(f"intermediate_size {inter} is not int(hidden_size * ratio)")
    if problems:
        raise ValueError("BERT config uses features jaxclip does not implement: "
                         + ", ".join(problems))
    return dict(
        embed_dim=width,
        text=dict(kind="bert", head="linear", vocab_size=hf.get("vocab_size", 30522),
                  context_length=hf.get("max_position_embeddings", 512), width=width,
                  depth=hf.get("num_hidden_layers", 12), heads=hf.get("num_attention_heads", 12),
                  mlp_ratio=ratio, act=ACTS[act], ln_eps=hf.get("layer_norm_eps", 1e-12),
                  causal=False, pool="mean", pad_id=hf.get("pad_token_id", 0), proj_bias=False),
    )
