"""Analytic FLOP counts of a two-tower step and the peak each device could deliver (for MFU).

FLOPs count multiply-adds as 2. Counted: the patch embedding, every QKV/output/MLP projection,
attention scores and weighted values, the MAP head, both projections, and the loss's logit
matmuls as actually computed per device (two b x B matrices for softmax CLIP in all_gather form,
one for SigLIP). Causal text attention is counted in full (T x T), because the XLA kernel computes
the whole masked matrix. Norms, softmax, activations and the optimizer are not counted.
A training step costs 3 x the forward FLOPs (backward = 2 x forward), plus a distillation
teacher's forward pass when there is one.

MFU = achieved FLOP/s per device / peak FLOP/s per device. The peak is the dense datasheet figure
for the compute dtype on accelerators (bf16: H100 SXM 989 TFLOP/s, not the 1979 sparsity figure),
and on CPU a measured float32 matmul rate, reported as such.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def _transformer(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
    proj = 2 * tokens * width * width * 4  # q, k, v, out
    attn = 2 * 2 * tokens * tokens * width  # scores + weighted values
    mlp = 2 * 2 * tokens * width * int(width * mlp_ratio)
    return depth * (proj + attn + mlp)


def image_forward_flops(img, embed_dim: int) -> float:
    grid = (img.image_size // img.patch_size) ** 2
    tokens = grid + int(img.class_token)
    w = img.width
    f = 2 * grid * img.patch_size**2 * 3 * w
    f += _transformer(tokens, w, img.depth, img.mlp_ratio)
    if img.pool == "map":
        f += 2 * w * w + 2 * tokens * w * 2 * w + 2 * 2 * tokens * w + 2 * w * w  # q, kv, attn, out
        f += 2 * 2 * w * int(w * img.mlp_ratio)
    return f + 2 * w * embed_dim


def text_forward_flops(txt, embed_dim: int) -> float:
    T, w = txt.context_length, txt.width
    return _transformer(T, w, txt.depth, txt.mlp_ratio) + 2 * w * embed_dim


def loss_flops_per_sample(loss_cfg, global_batch: int, embed_dim: int) -> float:
    matrices = 1 if loss_cfg.name == "siglip" else 2
    return matrices * 2 * global_batch * embed_dim


def train_flops_per_sample(cfg, global_batch: int, teacher_model=None) -> float:
    """`teacher_model`: the model section of a distillation teacher, whose forward pass (only)
    runs in every step too."""
    m = cfg.model
    # Each of data.views crops of an image runs through the image tower (the small view head
    # is not counted).
    views = max(1, cfg.data.get("views", 1))
    fwd = views * image_forward_flops(m.image, m.embed_dim) + text_forward_flops(m.text,
                                                                                m.embed_dim)
    fwd += loss_flops_per_sample(cfg.loss, global_batch, m.embed_dim)
    teacher = 0.0
    if teacher_model is not None:
        teacher = (image_forward_flops(teacher_model.image, teacher_model.embed_dim)
                   + text_forward_flops(teacher_model.text, teacher_model.embed_dim))
    return 3 * fwd + teacher


# Dense peak FLOP/s per device by device_kind substring and compute dtype (datasheets).
_PEAKS = {
    ("H100", "bfloat16"): 989e12,
    ("H200", "bfloat16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6", "bfloat16"): 918e12,
    ("H100", "float32"): 67e12,  # non-tensor-core fp32 (XLA may use TF32, so MFU can exceed 1)
    ("A100", "float32"): 19.5e12,
}


def measure_cpu_peak(n: int = 1024, repeats: int = 8) -> float:
    """Best-of-`repeats` float32 matmul FLOP/s on the default device (for CPU MFU)."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(dtype: str, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from) for the current backend."""
    if override_tflops > 0:
        return override_tflops * 1e12, "config"
    device = jax.devices()[0]
    if device.platform == "cpu":
        # All local CPU "devices" share the same cores, so the host rate is split among them.
        return measure_cpu_peak() / jax.local_device_count(), "measured float32 matmul"
    kind = device.device_kind
    for (name, dt), peak in _PEAKS.items():
        if name in kind and dt == dtype:
            return peak, f"datasheet {name} {dt}"
    return None, f"unknown peak for {kind!r} {dtype}"
