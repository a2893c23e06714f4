"""The dual encoder: image tower + text tower + a learnable logit scale (and optional bias).

Returns L2-normalised embeddings in float32 together with the loss parameters, as an `Encoded`
pytree that every registered objective consumes. Token-level features (FILIP-style objectives) are
only computed when asked for.

`logit_scale` is stored in log space (init ln(1/0.07); SigLIP ln 10) and `logit_bias` exists only
when `model.logit_bias_init` is set. With `loss.scale_param = "temperature"` (ALIGN) the same
parameter holds the temperature itself; the loss, not the model, interprets it.

Each modality's tower comes from the tower registry (towers.py) by `model.<modality>.kind`: the
ViT (image.py), the CLIP transformer (text.py) or a BERT encoder (bert.py). A tower
with `head != "none"` returns unprojected features and a separate head (heads.py, `image_head` /
`text_head`) projects them; a locked tower is cut off by stop_gradient before its head, so no
backward pass is built through it while the head trains.

Images given as (B, V, H, W, 3), V views of each image (data.views), feed an image-image term:
all B·V crops run through the image tower, the view head (`model.image.view_head`, heads.py)
maps their unprojected pooled features to `emb["image_views"]` (B, V, E'), and view 0 alone is
projected into `emb["image"]`, the image-text pair's embedding. (SLIP used a third crop for the
image-text loss; reusing view 0 saves a forward pass per image.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclip import sharding
from jaxclip.models import towers
from jaxclip.models.bert import BertTower
from jaxclip.models.heads import Head, ViewHead
from jaxclip.models.image import ImageTower
from jaxclip.models.init import draw_params
from jaxclip.models.text import TextTower

# The built-in towers. Their modules do not import the registry, so that a tower module stays a
# plain model file; a new tower registers itself with `@towers.register(...)` in its own module.
towers.register("vit", modality="image",
                embeddings=("patch_embed", "cls_token", "pos_embed", "ln_pre"))(ImageTower)
towers.register("clip", modality="text", embeddings=("token_embed", "pos_embed"))(TextTower)
towers.register("bert", modality="text",
                embeddings=("token_embed", "pos_embed", "type_embed", "ln_embed"))(BertTower)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Encoded:
    """A batch encoded by every tower, keyed by modality ("image", "text"), and the loss scalars.

    An objective contrasts one `pair` of modalities, (image, text) unless `loss.pair` says
    otherwise; it reads them by role: `x` / `y` (embeddings), `x_tokens` / `y_tokens`, `x_mask` /
    `y_mask` (None where the tower gives none), `x_present` / `y_present` (None unless the
    modality has K inputs per row). `image_emb` / `text_emb` name the modalities.
    """

    # modality -> (B, E) L2-normalised, float32; with image views also "image_views" (B, V, E')
    emb: dict[str, jax.Array]
    logit_scale: jax.Array | None  # () raw parameter (log-scale or temperature)
    logit_bias: jax.Array | None = None  # ()
    tokens: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # (B, N, E) per token
    masks: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # (B, N) bool, real
    # The step's random key (typed, replicated), set by the trainer for objectives that draw
    # (m2mix's mixing ratio): a function of (seed, step), so a resumed run draws the same.
    key: jax.Array | None = None
    # A modality given as K inputs per row (data.caption = "all": K captions of each image) has
    # (B, K, E) embeddings, (B, K, N, E) tokens, (B, K, N) masks, and here a (B, K) bool mask
    # of the inputs that are real (an image with fewer than K captions); absent: all real.
    present: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    # A frozen teacher's encoding of the same batch (distillation terms: losses/distill.py),
    # attached by the trainer: its embeddings by modality (its own width) and, as logit_scale,
    # the log of its logit multiplier. No gradient reaches it.
    teacher: Encoded | None = None
    pair: tuple[str, str] = dataclasses.field(default=("image", "text"),
                                              metadata=dict(static=True))

    @classmethod
    def of_pair(cls, x, y, logit_scale, logit_bias=None, *, pair=("image", "text")) -> Encoded:
        """Two modalities' embeddings (the functional losses' input)."""
        return cls({pair[0]: x, pair[1]: y}, logit_scale, logit_bias, pair=tuple(pair))

    def contrasting(self, pair) -> Encoded:
        missing = [m for m in pair if m not in self.emb]
        if missing:
            raise ValueError(f"loss.pair={tuple(pair)}: no {missing} embeddings; the model "
                             f"encodes {sorted(self.emb)}")
        return dataclasses.replace(self, pair=tuple(pair))

    def with_pair(self, x, y) -> Encoded:
        """The same, with the pair's embeddings replaced."""
        return dataclasses.replace(self, emb={**self.emb, self.pair[0]: x, self.pair[1]: y})

    x = property(lambda self: self.emb[self.pair[0]])
    y = property(lambda self: self.emb[self.pair[1]])
    x_tokens = property(lambda self: self.tokens.get(self.pair[0]))
    y_tokens = property(lambda self: self.tokens.get(self.pair[1]))
    x_mask = property(lambda self: self.masks.get(self.pair[0]))
    y_mask = property(lambda self: self.masks.get(self.pair[1]))
    x_present = property(lambda self: self.present.get(self.pair[0]))
    y_present = property(lambda self: self.present.get(self.pair[1]))
    image_emb = property(lambda self: self.emb["image"])
    text_emb = property(lambda self: self.emb["text"])


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def _embeddings(emb: jax.Array, tokens: jax.Array | None):
    """L2-normalised output embeddings, pinned to the batch split the loss expects."""
    emb = sharding.constrain(l2_normalize(emb), ("act_batch", None))
    if tokens is not None:
        tokens = sharding.constrain(l2_normalize(tokens), ("act_batch", None, None))
    return emb, tokens


