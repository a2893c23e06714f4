"""Reading and writing safetensors files with numpy only, one tensor at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
raw little-endian tensor bytes, contiguous. jaxclip implements it itself rather than calling the
`safetensors` package because
  * export streams: the header is written first from the tensors' shapes, then each tensor is
    computed, written and dropped, so a model never has to be materialised on one host at once
    (safetensors' `save_file` takes a complete dict);
  * bfloat16 round-trips through `ml_dtypes` (safetensors' numpy API has no bfloat16);
  * reading memory-maps the file, so a converter touches only the tensors it uses.
Tests check that files written here load with the `safetensors` package and vice versa.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


if sys.byteorder != "little":  # the format is little-endian; so is every platform jax runs on
    raise ImportError("jaxclip.interop.tensorfile supports little-endian hosts only")


def dtype_code(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors")
    return _CODES[dt]


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + n


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the file as a read-only numpy array backed by a memory map."""
    header, _, start = read_header(path)
    size = os.path.getsize(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, entry in header.items():
        code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which jaxclip cannot read")
        dt = DTYPES[code]
        if end - begin != dt.itemsize * int(np.prod(shape)) or start + end > size:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets {begin}..{end} "
                             f"for shape {shape} {code}")
        out[name] = buf[start + begin:start + end].view(dt).reshape(shape)
    return out


def write(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], object]],
          tensors: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None,
          ) -> None:
    """Writes a safetensors file whose layout is fixed up front by `specs` (name, shape, dtype).

    `tensors` then yields (name, array) in the same order, one at a time; each is checked against
    its spec and written immediately. The file appears under `path` only when complete.
    """
    specs = [(name, tuple(int(d) for d in shape), np.dtype(dt)) for name, shape, dt in specs]
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dt in specs:
        if name in header:
            raise ValueError(f"duplicate tensor name {name!r}")
        nbytes = dt.itemsize * int(np.prod(shape))
        header[name] = {"dtype": dtype_code(dt), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as in safetensors
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            it = iter(tensors)
            for name, shape, dt in specs:
                got_name, array = next(it, (None, None))
                if got_name != name:
                    raise ValueError(f"tensor stream out of order: expected {name!r}, "
                                     f"got {got_name!r}")
                array = np.asarray(array)
                if array.shape != shape or array.dtype != dt:
                    raise ValueError(f"tensor {name!r} is {array.shape} {array.dtype}, "
                                     f"declared {shape} {dt}")
                f.write(np.asarray(array, order="C").tobytes())
            if next(it, None) is not None:
                raise ValueError("tensor stream has more tensors than declared")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
         metadata: Mapping[str, str] | None = None) -> None:
    """Writes a complete dict of arrays (convenience for small files and tests)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    write(path, [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.items(), metadata)
