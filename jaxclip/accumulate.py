"""Exact contrastive gradient accumulation (GradCache, Gao et al. 2021) for `train.microbatches`.

A contrastive loss couples every row of the global batch with every other, so averaging the
gradients of k smaller losses is not the gradient of the big one: each micro-batch would see only
its own negatives. GradCache gets the exact gradient of the full batch with the activation memory
of one micro-batch, in three passes:

  1. embed: every micro-batch runs forward only (under `lax.scan`), keeping nothing but its
     L2-normalised embeddings, O(B x E) for the whole batch;
  2. loss: the objective runs once on the full embedding batch, with every negative, and its
     gradient with respect to the embeddings (and to logit_scale / logit_bias, which the loss
     reads directly) is taken;
  3. backward: each micro-batch runs forward again inside `jax.vjp`, and the vjp pulls its slice
     of the embedding gradient back to the parameters; a `lax.scan` sums these into a float32
     accumulator laid out like the parameters.

The parameter gradient is the sum of (3) over micro-batches plus the logit_scale / logit_bias
gradient of (2): the loss is the only consumer of those scalars (the towers read logit_scale only
to find the mesh, never its value), so the per-micro-batch vjps are given a zero cotangent for
them and the loss pass's cotangent is pulled back once through `params -> (scale, bias)`.

Micro-batches never move data between devices. With the batch split over ("data", "fsdp") into
n contiguous blocks of b rows, micro-batch j takes rows [j*b/k, (j+1)*b/k) of every block:
(B, ...) -> (n, k, b/k, ...) -> (k, n, b/k, ...) -> (k, n*b/k, ...), each device keeping its own
rows. The embeddings are put back in the original row order before the loss, so the loss sees
exactly the arrays (values and layout) the single-pass step gives it: no permutation-invariance
argument is needed, ring or all_gather alike.

A tower whose parameters (tower and head) are all frozen is not run in pass 3 at all. A locked
tower with a trainable head is run forward again (its output is under stop_gradient, so no
backward goes through it) because the head needs its features.

Randomness: the models have no dropout or other random layers (jaxclip.models.heads says so), so
both passes are the same deterministic function; no key needs to be threaded. A model that gains
dropout must pass the same key to passes 1 and 3 for each micro-batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import config, tree
from jaxclip.models import towers
from jaxclip.models.two_tower import Encoded
from jaxclip.sharding import BATCH_AXES

__all__ = ["check_microbatches", "forward", "loss_and_grads"]

# Top-level parameter subtrees whose values reach each tower's embeddings (TwoTower's layout).
_TOWER_PARAMS = {m: (m, f"{m}_head") for m in towers.MODALITIES}
_TOWER_PARAMS["image"] += ("view_head",)  # the image views' projection (image-image terms)


def check_microbatches(global_batch: int, batch_divisor: int, k: int) -> None:
    """Raises ConfigError unless k micro-batches split every device's rows evenly."""
    if k < 1:
        raise config.ConfigError(f"config key 'train.microbatches' must be >= 1, got {k}")
    per_device = global_batch // batch_divisor
    if per_device % k:
        raise config.ConfigError(
            f"train.microbatches={k} does not divide the per-device batch {per_device} "
            f"(train.batch_size={global_batch} / {batch_divisor} devices of data x fsdp)")


def _batch_shards(mesh) -> int:
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _constrain(x: jax.Array, mesh, dim: int) -> jax.Array:
    """x with dimension `dim` split over the batch axes (a no-op without a mesh)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[dim] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _split(x: jax.Array, n: int, k: int, mesh) -> jax.Array:
    """(B, ...) -> (k, B/k, ...): micro-batch j is rows [j*b/k, (j+1)*b/k) of each of the n
    device blocks, so slicing it out keeps every row on the device that holds it."""
    m = x.shape[0] // (n * k)
    x = _constrain(x.reshape((n, k, m, *x.shape[1:])), mesh, 0)
    x = _constrain(jnp.swapaxes(x, 0, 1), mesh, 1)
    return _constrain(x.reshape((k, n * m, *x.shape[3:])), mesh, 1)


def _join(y: jax.Array, n: int, k: int, mesh) -> jax.Array:
    """The inverse of `_split`: (k, B/k, ...) back to (B, ...) in the original row order."""
    m = y.shape[1] // n
    y = _constrain(y.reshape((k, n, m, *y.shape[2:])), mesh, 1)
    y = _constrain(jnp.swapaxes(y, 0, 1), mesh, 0)
    return _constrain(y.reshape((n * k * m, *y.shape[3:])), mesh, 0)


def _trainable(params: dict, tower: str) -> bool:
    return bool(jax.tree.leaves({k: params[k] for k in _TOWER_PARAMS[tower] if k in params}))


def forward(encode, inputs: dict, microbatches: int, mesh=None):
    """encode(inputs) for a batch that is run `microbatches` rows-blocks at a time.

    encode maps a dict of (b, ...) batch arrays to a pytree of (b, ...) arrays; nothing is
    differentiated, so each micro-batch's activations die with its scan iteration and only the
    outputs, stacked and put back in the original row order, are kept. Micro-batches follow the
    mesh's batch split, as in `loss_and_grads`. Also runs a frozen teacher (jaxclip/teacher.py)."""
    k = int(microbatches)
    if k == 1:
        return encode(inputs)
    n = _batch_shards(mesh)
    xs = {m: _split(x, n, k, mesh) for m, x in inputs.items()}

    def step(_, x):
        return None, jax.tree.map(lambda a: _constrain(a, mesh, 0), encode(x))

    _, out = jax.lax.scan(step, None, xs)
    return jax.tree.map(lambda y: _join(y, n, k, mesh), out)


