"""Benchmark: a small CLIP whose train step jaxclip and open_clip run side by side on a CPU.

Not a recipe; no data section is needed. `tools/bench_peer.py` builds this model in both
libraries and times their training steps against each other (issue 11), and
`tools/bench_train.py --config configs/bench_tiny.py --batch 64` times jaxclip's step alone.

Model: ViT at 64 px, patch 8 (64 patches + a class token), width 256, 4 layers, 4 heads (head
dim 64); causal text transformer, context 32, CLIP's 49,408-token vocabulary, width 256, 4 layers,
4 heads; joint embedding 256; MLP ratio 4, exact GELU, LayerNorm eps 1e-5 (open_clip's defaults).
About 1.9 GFLOP per training sample (jaxclip/flops.py); the token table (12.6M of the 19.3M
parameters) costs no matmul FLOPs but its AdamW update touches all of it every step.
Training: softmax CLIP loss, AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2
(open_clip's defaults), constant lr and no gradient clipping, so both sides do the same update
work; float32 throughout.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        embed_dim=256,
        dtype="float32",
        image=dict(image_size=64, patch_size=8, width=256, depth=4, heads=4, mlp_ratio=4.0),
        text=dict(context_length=32, vocab_size=49408, width=256, depth=4, heads=4,
                  mlp_ratio=4.0),
    )
    c.loss = dict(name="clip")
    c.optim = dict(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, wd=0.2, grad_clip=0.0,
                   schedule="constant", warmup_steps=0)
    c.train = dict(batch_size=64, steps=1000)
    return c
