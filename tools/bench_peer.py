"""Training throughput of jaxclip against open_clip (PyTorch) on the same model, batch and update.

    python tools/bench_peer.py                                  # configs/bench_tiny.py, batch 64
    python tools/bench_peer.py --rounds 7 --steps 10 --batch 128
    python tools/bench_peer.py --config.model.image.depth=2     # overrides as in training

Both libraries build the model of the jaxclip `--config` (default configs/bench_tiny.py): a
ViT image tower pooled at its class token and a causal CLIP text tower pooled at the end-of-text
token, exact GELU, float32. Both train it with the softmax CLIP loss and AdamW (the config's lr,
betas, eps and weight decay on the same parameters: matrices, not biases, norms, position
embeddings or the class token), and open_clip's step clamps the logit scale as jaxclip's does.
Both see the same batch (images as uint8, normalised inside jaxclip's step and once beforehand for
torch; the same token rows with EOT and zero padding).

The two are timed in alternating rounds (--rounds x --steps steps each, after --warmup steps and
jaxclip's compilation), so both see the same background load on a shared machine; reported are
the medians of the per-round samples/s and their ratio jaxclip / open_clip, as one JSON line,
with the machine and library versions.

PyTorch and open_clip are needed only here (the parity test environment has them); jaxclip
never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _import_open_clip():
    """open_clip, with the parity tests' fix for a CUDA torchvision next to CPU torch."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from tests import torch_shim

        torch_shim._import_torchvision()
        import open_clip
        import torch
    except ImportError as e:
        raise SystemExit(f"bench_peer needs torch and open_clip (the parity test environment, "
                         f"tests/requirements-parity.txt): {e}") from None
    return torch, open_clip


def _check_comparable(cfg) -> None:
    img, txt = cfg.model.image, cfg.model.text
    same = (img.pool == "cls" and img.class_token and img.head == "none" and txt.kind == "clip"
            and txt.head == "none" and txt.pool == "eot" and txt.causal and not txt.proj_bias
            and img.act == txt.act and cfg.loss.name == "clip" and cfg.model.logit_bias_init is None
            and cfg.optim.grad_clip == 0 and not cfg.optim.lr_mults and cfg.train.microbatches == 1)
    if not same:
        raise SystemExit("bench_peer: the config must be a plain CLIP (cls/eot pooling, own "
                         "projections, clip loss, no grad clipping, no lr multipliers) that "
                         "open_clip builds the same way")


def open_clip_model(open_clip, cfg):
    img, txt = cfg.model.image, cfg.model.text
    vision = open_clip.CLIPVisionCfg(layers=img.depth, width=img.width,
                                     head_width=img.width // img.heads, mlp_ratio=img.mlp_ratio,
                                     patch_size=img.patch_size, image_size=img.image_size,
                                     norm_kwargs=dict(eps=img.ln_eps))
    text = open_clip.CLIPTextCfg(context_length=txt.context_length, vocab_size=txt.vocab_size,
                                 width=txt.width, heads=txt.heads, layers=txt.depth,
                                 mlp_ratio=txt.mlp_ratio, pad_id=txt.pad_id,
                                 norm_kwargs=dict(eps=txt.ln_eps))
    return open_clip.CLIP(cfg.model.embed_dim, vision, text,
                          quick_gelu=img.act == "quick_gelu")


