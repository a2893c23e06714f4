"""The demo (configs/demo.py) with SLIP's image-image term added to the CLIP loss.

SLIP (Mu et al. 2021, arXiv 2112.12750) adds SimCLR's NT-Xent between two augmented views of
each image (τ = 0.1, weight c = 1) to the image-text loss, through a projection head on the image
tower's pooled features. "Cross the Gap" (arXiv 2502.04263) names such an intra-modal term as a
remedy for CLIP's weak image->image retrieval. Here: two views per image (view 0 is the demo's
crop and also feeds CLIP; view 1 a random resized crop of 30-100% of the area), a 3-layer view
head 512 wide with 128 outputs (SLIP: 4096 / 256 on ViT-B), and the `val` evaluator also
reports image->image precision of same-relation neighbours (`i2i_p1`, ...; chance `i2i_chance`).
No mirrored views: the captions say "to the left of" / "to the right of", so a flip would make
a different scene.

    jaxclip train --config configs/slip_demo.py --workdir runs/slip_demo

Measured against the demo, both cut to 300 steps (2-core shared CPU, 2026-12-07, one seed): val
R@1 0.395 / 0.371 (i2t / t2i) -> 0.329 / 0.307, novel 0.316 / 0.294 -> 0.258 / 0.234; image->image
same-relation precision at chance for both (0.25). A probe of same-colour-pair neighbours gives
P@10 0.817 -> 0.866; same-shape-pair stays near chance. docs/objectives.md has the table.
"""

from jaxclip.config import sibling

demo = sibling(__file__, "demo.py")


def get_config(arg=None):
    c = demo.get_config(arg)
    c.loss = dict(aux=dict(simclr=1.0), simclr=dict(temperature=0.1))
    c.model.image = dict(view_head=dict(out=128, hidden=512, depth=3))
    c.data.views = 2
    c.data.view_augment = dict(scale=(0.3, 1.0), ratio=(0.75, 1.3333), flip=0.0)
    c.evals.val.intra_label = "relation"
    return c
