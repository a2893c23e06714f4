"""jaxclip: CLIP-style dual-encoder pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"