# Parameter subtrees that only training reads: the view head serves SLIP's image-image term and,
# as in SLIP, is not part of the encoder a checkpoint is exported as.
TRAINING_ONLY = ("view_head",)


class TwoTower(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs | int | None):
        """cfg: the `model` section of a jaxclip config; rngs: an `nnx.Rngs` (its `params`
        stream) or an int seed from which every parameter is drawn. `rngs=None` leaves the random
        parameters at zero: only for shapes (`nnx.eval_shape`) or when a checkpoint's values
        replace them at once."""
        # Each modality's tower and optional head, as attributes named after the modality (the
        # parameter paths "image/...", "text_head/..." of every checkpoint so far).
        run = dict(scan=cfg.scan_layers, attn_impl=cfg.attn_impl)
        self.modalities = towers.MODALITIES
        self.runs, self.locked = {}, {}
        for m in self.modalities:
            section = cfg[m]
            setattr(self, m, towers.build(cfg, m))
            # Heads live outside the towers' subtrees, so a locked tower's head still trains.
            setattr(self, f"{m}_head", Head(section.head, section.width, cfg.embed_dim,
                                            ln_eps=section.ln_eps, text=m == "text")
                    if section.head != "none" else None)
            # The tower's own remat policy when set, else model.remat. attn_impl "auto" is
            # resolved per attention call (layers.resolve_attn_impl: backend, dtype, head dim).
            self.runs[m] = dict(run, remat=section.get("remat") or cfg.remat)
            self.locked[m] = section.locked
        views = cfg.image.get("view_head", {}).get("out", 0)
        # Named to sort after every other subtree: parameters are drawn in path order
        # (init.draw_params), so the towers start the same with or without the view head.
        self.view_head = (ViewHead(cfg.image.width, cfg.image.view_head.hidden, views,
                                   cfg.image.view_head.depth) if views else None)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32), axes=(),
                                     init=("value",))
        self.logit_bias = (nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32), axes=(),
                                     init=("value",))
                           if cfg.logit_bias_init is not None else None)
        self.dtype = jnp.dtype(cfg.dtype)
        if rngs is not None:
            draw_params(self, rngs)

    def encode(self, modality: str, inputs: jax.Array, *, return_tokens: bool = False):
        """(embeddings, token features or None, mask or None) of one modality's inputs.

        Text given as (B, K, T), K captions per image, is encoded as B·K captions and returned
        as (B, K, E) embeddings ((B, K, T, E) tokens, (B, K, T) mask)."""
        if modality == "text" and inputs.ndim == 3:
            rows = inputs.shape[:2]
            emb, tokens, mask = self.encode(modality, inputs.reshape(-1, inputs.shape[-1]),
                                            return_tokens=return_tokens)
            # Row-major flattening keeps each image's K captions in the image's batch block, so
            # the batch split of the B·K rows is the split of the B images.
            return jax.tree.map(lambda a: a.reshape(*rows, *a.shape[1:]), (emb, tokens, mask))
        # The parameters are traced with the step's mesh: activation constraints apply inside.
        with sharding.activation_mesh(self.logit_scale[...]):
            head = getattr(self, f"{modality}_head")
            want = return_tokens or (head is not None and head.kind == "patch_mlp")
            out = getattr(self, modality)(inputs, dtype=self.dtype, return_tokens=want,
                                          **self.runs[modality])
            emb, tokens, mask = (*out, None)[:3]  # image towers return no mask
            if self.locked[modality]:
                emb, tokens = jax.lax.stop_gradient((emb, tokens))
            if head is not None:
                emb, tokens = head(emb, tokens, mask)
            tokens = tokens if return_tokens else None
            return (*_embeddings(emb, tokens), mask)

    def encode_views(self, images: jax.Array, *, return_tokens: bool = False):
        """(view-0 embeddings (B, E), view-0 tokens or None, view embeddings (B, V, E')) of
        images (B, V, H, W, 3): the view head on every view, the image-text projection on view
        0 (see the module docstring)."""
        if self.view_head is None:
            raise ValueError(f"images of shape {images.shape} hold several views of each image "
                             "(data.views > 1), which only an image-image term reads; it needs "
                             "a view head: set model.image.view_head.out")
        if self.image_head is not None and self.image_head.kind == "patch_mlp":
            raise ValueError("model.image.view_head reads the pooled features; it is not "
                             "supported with model.image.head='patch_mlp'")
        rows = images.shape[:2]
        with sharding.activation_mesh(self.logit_scale[...]):
            # Row-major: each image's V views stay in its batch block (as K captions do).
            pooled, tokens = self.image(images.reshape(-1, *images.shape[2:]), dtype=self.dtype,
                                        return_tokens=return_tokens, project=False,
                                        **self.runs["image"])
            if self.locked["image"]:
                pooled, tokens = jax.lax.stop_gradient((pooled, tokens))
            views = self.view_head(pooled).reshape(*rows, -1)
            first = jax.tree.map(lambda a: a.reshape(*rows, *a.shape[1:])[:, 0], (pooled, tokens))
            emb, tokens = self.image.project(*first, dtype=self.dtype)
            if self.image_head is not None:
                emb, tokens = self.image_head(emb, tokens)
            views = sharding.constrain(l2_normalize(views), ("act_batch", None, None))
            return (*_embeddings(emb, tokens), views)

    def encode_modality(self, modality: str, inputs: jax.Array, *, return_tokens: bool = False):
        """What one modality's inputs add to `Encoded`: ({key: embeddings}, {key: tokens},
        {key: masks}), keyed by the modality, plus "image_views" for images with views."""
        if modality == "image" and inputs.ndim == 5:
            emb, tokens, views = self.encode_views(inputs, return_tokens=return_tokens)
            return ({"image": emb, "image_views": views},
                    {"image": tokens} if return_tokens else {}, {})
        emb, tokens, mask = self.encode(modality, inputs, return_tokens=return_tokens)
        if not return_tokens:
            return {modality: emb}, {}, {}
        return {modality: emb}, {modality: tokens}, {} if mask is None else {modality: mask}

    def encode_image(self, images: jax.Array, *, return_tokens: bool = False):
        return self.encode("image", images, return_tokens=return_tokens)[:2]

    def encode_text(self, text: jax.Array, *, return_tokens: bool = False):
        return self.encode("text", text, return_tokens=return_tokens)

    def encode_all(self, inputs: dict[str, jax.Array], *, return_tokens: bool = False):
        """`Encoded` of a batch {modality: inputs}; tokens and masks only with return_tokens."""
        emb, tokens, masks = {}, {}, {}
        for m, x in inputs.items():
            for out, part in zip((emb, tokens, masks),
                                 self.encode_modality(m, x, return_tokens=return_tokens)):
                out.update(part)
        bias = None if self.logit_bias is None else self.logit_bias[...]
        return Encoded(emb, self.logit_scale[...], bias, tokens, masks)

    def __call__(self, images: jax.Array, text: jax.Array, *, return_tokens: bool = False):
        return self.encode_all({"image": images, "text": text}, return_tokens=return_tokens)
