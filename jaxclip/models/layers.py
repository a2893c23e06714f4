"""Transformer pieces shared by the image and text towers.

Parameters carry logical axis names in their `axes` metadata ("embed", "mlp", "heads", ...); the
rules table in `jaxclip.sharding` maps those names onto mesh axes, so the model code never mentions
a mesh.

The residual blocks of a tower are stored stacked, every parameter with a leading "layers" axis.
One layout then serves both execution modes: `lax.scan` over the stack (compile time independent of
depth) and an unrolled Python loop, and a checkpoint converts one-to-one to open_clip/HF, whose
layers are just the slices of the stack. Attention kernels are kept per head,
(width, heads, head_dim), which is a plain reshape of PyTorch's (out, in) projections.

Parameters are float32; activations are computed in the tower's compute dtype (bfloat16 on
accelerators), except layer norms and softmax statistics, which run in float32.

Activations are pinned by logical name (`sharding.constrain`: batch split over data x fsdp, heads
and MLP hidden units over tensor) at every block's input and inside attention and the MLP, and
weights are cast to the compute dtype before being gathered out of their FSDP shards
(`sharding.gather_weight`). Both are no-ops without a mesh (see `sharding.activation_mesh`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxclip import sharding

Axes = tuple[str | None, ...]


# How a parameter is initialised, kept in its metadata: ("normal", std), ("zeros",) or ("ones",).
# Random values are not drawn here: `jaxclip.models.init_params` draws every normal parameter
# of a model from one random vector, because XLA:CPU takes seconds to compile each separate
# threefry call, and one call keeps the values independent of sharding.
Init = tuple


def normal(std: float) -> Init:
    return ("normal", float(std))


zeros: Init = ("zeros",)
ones: Init = ("ones",)


def param(init: Init, shape: tuple[int, ...], axes: Axes) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    value = jnp.ones(shape, jnp.float32) if init[0] == "ones" else jnp.zeros(shape, jnp.float32)
    return nnx.Param(value, axes=axes, init=init)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "gelu":  # exact erf GELU, as torch.nn.GELU (open_clip's default)
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "quick_gelu":  # OpenAI CLIP weights
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with float32 statistics whatever the activation dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, width: int, *, eps: float, layers: int | None = None):
        lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
        self.scale = param(ones, (*lead, width), (*lead_axes, "embed"))
        self.bias = param(zeros, (*lead, width), (*lead_axes, "embed"))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """y = x·W (+ b), contracting the trailing len(in_shape) dims of x with W's leading dims."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        axes: Axes,
        *,
        std: float,
        use_bias: bool = True,
        layers: int | None = None,
    ):
        lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
        self.kernel = param(normal(std), (*lead, *in_shape, *out_shape), (*lead_axes, *axes))
        if use_bias:
            bias_axes = axes[len(in_shape) :]
            self.bias = param(zeros, (*lead, *out_shape), (*lead_axes, *bias_axes))
        else:
            self.bias = None
        self.n_in = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return dense({"kernel": self.kernel[...], "bias": bias}, x, self.n_in)


def dense(p: dict, x: jax.Array, n_in: int = 1, axes: Axes | None = None) -> jax.Array:
    """`axes`: the kernel's logical axes (without "layers"); given, the kernel and bias are
    gathered from their FSDP shards after the cast to the compute dtype."""
    kernel, bias = p["kernel"], p.get("bias")
    if axes is None:
        kernel = kernel.astype(x.dtype)
        bias = None if bias is None else bias.astype(x.dtype)
    else:
        kernel = sharding.gather_weight(kernel, axes, x.dtype)
        bias = None if bias is None else sharding.gather_weight(bias, axes[n_in:], x.dtype)
    y = jnp.tensordot(x, kernel, axes=n_in)
    return y if bias is None else y + bias


class Attention(nnx.Module):
    """Multi-head attention projections, per-head kernels (width, heads, head_dim)."""

    def __init__(self, width: int, heads: int, *, std: float, out_std: float,
                 layers: int | None = None):
        hd = width // heads
        qkv = dict(std=std, layers=layers)
        self.query = Dense((width,), (heads, hd), ("embed", "heads", "kv"), **qkv)
        self.key = Dense((width,), (heads, hd), ("embed", "heads", "kv"), **qkv)
        self.value = Dense((width,), (heads, hd), ("embed", "heads", "kv"), **qkv)
        self.out = Dense((heads, hd), (width,), ("heads", "kv", "embed"), std=out_std,
                         layers=layers)


def resolve_attn_impl(impl: str, dtype, head_dim: int, backend: str | None = None) -> str:
    """The `jax.nn.dot_product_attention` implementation that `model.attn_impl` names here.

    "auto" is cuDNN's fused flash attention on NVIDIA GPUs when it can run: a half-precision
    compute dtype (cuDNN has no float32 kernel) and a head dim that is a multiple of 8 and at most
    128 (jax checks <= 256 on Hopper and later, 128 before; 128 holds on both). Anything else
    resolves to "xla", so CPU, TPU and float32 runs use the portable einsum-softmax form. The
    explicit "xla"/"cudnn" are returned as given (cuDNN then raises on shapes it cannot run).
    """
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    if backend != "gpu" or "rocm" in _platform_version(backend):
        return "xla"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def _platform_version(backend: str) -> str:
    try:
        return jax.devices(backend)[0].client.platform_version.lower()
    except (RuntimeError, AttributeError):
        return ""


