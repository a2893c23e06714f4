"""Images: decoding, crop boxes and resizing on the host, and pixel normalisation on device.

Two preprocessing paths share this module. Evaluation decodes with Pillow (`decode_image`,
`resize_center`): the reference CLIP models were scored with Pillow's antialiased bicubic.
Training decodes with OpenCV (`decode_array`, `decode_for_box`, `crop_resize`) and picks its
crop box first (`center_box`, `random_resized_box`), so a large JPEG is decoded only at the scale
the box needs (`jpeg_dims` reads its size from the header). Both hand uint8 pixels on; they become
normalised floats on device (`normalize_images`), a quarter of the host-to-device transfer.
"""

from __future__ import annotations

import io

import cv2
import jax.numpy as jnp
import numpy as np
from PIL import Image


def decode_image(data: bytes) -> Image.Image:
    """Evaluation-time decode (Pillow), paired with `resize_center`."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img.width, img.height))  # lets JPEG decode straight to RGB
    return img.convert("RGB")


def resize_center(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then centre-crop to size x size.

    Evaluation and `embed_images` use this: Pillow's antialiased bicubic is the preprocessing
    the reference CLIP models (open_clip, HF `CLIPImageProcessor`) were trained and scored with.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# Training decodes and resizes with OpenCV: libjpeg-turbo plus SIMD resampling make decode + crop
# + resize about 2.5x faster per core than Pillow's, which is what keeps the loader near the raw
# decode rate (docs/benchmarks.md). Parallelism comes from loader processes, not OpenCV threads.
cv2.setNumThreads(1)
_BGR = not hasattr(cv2, "IMREAD_COLOR_RGB")  # OpenCV < 4.10 decodes colour only as BGR
_IMREAD = (cv2.IMREAD_COLOR if _BGR else cv2.IMREAD_COLOR_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def decode_array(data: bytes) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8 RGB. OpenCV first; Pillow for formats it lacks (GIF)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD)
    if arr is None:
        return np.asarray(decode_image(data), np.uint8)
    return np.ascontiguousarray(arr[..., ::-1]) if _BGR else arr


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))


def jpeg_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, or None for anything else.

    A few microseconds of header walking (Pillow's lazy open costs about ten times more, which
    showed as 8% of the loader's time on 256 px images).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9],
                                                                           "big")
            return (w, h) if w and h else None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_for_box(data: bytes, box: tuple[int, int, int, int], size: int
                   ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decodes just enough of the image to cut `box` out at `size` pixels.

    A JPEG whose box is at least 2x the output is decoded at 1/2, 1/4 or 1/8 scale inside
    libjpeg (the DCT does the downscaling, antialiased, at a fraction of the cost: 1/2 halves
    the decode time of an 800 x 600 photo). Returns the pixels and the box in their coordinates.
    """
    side = min(box[2] - box[0], box[3] - box[1])
    if data[:2] == b"\xff\xd8":  # JPEG
        for factor, flag in _REDUCED:
            if side >= factor * size:
                arr = cv2.imdecode(np.frombuffer(data, np.uint8),
                                   flag | cv2.IMREAD_IGNORE_ORIENTATION)
                if arr is None:
                    break
                h, w = arr.shape[:2]
                x0, y0 = min(box[0] // factor, w - 1), min(box[1] // factor, h - 1)
                x1, y1 = -(-box[2] // factor), -(-box[3] // factor)  # ceil
                return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), (x0, y0, min(x1, w), min(y1, h))
    return decode_array(data), box


def crop_resize(arr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop `box` (x0, y0, x1, y1) and resize it to size x size.

    Bicubic without antialiasing down to half size (as TF's resize in big_vision's inception
    crop); area averaging beyond that, where skipping antialiasing would alias visibly.
    """
    x0, y0, x1, y1 = box
    crop = arr[y0:y1, x0:x1]
    if crop.shape[:2] == (size, size):
        return np.ascontiguousarray(crop)
    shrink = min(crop.shape[0], crop.shape[1]) / size
    interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


def center_box(w: int, h: int) -> tuple[int, int, int, int]:
    """The largest centred square: resize-shorter-side-then-centre-crop as one crop + resize."""
    side = min(w, h)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return x0, y0, x0 + side, y0 + side


def random_resized_box(w: int, h: int, rng: np.random.Generator, scale=(0.9, 1.0),
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box: random area fraction and aspect ratio; the first of ten draws
    that fits (all ten drawn at once: a Python loop of scalar draws cost 7% of the loader), else
    the centre square."""
    target = w * h * rng.uniform(scale[0], scale[1], 10)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), 10))
    cw = np.round(np.sqrt(target * aspect)).astype(int)
    ch = np.round(np.sqrt(target / aspect)).astype(int)
    fits = np.flatnonzero((cw > 0) & (cw <= w) & (ch > 0) & (ch <= h))
    if not fits.size:
        return center_box(w, h)
    cw, ch = int(cw[fits[0]]), int(ch[fits[0]])
    x0, y0 = rng.integers(0, (w - cw + 1, h - ch + 1))
    return int(x0), int(y0), int(x0) + cw, int(y0) + ch


def normalize_images(images: jnp.ndarray, mean, std) -> jnp.ndarray:
    """uint8 (B, H, W, 3) -> float32 normalised pixels, on device."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std
