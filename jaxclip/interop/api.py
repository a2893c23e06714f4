"""`jaxclip.load(PATH)`: a pretrained dual encoder that turns images and texts into embeddings.

    model = jaxclip.load("runs/demo")            # a workdir (newest checkpoint, or step=N)
    model = jaxclip.load("converted/")           # `jaxclip convert` output, or an exported
                                                 # HF CLIPModel dir, or an open_clip dir
    img = model.embed_images(list_of_pil_or_uint8_arrays)      # (N, E) float32, L2-normalised
    txt = model.embed_texts(["a photo of a cat", ...])         # (M, E)
    scores = img @ txt.T

The two halves are available separately: `preprocess` (uint8 HWC images -> float32 NHWC pixels,
with the checkpoint's own resize/crop and mean/std) then `encode_image`; `tokenize` (the
checkpoint's own tokenizer and context length) then `encode_text`. Encoding runs in fixed-size
chunks (`batch_size`, the last one padded), so a corpus of any size compiles once per chunk shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip import config, runtime, tree
from jaxclip.interop import sources


class Encoder:
    """A loaded model: parameters on the default device, jitted encoders, preprocessing."""

    def __init__(self, cfg: config.ConfigDict, params: dict[str, np.ndarray], *, source: str = "",
                 dtype: str | None = None):
        cfg = config.from_dict(cfg.to_dict())
        if dtype is not None:
            cfg.model.dtype = dtype
        if cfg.model.attn_impl != "xla" and jax.default_backend() != "gpu":
            cfg.model.attn_impl = "xla"  # cuDNN attention exists only on GPUs
        cfg.model.remat = "none"
        sources.check_params(params, cfg.model, what=source or "checkpoint")
        self.config = cfg
        self.source = source
        self._params = jax.device_put(tree.unflatten({p: np.asarray(v) for p, v in params.items()}))
        # Shared by every checkpoint of this architecture: loading another does not recompile.
        self._image, self._text = runtime.local_encoders(cfg.model)
        self._tokenizer = None

    @property
    def image_size(self) -> int:
        return self.config.model.image.image_size

    @property
    def context_length(self) -> int:
        return self.config.model.text.context_length

    @property
    def logit_scale(self) -> float:
        """The stored (log-space) scale; similarities are multiplied by exp(logit_scale)."""
        return float(self._params["logit_scale"])

    def _chunks(self, fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
        n = len(x)
        if n == 0:
            return np.zeros((0, self.config.model.embed_dim), np.float32)
        size = min(batch_size, n)
        out = []
        for start in range(0, n, size):
            part = x[start:start + size]
            if len(part) < size:  # repeat the last row: one compiled shape for the whole corpus
                part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
            out.append(np.asarray(fn(self._params, jnp.asarray(part)))[:n - start])
        return np.concatenate(out)

    def encode_image(self, pixels, batch_size: int = 256) -> np.ndarray:
        """float32 (N, S, S, 3) preprocessed pixels -> (N, E) L2-normalised embeddings."""
        pixels = np.asarray(pixels)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"encode_image expects (N, {s}, {s}, 3) pixels, got {pixels.shape}")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"encode_image expects normalised float pixels, got {pixels.dtype} "
                             "(run preprocess() on uint8 images first)")
        return self._chunks(self._image, pixels.astype(np.float32), batch_size)

    def encode_text(self, tokens, batch_size: int = 256) -> np.ndarray:
        """int (N, T) token ids, T <= context_length -> (N, E) L2-normalised embeddings."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"encode_text expects (N, T) integer token ids, got {tokens.shape} "
                             f"{tokens.dtype}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"token rows of length {tokens.shape[1]} exceed the context length "
                             f"{self.context_length}")
        return self._chunks(self._text, tokens.astype(np.int32), batch_size)

    def preprocess(self, images) -> np.ndarray:
        """Images -> float32 (N, S, S, 3): shorter side resized to S (bicubic), centre crop,
        the checkpoint's mean/std. Takes a uint8 (H, W, 3) or (N, H, W, 3) array, a PIL image,
        or a list of PIL images / uint8 arrays (any sizes; grayscale and RGBA become RGB)."""
        from PIL import Image

        from jaxclip.data.images import normalize_images, resize_center

        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray | Image.Image):
            images = [images]
        out = np.empty((len(images), self.image_size, self.image_size, 3), np.uint8)
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                if img.dtype != np.uint8:
                    raise ValueError(f"preprocess expects uint8 images, got {img.dtype}")
                img = Image.fromarray(img)
            out[i] = np.asarray(resize_center(img.convert("RGB"), self.image_size))
        # The trainer's own normalisation (it runs on the device there, on the host here).
        return np.asarray(normalize_images(out, self.config.data.mean, self.config.data.std))

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """Texts -> int32 (N, context_length) ids with the checkpoint's tokenizer."""
        if self._tokenizer is None:
            from jaxclip.tokenizer import build_tokenizer

            spec = dict(self.config.data.tokenizer)
            spec["context_length"] = self.context_length
            self._tokenizer = build_tokenizer(spec)
        return self._tokenizer(texts)

    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        return self.encode_image(self.preprocess(images), batch_size)

    def embed_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.encode_text(self.tokenize(texts), batch_size)


def load(path: str, *, step: int | None = None, dtype: str | None = None) -> Encoder:
    """A model from a workdir, a converted params dir, or a HF CLIPModel / open_clip dir.

    `step` picks a workdir checkpoint (default: the newest); `dtype` overrides the compute
    dtype the checkpoint was trained with (e.g. "float32" on a CPU).
    """
    pre = sources.read(path, step=step)
    return Encoder(pre.cfg, pre.params, source=f"{path} ({pre.kind})", dtype=dtype)
