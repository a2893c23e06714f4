"""Demo: a tiny CLIP learns to match procedurally drawn shapes with their captions, on a CPU.

Trains: ViT-Ti-8-64 (image 64 px, patch 8, width 128, 4 layers; text width 128, 4 layers,
context 32, CLIP BPE tokenizer), softmax CLIP loss, batch 128, AdamW with warmup + cosine.
Data: the built-in `shapes` set (40k training images of two coloured shapes in a spatial relation,
"a large red circle above a small blue square"), generated into the cache on first use (~25 s)
and streamed through the grain pipeline like any real dataset.
Evaluates: image<->text retrieval on 1,000 unseen images (`val`) and on 1,000 images that each
contain a colour-shape pair never seen in training (`novel`); chance R@1 is 0.001.

Reaches (2-core CPU, 2026-11-25): see the README table; the whole command takes under 10 minutes.

    jaxclip train --config configs/demo.py --workdir runs/demo
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Patch 16 (16 image tokens) and unrolled layers: 3x the throughput of patch 8 with scan on
    # 2 CPU cores, which buys more steps in the time budget. Captions are at most 15 tokens.
    c.model = dict(name="ViT-Ti-8-64", embed_dim=128, scan_layers=False,
                   image=dict(patch_size=16), text=dict(context_length=16))
    c.train = dict(steps=900, batch_size=128, log_every=50, ckpt_every=300)
    c.optim = dict(lr=1e-3, wd=0.1, warmup_steps=50)
    c.data = dict(
        train=dict(dataset="shapes", split="train"),
        tokenizer=dict(kind="clip"),
    )
    c.evals = dict(
        val=dict(type="retrieval", dataset="shapes", split="val", every_steps=300),
        novel=dict(type="retrieval", dataset="shapes", split="novel", every_steps=300),
    )
    return c