def attention(
    p: dict,
    x_q: jax.Array,
    x_kv: jax.Array,
    *,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Attention of x_q over x_kv; `kv_lengths` (B,) masks right-padded keys.

    Padding is passed as per-example key lengths and causality as `is_causal`, never as a mask
    or bias array: those are the forms cuDNN's kernel takes (PADDING / CAUSAL / PADDING_CAUSAL
    masks), and XLA's path builds the same mask from them.
    """
    heads = ("act_batch", "act_length", "act_heads", "act_kv")
    qkv_axes = ("embed", "heads", "kv")
    q = sharding.constrain(dense(p["query"], x_q, axes=qkv_axes), heads)
    k = sharding.constrain(dense(p["key"], x_kv, axes=qkv_axes), heads)
    v = sharding.constrain(dense(p["value"], x_kv, axes=qkv_axes), heads)
    # Names for the remat policies (MaxText's: query_proj, key_proj, value_proj, context,
    # out_proj, mlpwi, mlpwo); a no-op outside jax.checkpoint.
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    impl = resolve_attn_impl(impl, q.dtype, q.shape[-1])
    o = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                     implementation=impl)
    o = checkpoint_name(sharding.constrain(o, heads), "context")
    out = dense(p["out"], o, n_in=2, axes=("heads", "kv", "embed"))
    return sharding.constrain(checkpoint_name(out, "out_proj"), ACT)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, std: float, out_std: float,
                 layers: int | None = None):
        self.fc1 = Dense((width,), (hidden,), ("embed", "mlp"), std=std, layers=layers)
        self.fc2 = Dense((hidden,), (width,), ("mlp", "embed"), std=out_std, layers=layers)


def mlp(p: dict, x: jax.Array, act: Callable) -> jax.Array:
    h = sharding.constrain(dense(p["fc1"], x, axes=("embed", "mlp")),
                           ("act_batch", "act_length", "act_mlp"))
    h = checkpoint_name(h, "mlpwi")
    return sharding.constrain(checkpoint_name(dense(p["fc2"], act(h), axes=("mlp", "embed")),
                                              "mlpwo"), ACT)


# A tower's token activations (B, T, width): split by batch only, whatever the weights' layout.
ACT = ("act_batch", "act_length", "act_embed")


_save = jax.checkpoint_policies.save_only_these_names

# model.remat / model.{image,text}.remat. Named policies keep the tagged activations above (per
# token: q, k, v and context are width each, out_proj width, mlpwi 4 x width) and recompute the
# rest of the block in the backward; attention probabilities (heads x T^2) are never kept by
# them. The step's scratch falls none > save_dot_except_mlp > full; save_attn_out is close to
# full (tests/test_models_remat.py).
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # MaxText's "minimal": every weight matmul's output, no batched (attention score) dots.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # MaxText's: all attention projections and the attention output, not the 4x-wide MLP.
    "save_dot_except_mlp": _save("query_proj", "key_proj", "value_proj", "context", "out_proj"),
    "save_qkv_proj": _save("query_proj", "key_proj", "value_proj"),
    # The attention output only (one width-sized tensor per block): the backward recomputes the
    # MLP and the projections but not the attention itself.
    "save_attn_out": _save("context"),
}
REMAT_CHOICES = ("none", *_REMAT_POLICIES)


def run_blocks(block: Callable[[jax.Array, dict], jax.Array], stack: nnx.Module, x: jax.Array,
               *, scan: bool, remat: str) -> jax.Array:
    """x through `block(x, p)` once per layer of `stack`, p being that layer's parameters.

    Every parameter of `stack` carries the leading "layers" axis; p is its slice, a dict of
    arrays. `scan` runs one `lax.scan` over the stack, else an unrolled loop over the slices;
    `remat` is one of REMAT_CHOICES. The block's input and output are pinned to ACT inside the
    scan/remat body, so the forward that the backward recomputes is pinned as well.
    """
    params = nnx.to_pure_dict(nnx.state(stack))

    def body(x, p):
        return sharding.constrain(block(sharding.constrain(x, ACT), p), ACT), None

    body = sharding.remat_block(body, remat, _REMAT_POLICIES, prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, x, params)[0]
    depth = jax.tree.leaves(params)[0].shape[0]
    for i in range(depth):
        x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], params))
    return x


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of x over `axis` counting only the positions where `mask` is true.

    `mask` covers x's leading dims (a (B, T) token mask for (B, T, width) features) and is
    broadcast over the rest. A row with no true position averages to 0 rather than NaN.
    """
    m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(x.dtype)
    return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1)


class Transformer(nnx.Module):
    """`depth` pre-LN residual blocks, x + attn(ln_1(x)) then x + mlp(ln_2(x)), stacked."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_ratio: float, act: str,
                 ln_eps: float):
        # CLIP's initialisation: residual-branch outputs scaled down by sqrt(2 * depth).
        attn_std = width**-0.5
        out_std = width**-0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        L = depth
        self.ln_1 = LayerNorm(width, eps=ln_eps, layers=L)
        self.attn = Attention(width, heads, std=attn_std, out_std=out_std, layers=L)
        self.ln_2 = LayerNorm(width, eps=ln_eps, layers=L)
        self.mlp = MLP(width, int(width * mlp_ratio), std=fc_std, out_std=out_std, layers=L)
        self.act = act
        self.eps = ln_eps

    def __call__(self, x: jax.Array, *, causal: bool = False, kv_lengths: jax.Array | None = None,
                 scan: bool = True, remat: str = "none", attn_impl: str = "xla") -> jax.Array:
        act = activation(self.act)
        eps = self.eps

        def block(x, p):
            y = layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], eps)
            x = x + attention(p["attn"], y, y, causal=causal, kv_lengths=kv_lengths,
                              impl=attn_impl)
            y = layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], eps)
            return x + mlp(p["mlp"], y, act)

        return run_blocks(block, self, x, scan=scan, remat=remat)
