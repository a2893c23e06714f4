"""jaxclip: CLIP-style dual-encoder pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"


def load(path, *, step=None, dtype=None):
    """A pretrained model for embedding images and texts: see jaxclip.interop.api.load."""
    from jaxclip.interop.api import load as _load

    return _load(path, step=step, dtype=dtype)
