"""The optimizer: AdamW with warmup + cosine, global-norm clipping, parameter groups by regex.

Defaults are open_clip's (lr 5e-4, betas 0.9/0.98, eps 1e-6, wd 0.2). Parameter groups are regexes
over slash paths ("text/blocks/mlp/fc1/kernel"):
  optim.frozen     not trained at all: split off before differentiation, so no gradient is
                   computed and no optimizer state exists for them (a locked tower, LiT);
  optim.no_decay   no weight decay (biases, norm scales, position tables, logit scale/bias);
                   parameters with fewer than 2 dimensions never decay either;
  optim.lr_mults   {regex: multiplier} of the learning rate; the first matching regex wins.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from jaxclip import tree


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


def lr_multipliers(params: dict, optim_cfg) -> dict | None:
    rules = list(optim_cfg.lr_mults.items())
    if not rules:
        return None
    def mult(path, _):
        for pattern, m in rules:
            if re.search(pattern, path):
                return float(m)
        return 1.0

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
