"""The optimizer: AdamW with warmup + cosine, global-norm clipping, parameter groups by regex.

Defaults are open_clip's (lr 5e-4, betas 0.9/0.98, eps 1e-6, wd 0.2). Parameter groups are regexes
over slash paths ("text/blocks/mlp/fc1/kernel"):
  optim.frozen     not trained at all: split off before differentiation, so no gradient is
                   computed and no optimizer state exists for them (a locked tower, LiT);
  optim.no_decay   no weight decay (biases, norm scales, position tables, logit scale/bias);
                   parameters with fewer than 2 dimensions never decay either;
  optim.lr_mults   {regex: multiplier} of the learning rate; the first matching regex wins.
  optim.layer_decay  {tower: decay} layer-wise lr decay (BEiT / open_clip's layer groups): in a
                   tower of depth D the embeddings get decay^(D+1), block i decay^(D-i), and what
                   sits above the blocks (final norms, projection, pooling head) 1. Blocks are
                   stacked, so a block parameter's multiplier is a (D, 1, ...) array that
                   broadcasts along the leading layers axis. It multiplies any lr_mults factor.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import tree
from jaxclip.models import towers


def learning_rate(optim_cfg, total_steps: int) -> optax.Schedule:
    lr, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
    end = lr * optim_cfg.end_lr_frac
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr_frac)
    elif optim_cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    else:
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    # open_clip's warmup, lr·(step + 1)/warmup: step 0 already moves the parameters.
    if warmup == 1:
        ramp = optax.constant_schedule(lr)
    else:
        ramp = optax.linear_schedule(lr / warmup, lr, warmup - 1)
    return optax.join_schedules([ramp, main], [warmup])


def frozen_patterns(cfg) -> list[str]:
    """Regexes of parameters that are not trained, from optim.frozen and the towers' `locked`."""
    patterns = list(cfg.optim.frozen)
    if cfg.model.image.locked:
        patterns.append("^image/")
    if cfg.model.text.locked:
        patterns.append("^text/")
    return patterns


def split_trainable(params: dict, cfg) -> tuple[dict, dict]:
    """(trainable, frozen) parameter trees."""
    patterns = frozen_patterns(cfg)
    frozen, trainable = tree.split(params, lambda p: tree.matches(p, patterns))
    return trainable, frozen


def decay_mask(params: dict, optim_cfg) -> dict:
    return tree.map_with_path(
        lambda p, x: len(x.shape) >= 2 and not tree.matches(p, optim_cfg.no_decay), params)




def _tower_depths(params: dict, optim_cfg, embeddings) -> dict[str, int]:
    """Depth of each tower that has layer decay, read from its stacked blocks' leading axis."""
    depths = {}
    for tower, decay in optim_cfg.layer_decay.items():
        if decay == 1.0:
            continue
        blocks = [x for p, x in tree.flatten(params).items() if p.startswith(f"{tower}/blocks/")]
        if blocks:
            depths[tower] = blocks[0].shape[0]
        elif any(embeddings.match(p) for p in tree.flatten(params) if p.startswith(tower)):
            raise ValueError(f"optim.layer_decay.{tower}={decay} needs the {tower} tower's blocks "
                             "to be trained (they are frozen), to know the tower's depth")
    return depths


def lr_multipliers(params: dict, optim_cfg) -> dict | None:
    rules = list(optim_cfg.lr_mults.items())
    # Tower parameters below the first block (patch/token/position/type embeddings and their
    # norms), as each registered tower kind declares them.
    embeddings = towers.embeddings_pattern()
    depths = _tower_depths(params, optim_cfg, embeddings)
    if not rules and not depths:
        return None

    def mult(path, x):
        m = next((float(v) for pattern, v in rules if re.search(pattern, path)), 1.0)
        tower = path.split("/", 1)[0]
        if tower not in depths:
            return m
        decay, depth = float(optim_cfg.layer_decay[tower]), depths[tower]
        if path.startswith(f"{tower}/blocks/"):
            per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))
            return (m * per_layer).astype(np.float32).reshape((depth,) + (1,) * (x.ndim - 1))
        return m * decay ** (depth + 1) if embeddings.match(path) else m

    return tree.map_with_path(mult, params)


def scale_by_tree(multipliers: dict) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(optim_cfg, total_steps: int, trainable: dict) -> optax.GradientTransformation:
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps))
    if optim_cfg.wd > 0:
        # Decoupled (AdamW) decay, multiplied by the learning rate below, as in torch.optim.AdamW.
        mask = decay_mask(trainable, optim_cfg)
        parts.append(optax.add_decayed_weights(optim_cfg.wd, mask=mask))
    parts.append(optax.scale_by_learning_rate(learning_rate(optim_cfg, total_steps)))
    mults = lr_multipliers(trainable, optim_cfg)
    if mults is not None:
        parts.append(scale_by_tree(mults))
    return optax.chain(*parts)
