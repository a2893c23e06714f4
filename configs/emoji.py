"""Emoji: a small CLIP learns emoji images from their official Unicode names; retrieval on held-out emoji.

Trains: ViT-Ti-16-64 (image 64 px, 16 patches, width 128, 4 layers) and a 4-layer,
width-128 text tower (CLIP BPE, context 16) with the softmax CLIP loss, batch 128, AdamW with
warmup + cosine, random-resized-crop augmentation (the training set is small: 2,886 images).
Data: every fully-qualified emoji of Unicode 15.0 rendered from the Debian Noto Color Emoji font,
captioned with its CLDR name ("grinning face", "woman firefighter: medium skin tone"); built into
the cache on first use (about 20 s; needs `apt-get install fonts-noto-color-emoji unicode-data`).
The split is by base emoji, so skin-tone variants of an emoji never straddle train and eval.
Evaluates: image<->text retrieval on the 769 held-out emoji (`eval`; chance R@1 = 1/769 = 0.0013)
and on the first 769 training emoji (`train`), which shows how much of the fit carries over to
names and pictures never seen together.

Reaches (2-core CPU, 2026-12-03, 13 minutes including the build): held-out R@1 0.25 (i2t) /
0.28 (t2i), R@10 0.56 / 0.55, median rank 6; train R@1 0.70 / 0.75. On a faster 2-core Xeon
(2026-12-04): 0.24 / 0.26 held-out, 0.68 / 0.74 train, 9:42. Tables: docs/results.md.

    jaxclip train --config configs/emoji.py --workdir runs/emoji
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(name="ViT-Ti-16-64", embed_dim=128, scan_layers=False,
                   text=dict(context_length=16))
    c.train = dict(steps=1500, batch_size=128, log_every=50, ckpt_every=500)
    c.optim = dict(lr=1e-3, wd=0.2, warmup_steps=100)
    c.data = dict(
        train=dict(dataset="emoji", split="train"),
        augment=dict(kind="rrc", scale=(0.6, 1.0)),
        tokenizer=dict(kind="clip"),
    )
    c.evals = dict(
        eval=dict(type="retrieval", dataset="emoji", split="eval", every_steps=500),
        train=dict(type="retrieval", dataset="emoji", split="train", max_examples=769,
                   every_steps=500),
    )
    return c
