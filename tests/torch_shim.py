"""Imports for the PyTorch parity tests: torch, transformers and open_clip, or a skip saying why.

PyPI's torchvision wheels are CUDA builds; next to the CPU torch of the parity environment their
`import torchvision` fails with "operator torchvision::nms does not exist", and both open_clip
(image transforms) and transformers (whenever torchvision is installed) import it. The fix: on
that error, drop the half-imported torchvision modules, define the two
operator schemas torchvision registers fake kernels for, keep that Library alive, and import
again. The pure-Python parts (transforms) then work; torchvision.ops stays unusable, which the
parity tests never call.

Every parity test module calls `require(...)` at import time, before any other torch import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

PARITY_ENV = ("parity environment missing: {} (CI's Python 3.11 leg installs it: pip install -r "
              "tests/requirements-parity.txt && pip install --no-deps -r "
              "tests/requirements-parity-nodeps.txt)")

_LIBRARY = None  # the torch.library.Library defining torchvision's ops; must stay referenced


def _import_torchvision() -> None:
    global _LIBRARY
    if importlib.util.find_spec("torchvision") is None:
        return  # transformers works without it; open_clip will then report it missing
    try:
        import torchvision
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


def require(*packages: str):
    """Imports torch first (with the torchvision fix), then `packages`; skips the calling module
    with the reason when one is missing. Returns the imported modules."""
    missing = [p for p in dict.fromkeys(("torch", *packages)) if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(PARITY_ENV.format(", ".join(missing) + " not installed"),
                    allow_module_level=True)
    _import_torchvision()
    # open_clip sets TOKENIZERS_PARALLELISM=false on import; keep it from leaking into the
    # other tests of the session.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        modules = [importlib.import_module(p) for p in packages]
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    import torch

    torch.set_num_threads(1)  # the CI machine has 2 cores and pytest runs 2 workers
    return modules
