"""A model laid out on a mesh, its parameters, and its compiled encoders.

Everything that runs a model gets it here: the trainer (which adds the optimizer), the
evaluators, `jaxclip eval`, export and `jaxclip.load`. None of them needs the trainer.

    lay = runtime.layout(cfg)                  # graph definition, logical axes, shardings
    params = runtime.init_params(lay)          # fresh, created sharded (no unsharded copy)
    cfg, params, step = runtime.restore(workdir)   # a checkpoint's parameters, optimizer unread
    params = runtime.place_params(tree, lay)   # any full parameter tree, checked and placed
    encode_image, encode_text = runtime.encoders(lay)   # compiled once per layout
    image_tokens, text_tokens = runtime.token_encoders(lay)   # per-token features (FILIP)
    encode_pixels, encode_tokens = runtime.local_encoders(cfg.model)   # jaxclip.load's
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxclip import checkpoint, config, optim, sharding, tree
from jaxclip.data.images import normalize_images
from jaxclip.losses.tokenwise import pack_token_sets
from jaxclip.models import TwoTower, build_model


# Hashed by identity: a layout is the cache key of its compiled encoders.
@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """What a model is on a mesh, before any parameter exists."""

    cfg: Any
    mesh: jax.sharding.Mesh
    graphdef: Any  # nnx graph definition: `nnx.merge(graphdef, params)` is the model
    axes: dict  # parameter path -> logical axis names
    param_shardings: dict  # full parameter tree of NamedShardings
    abstract_params: dict  # full parameter tree of sharded ShapeDtypeStructs


def layout(cfg, mesh=None) -> Layout:
    """The model `cfg.model` describes, laid out on `mesh` (default: the config's mesh)."""
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, cfg.seed))
    graphdef, abstract = nnx.split(abstract_model)
    abstract = nnx.to_pure_dict(abstract)
    axes = sharding.param_axes(abstract_model)
    shardings = sharding.param_shardings(abstract, axes, mesh)
    sharding.check_sharded(abstract, shardings, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return Layout(cfg, mesh, graphdef, axes, shardings, abstract)


def fresh_params(cfg) -> dict:
    """The initial parameters of `cfg.model` as a pure dict (call it inside `jax.jit` to get
    them sharded: see `init_params`)."""
    return nnx.to_pure_dict(nnx.state(build_model(cfg.model, cfg.seed)))


def init_params(lay: Layout) -> dict:
    """Fresh parameters, each created directly in its sharding."""
    with jax.set_mesh(lay.mesh):
        return jax.jit(lambda: fresh_params(lay.cfg), out_shardings=lay.param_shardings)()


def place_params(params, lay: Layout) -> dict:
    """A full parameter tree (numpy or jax arrays) placed with the layout's shardings.

    The tree must hold exactly the layout's parameters with its shapes; a mismatch is an error
    naming the offending paths.
    """
    want = tree.flatten(lay.abstract_params)
    got = tree.flatten(params)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"parameter tree does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}")
    bad = [f"{k}: {tuple(np.shape(got[k]))} != {want[k].shape}" for k in sorted(got)
           if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"parameter shapes do not match the model: {bad[:8]}")
    return jax.device_put(tree.unflatten(got), lay.param_shardings)


@functools.lru_cache(maxsize=4)
def encoders(lay: Layout) -> tuple[Callable, Callable]:
    """Jitted (params, uint8 images (B, H, W, 3)) -> embeddings and (params, int32 tokens) ->
    embeddings, batch-sharded over the layout's mesh; images are normalised on the device.

    Cached per layout (the cache holds it, so an identity cannot be reused while cached):
    building evaluators again for the same layout does not recompile."""
    cfg = lay.cfg
    batch_sh = sharding.batch_sharding(lay.mesh)

    def encode_image(params, images):
        model = nnx.merge(lay.graphdef, params)
        return model.encode_image(normalize_images(images, cfg.data.mean, cfg.data.std))[0]

    def encode_text(params, text):
        return nnx.merge(lay.graphdef, params).encode_text(text)[0]

    kw = dict(in_shardings=(lay.param_shardings, batch_sh), out_shardings=batch_sh)
    return jax.jit(encode_image, **kw), jax.jit(encode_text, **kw)