def _torch_step(torch, open_clip, cfg, images, tokens):
    """A closure running one open_clip training step (open_clip's own train loop, minus AMP)."""
    model = open_clip_model(open_clip, cfg).train()
    o = cfg.optim
    # jaxclip's decay mask (optim.decay_mask) in open_clip's parameter names.
    no_decay = ("positional_embedding", "class_embedding", "logit_scale")
    decay, rest = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and not name.endswith(no_decay) else rest).append(param)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.wd},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    loss_fn = open_clip.ClipLoss()
    scale_max = cfg.loss.scale_max

    def step():
        image_features, text_features, scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scale_max is not None:  # jaxclip clamps the log-scale after every update too
            with torch.no_grad():
                model.logit_scale.clamp_(0, scale_max)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default_cfg = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                               "bench_tiny.py")
    p.add_argument("--config", default=default_cfg, help="jaxclip experiment config")
    p.add_argument("--batch", type=int, default=64, help="global batch size")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per round and library")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, the physical cores)")
    args, extra = p.parse_known_args(argv)

    torch, open_clip = _import_open_clip()
    import jax
    import numpy as np

    from jaxclip import cli, config, flops, sharding, train
    from jaxclip.data.images import normalize_images

    try:
        overrides = [*cli._split_overrides(extra), f"train.batch_size={args.batch}"]
        cfg = config.load(args.config, overrides)
    except (config.ConfigError, FileNotFoundError, KeyError) as e:
        raise SystemExit(f"bench_peer: bad config: {e}") from None
    _check_comparable(cfg)
    if args.threads:
        torch.set_num_threads(args.threads)

    B, size, ctx = args.batch, cfg.model.image.image_size, cfg.model.text.context_length
    rng = np.random.default_rng(0)
    images_u8 = rng.integers(0, 256, (B, size, size, 3), dtype=np.uint8)
    tokens = np.zeros((B, ctx), np.int32)
    for i, n in enumerate(rng.integers(2, ctx + 1, B)):  # SOT-like body, EOT, zero padding
        tokens[i, :n - 1] = rng.integers(1, cfg.model.text.eot_id, n - 1)
        tokens[i, n - 1] = cfg.model.text.eot_id

    # jaxclip: the trainer's own step, compiled ahead of time, batch placed once.
    m = train.build(cfg)
    if B % sharding.batch_divisor(m.mesh):
        raise SystemExit(f"bench_peer: --batch {B} does not divide over the mesh's batch axes")
    state = train.init_state(m)
    t0 = time.perf_counter()
    jstep = train.make_train_step(m).lower(m.abstract_state,
                                           train.batch_specs(cfg, m.mesh)).compile()
    compile_s = time.perf_counter() - t0
    jbatch = sharding.global_batch({"image": images_u8, "text": tokens}, m.mesh)
    n_jax = sum(x.size for x in jax.tree.leaves(state.params))

    # open_clip: NCHW float images normalised as jaxclip's step does, int64 tokens.
    pixels = np.asarray(normalize_images(images_u8, cfg.data.mean, cfg.data.std))
    timages = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    tstep, n_torch = _torch_step(torch, open_clip, cfg, timages, torch.from_numpy(tokens).long())

    def run_jax(n):
        nonlocal state
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = jstep(state, jbatch)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - t, float(metrics["loss"])

    def run_torch(n):
        t = time.perf_counter()
        for _ in range(n):
            loss = tstep()
        return time.perf_counter() - t, loss.item()

    run_jax(args.warmup)
    run_torch(args.warmup)
    jax_rates, torch_rates = [], []
    for _ in range(args.rounds):
        seconds, jloss = run_jax(args.steps)
        jax_rates.append(B * args.steps / seconds)
        seconds, tloss = run_torch(args.steps)
        torch_rates.append(B * args.steps / seconds)
    if not (np.isfinite(jloss) and np.isfinite(tloss)):
        raise SystemExit(f"bench_peer: non-finite loss (jaxclip {jloss}, open_clip {tloss})")

    jax_med, torch_med = statistics.median(jax_rates), statistics.median(torch_rates)
    result = {
        "jaxclip_samples_per_sec": jax_med,
        "open_clip_samples_per_sec": torch_med,
        "ratio": jax_med / torch_med,
        "jaxclip_rounds": jax_rates,
        "open_clip_rounds": torch_rates,
        "batch_size": B, "rounds": args.rounds, "steps_per_round": args.steps,
        "flops_per_sample": flops.train_flops_per_sample(cfg, B),
        "params_jaxclip": int(n_jax), "params_open_clip": int(n_torch),
        "final_loss_jaxclip": jloss, "final_loss_open_clip": tloss,
        "jaxclip_compile_seconds": compile_s,
        "dtype": cfg.model.dtype, "devices": m.mesh.size,
        "device_kind": jax.devices()[0].device_kind,
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "jax": jax.__version__,
        "torch": torch.__version__, "open_clip": open_clip.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
