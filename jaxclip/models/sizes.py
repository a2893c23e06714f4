"""Named model sizes: open_clip's names and shapes, plus small variants that train on a CPU.

`model.name = "ViT-B-32"` in a config fills `model.embed_dim`, `model.image.*` and `model.text.*`
from this table before the experiment's own keys are applied, so an experiment can take a standard
size and still change one field.
"""

from __future__ import annotations

_CLIP_TEXT = dict(vocab_size=49408, context_length=77, width=512, heads=8, depth=12)

SIZES: dict[str, dict] = {
    "ViT-B-32": dict(
        embed_dim=512,
        image=dict(image_size=224, patch_size=32, width=768, depth=12, heads=12),
        text=_CLIP_TEXT,
    ),
    "ViT-B-16": dict(
        embed_dim=512,
        image=dict(image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=_CLIP_TEXT,
    ),
    "ViT-L-14": dict(
        embed_dim=768,
        image=dict(image_size=224, patch_size=14, width=1024, depth=24, heads=16),
        text=dict(_CLIP_TEXT, width=768, heads=12),
    ),
    "ViT-H-14": dict(  # head width 80
        embed_dim=1024,
        image=dict(image_size=224, patch_size=14, width=1280, depth=32, heads=16),
        text=dict(_CLIP_TEXT, width=1024, heads=16, depth=24),
    ),
    # CPU-sized variants (not open_clip names).
    "ViT-Ti-8-64": dict(
        embed_dim=128,
        image=dict(image_size=64, patch_size=8, width=128, depth=4, heads=4),
        text=dict(vocab_size=49408, context_length=32, width=128, heads=4, depth=4),
    ),
    # The demo's model: the Ti geometry at patch 16 (16 patches of a 64 px image).
    "ViT-Ti-16-64": dict(
        embed_dim=128,
        image=dict(image_size=64, patch_size=16, width=128, depth=4, heads=4),
        text=dict(vocab_size=49408, context_length=32, width=128, heads=4, depth=4),
    ),
    "ViT-S-8-64": dict(
        embed_dim=256,
        image=dict(image_size=64, patch_size=8, width=256, depth=6, heads=4),
        text=dict(vocab_size=49408, context_length=32, width=256, heads=4, depth=6),
    ),
}


def model_overrides(name: str) -> dict:
    if name not in SIZES:
        raise KeyError(f"unknown model.name {name!r}; registered sizes: {sorted(SIZES)}")
    return SIZES[name]
