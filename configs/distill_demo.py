"""A smaller student distilled from a demo-trained teacher (open_clip's KD term added to CLIP).

The student is configs/demo.py with half the layers (2 per tower) and 64-wide embeddings; the
teacher is any model with the demo's CLIP tokenizer, e.g. a `configs/demo.py` workdir, given as
the config's argument or as `loss.teacher.path` (a jaxclip workdir or params dir, a HF CLIPModel
or an open_clip dir). Its embedding width, image size and depth may differ: only the B x B
similarity matrices are compared. KD (weight 1, as open_clip's distilled models) pulls the
student's softmax over the batch, rows and columns, towards the teacher's at the teacher's own
logit scale (jaxclip/losses/distill.py; docs/objectives.md has the measured effect).

    jaxclip train --config configs/demo.py --workdir runs/demo
    jaxclip train --config configs/distill_demo.py:runs/demo --workdir runs/distill_demo

Mod-X's screened KL (for continual training from the previous model) instead:
`--config.loss.aux.kd=0 --config.loss.aux.modx=1400` (the paper's α = 20 summed over 70 rows).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "demo", os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def get_config(arg=None):
    c = demo.get_config()
    c.model.embed_dim = 64
    c.model.image = dict(depth=2)
    c.model.text.depth = 2
    c.loss = dict(aux=dict(kd=1.0), teacher=dict(path=arg or ""))
    return c