def loss_and_grads(graphdef, params: dict, frozen: dict, images: jax.Array, text: jax.Array,
                   objective, microbatches: int, *, return_tokens: bool = False, mesh=None,
                   grad_shardings=None):
    """The loss and its exact gradient over the whole batch, with activations of one micro-batch.

    Returns ((loss, (metrics, logit_scale, logit_bias)), grads), as
    `jax.value_and_grad(loss_fn, has_aux=True)(params)` does in `train.make_train_step`.

    graphdef: the model's graph definition; params / frozen: trainable and frozen pure dicts;
    images: normalised pixels (B, H, W, 3), or (B, V, H, W, 3) with V views of each image;
    text: tokens (B, T); objective: enc -> (loss, metrics) (`losses.objective_over_mesh`).
    mesh: the step's mesh, whose ("data", "fsdp") split of the batch the micro-batches follow
    (None: one shard, e.g. a single device).
    grad_shardings: optional shardings of `params`, pinned on the float32 accumulator.
    """
    k = int(microbatches)
    n = _batch_shards(mesh)
    batch = images.shape[0]
    if k < 1 or batch % (n * k):
        raise ValueError(f"{k} micro-batches do not split the batch of {batch} rows evenly over "
                         f"{n} batch shards")

    def model_of(p):
        return nnx.merge(graphdef, tree.merge(p, frozen))

    def scalars(p):
        model = model_of(p)
        bias = None if model.logit_bias is None else model.logit_bias[...]
        return model.logit_scale[...], bias

    inputs = {"image": images, "text": text}

    # Pass 1: embeddings only (`forward`: each micro-batch's activations die with its scan
    # iteration). Kept per modality: what each tower's inputs give ({key: embeddings}, {key:
    # tokens}, {key: masks}; image views add "image_views"), so that pass 3 can hand every tower
    # the cotangents of all its outputs.
    def embed(x):
        model = model_of(params)
        return {m: model.encode_modality(m, x[m], return_tokens=return_tokens) for m in x}

    parts = forward(embed, inputs, k, mesh)
    scale, bias = scalars(params)

    # Pass 2: the objective once over the whole batch. The mask (bool) is not differentiable,
    # so it rides along as a constant.
    emb, tokens, masks = ({key: v for part in parts.values() for key, v in part[i].items()}
                          for i in range(3))
    diff = Encoded(emb, scale, bias, tokens)

    def loss_of(d):
        return objective(dataclasses.replace(d, masks=masks))

    (loss, metrics), g_enc = jax.value_and_grad(loss_of, has_aux=True)(diff)

    # The scalars' gradient comes from the loss alone (see the module docstring).
    _, pull_scalars = jax.vjp(scalars, params)
    (grads,) = pull_scalars((g_enc.logit_scale, g_enc.logit_bias))

    trained = [m for m in inputs if _trainable(params, m)]
    if trained:
        xs = {m: _split(x, n, k, mesh) for m, x in inputs.items()}
        cot = {m: ({key: g_enc.emb[key] for key in parts[m][0]},
                   {key: g_enc.tokens[key] for key in parts[m][1]}) for m in trained}
        grads = _backward(model_of, params, xs, cot, n, k, mesh, return_tokens, grad_shardings,
                          grads)
    return (loss, (metrics, scale, bias)), grads


def _backward(model_of, params, xs, cot, n, k, mesh, return_tokens, grad_shardings, grads):
    """Pass 3: per micro-batch, re-embed the trainable towers (the modalities of `cot`, the
    loss's gradient of their outputs) inside `jax.vjp` and pull it back to the parameters,
    summed in float32."""
    cot = jax.tree.map(lambda g: _split(g, n, k, mesh), cot)

    def towers_of(p, inputs):
        model = model_of(p)
        return {m: model.encode_modality(m, inputs[m], return_tokens=return_tokens)[:2]
                for m in cot}

    def pin(acc):
        if grad_shardings is None:
            return acc
        return jax.tree.map(jax.lax.with_sharding_constraint, acc, grad_shardings)

    def step(acc, x):
        inputs, g = x
        _, pull = jax.vjp(lambda p: towers_of(p, inputs), params)
        (g_params,) = pull(g)
        return pin(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g_params)), None

    # The accumulator starts from the scalars' gradient (zero for every tower parameter).
    acc = pin(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
    acc, _ = jax.lax.scan(step, acc, (xs, cot))
    return jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
