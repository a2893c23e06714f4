"""The checks every record passes before the builder writes it.

`finish_record` holds a source's record to the record format (non-empty image bytes and
captions, a string id, integer labels) and `prepare_image` decodes the image completely with
Pillow, so a truncated or corrupt file becomes a counted `Skip` instead of a crash in the input
pipeline mid-training. Images stay byte-for-byte as the source gave them unless they are larger
than `ImageOptions.max_image_size` (shrunk, re-encoded as JPEG, or PNG when they have
transparency) or in a format other than JPEG/PNG/WebP (re-encoded as PNG).
"""

from __future__ import annotations

import collections
import dataclasses
import io

from jaxclip.data.sources.common import Record, Skip

_KEPT_FORMATS = ("JPEG", "PNG", "WEBP")
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    max_image_size: int | None = None  # longest side; larger images are shrunk and re-encoded
    jpeg_quality: int = 90


def prepare_image(data: bytes, options: ImageOptions) -> tuple[bytes, str] | Skip:
    """Decodes `data` fully; returns (bytes to store, what was done) or a Skip saying why not."""
    from PIL import Image, ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        image_format = image.format
        too_big = options.max_image_size and max(image.size) > options.max_image_size
        if too_big and image_format == "JPEG":
            # Let libjpeg decode at a reduced scale: much faster, still reads the whole stream.
            image.draft("RGB", (options.max_image_size, options.max_image_size))
        image.load()
    except Image.DecompressionBombError as e:
        return Skip("image_too_large", str(e))
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, not the input
        return Skip("undecodable_image", "not a recognised image format")
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        return Skip("undecodable_image", f"{type(e).__name__}: {e}")
    if not too_big and image_format in _KEPT_FORMATS:
        return data, ""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    image = ImageOps.exif_transpose(image)  # re-encoding drops EXIF, so apply its rotation now
    if too_big:
        size = options.max_image_size
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if has_alpha or not too_big:
        if image.mode not in _PNG_MODES:  # e.g. CMYK or float TIFFs
            image = image.convert("RGBA" if has_alpha else "RGB")
        image.save(buffer, format="PNG")
        done = "resized_png" if too_big else f"converted_{image_format or 'unknown'}_to_png"
    else:
        image = image.convert("L" if image.mode in ("1", "L") else "RGB")
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        done = "resized_jpeg"
    return buffer.getvalue(), done


def finish_record(
    record: Record, options: ImageOptions, converted: collections.Counter
) -> Record | Skip:
    """Checks a source's record against the record format and verifies/re-encodes its image."""
    where = str(record.get("id", "?"))
    if isinstance(record.get("meta"), dict) and record["meta"].get("path"):
        where += f" ({record['meta']['path']})"  # folder sources: name the file, not just a row
    image = record.get("image")
    if not isinstance(image, bytes | bytearray) or not image:
        return Skip("missing_image", where)
    captions = record.get("captions")
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        return Skip("missing_caption", where)
    labels = record.get("labels") or {}
    if not all(isinstance(k, str) and type(v) is int for k, v in labels.items()):
        return Skip("invalid_label", f"{where}: {labels!r}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        return Skip("missing_id", repr(record.get("id")))
    prepared = prepare_image(bytes(image), options)
    if isinstance(prepared, Skip):
        return Skip(prepared.reason, f"{where}: {prepared.detail}")
    data, done = prepared
    if done:
        converted[done] += 1
    return {**record, "image": data}