@functools.lru_cache(maxsize=4)
def token_encoders(lay: Layout) -> tuple[Callable, Callable]:
    """As `encoders`, but each returns the input's token features (image: patch tokens, text:
    word tokens), L2-normalised per token, packed with their mask as (B, T, D + 1) token sets
    (`losses.tokenwise.pack_token_sets`): what late-interaction (FILIP) retrieval scores."""
    cfg = lay.cfg
    batch_sh = sharding.batch_sharding(lay.mesh)

    def encode(modality, params, inputs):
        if modality == "image":
            inputs = normalize_images(inputs, cfg.data.mean, cfg.data.std)
        _, tokens, mask = nnx.merge(lay.graphdef, params).encode(modality, inputs,
                                                                 return_tokens=True)
        return pack_token_sets(tokens, mask)

    kw = dict(in_shardings=(lay.param_shardings, batch_sh), out_shardings=batch_sh)
    return (jax.jit(functools.partial(encode, "image"), **kw),
            jax.jit(functools.partial(encode, "text"), **kw))


def local_encoders(model_cfg) -> tuple[Callable, Callable]:
    """Jitted (params, float pixels) -> embeddings and (params, int32 tokens) -> embeddings on
    the default device, for `jaxclip.load`. Every checkpoint of one architecture shares them:
    initial values and lock flags do not change the forward pass, so they are not in the key."""
    key = model_cfg.to_dict()
    key.update(logit_scale_init=0.0,
               logit_bias_init=None if key["logit_bias_init"] is None else 0.0)
    key["image"]["locked"] = key["text"]["locked"] = False
    return _local_encoders(json.dumps(key, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _local_encoders(model_json: str) -> tuple[Callable, Callable]:
    model_cfg = config.from_dict({"model": json.loads(model_json)}).model
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: TwoTower(model_cfg, rngs=None)))

    def encode_pixels(params, pixels):
        return nnx.merge(graphdef, params).encode_image(pixels)[0]

    def encode_tokens(params, tokens):
        return nnx.merge(graphdef, params).encode_text(tokens)[0]

    return jax.jit(encode_pixels), jax.jit(encode_tokens)


def restore(workdir: str, step: int | None = None, mesh=None, *,
            make_config: Callable[[config.ConfigDict], config.ConfigDict] | None = None,
            mesh_from_config: bool = False) -> tuple[config.ConfigDict, dict, int]:
    """(config, full parameter tree of sharded jax arrays, step) of a workdir checkpoint: the
    newest intact one, or exactly `step`.

    The config is the one stored in that checkpoint (what its weights were trained with),
    passed through `make_config` when given (evaluation swaps in its own evaluators and mesh
    there). The parameters are placed on `mesh`, the config's mesh with `mesh_from_config`,
    else FSDP over every device (of every host, under jax.distributed). Only the `params` and
    `frozen` entries of the checkpoint's state are read (Orbax partial restore): the optimizer
    state, twice the parameters for Adam, costs neither I/O nor memory. A damaged newest
    checkpoint is skipped with a warning, as the trainer does, but nothing in the workdir is
    moved or written.
    """
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint under checkpoints/")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; available: {steps}")
    for s in [step] if step is not None else list(reversed(steps)):
        try:
            cfg = checkpoint.load_config(workdir, s)
            cfg = make_config(cfg) if make_config is not None else cfg
            if mesh_from_config:
                mesh = sharding.make_mesh(cfg.mesh)
            lay = layout(cfg, mesh or sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
            # The checkpoint stores trainable and locked parameters as two state entries.
            trainable, frozen = optim.split_trainable(lay.abstract_params, cfg)
            restored, s = checkpoint.read_params(workdir, {"params": trainable, "frozen": frozen},
                                                 s)
        except checkpoint.CheckpointDamagedError as e:
            if step is not None or s == steps[0]:
                raise
            logging.warning("%s; trying the previous checkpoint", e)
            continue
        return cfg, tree.merge(restored["params"], restored["frozen"]), s
    raise checkpoint.CheckpointDamagedError(f"{workdir}: none of the checkpoints {steps} can "
                                            "be read")



def to_host(x) -> np.ndarray:
    """One (possibly sharded, possibly multi-host) array as a host numpy array: a local copy
    when it is fully addressable, else an all-gather of that one array across processes (so an
    export's largest host allocation is one tensor, not the model)."""
    if isinstance(x, np.ndarray):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
