"""The tower registry: which encoder builds each modality's embeddings.

A tower kind is registered for one modality (`image`, `text`) with

  build        `build(tower_cfg, embed_dim) -> nnx.Module`; tower_cfg is the section
               `model.<modality>`. Parameters are created with `jaxclip.models.layers.param`
               (an init rule and logical axes), which is how the model initialiser draws them
               and how the mesh shards them.
  config       the kind's own settings with defaults: the config section
               `model.<modality>.<kind>` (checked like every key; `choices` limits values).
  embeddings   names of its sub-modules below the first block (token, patch and position
               embeddings and their norms): layer-wise lr decay treats them as layer 0.

The module's call is the modality's contract. Both take `dtype`, `return_tokens`, `scan`,
`remat` and `attn_impl` keywords:
  image  `tower(images (B, H, W, 3) float) -> (emb (B, F), tokens (B, N, F) | None)`
  text   `tower(tokens (B, T) int32) -> (emb (B, F), tokens (B, T, F) | None, mask (B, T) bool)`
F is `embed_dim` when the tower projects itself (`head = "none"`), else its width (a separate
head projects it). An image tower that serves a view head (`model.image.view_head`, for an
image-image term) also takes `project=False`, returning its features before its own projection,
and has `project(pooled, tokens, dtype=)` to apply that projection.
`model.<modality>.kind = "<kind>"` selects the kind; the section's shared keys (width, depth,
heads, locked, remat, head, ...) mean the same for every kind.

A new tower is one module that calls `register` and one config line; see docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

MODALITIES = ("image", "text")


@dataclasses.dataclass(frozen=True)
class TowerKind:
    name: str
    modality: str
    build: Callable
    config: dict
    choices: dict
    embeddings: tuple[str, ...]


_KINDS: dict[tuple[str, str], TowerKind] = {}


def register(name: str, *, modality: str, config: dict | None = None,
             choices: dict | None = None, embeddings: tuple[str, ...] = ()):
    """Decorator over a tower class (or any `build(tower_cfg, embed_dim)` callable)."""
    if modality not in MODALITIES:
        raise ValueError(f"tower {name!r}: unknown modality {modality!r}; one of {MODALITIES}")
    config, choices = dict(config or {}), dict(choices or {})
    if unknown := set(choices) - set(config):
        raise ValueError(f"tower {name!r}: choices for keys it does not have: {unknown}")

    def wrap(build):
        if (modality, name) in _KINDS:
            raise ValueError(f"{modality} tower {name!r} registered twice")
        _KINDS[modality, name] = TowerKind(name, modality, build, config, choices,
                                           tuple(embeddings))
        return build

    return wrap


def get(modality: str, name: str) -> TowerKind:
    if (modality, name) not in _KINDS:
        raise KeyError(f"unknown {modality} tower {name!r}; registered: {kinds(modality)}")
    return _KINDS[modality, name]


def kinds(modality: str) -> list[str]:
    return sorted(name for m, name in _KINDS if m == modality)


def all_kinds() -> list[TowerKind]:
    return [_KINDS[k] for k in sorted(_KINDS)]


def build(model_cfg, modality: str):
    """The configured tower of `modality`, its parameters not yet drawn."""
    section = model_cfg[modality]
    return get(modality, section.kind).build(section, model_cfg.embed_dim)


def embeddings_pattern() -> re.Pattern:
    """Parameter paths below the first block of any registered tower ("text/token_embed")."""
    alternatives = sorted({f"{k.modality}/{re.escape(n)}" for k in _KINDS.values()
                           for n in k.embeddings})
    return re.compile(rf"^({'|'.join(alternatives)})(/|$)" if alternatives else r"(?!)")
