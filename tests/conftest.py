"""Test setup: 8 fake CPU devices and a persistent XLA compilation cache, set before jax loads.

The tests build many small models whose programs repeat across tests (and across the trainer
subprocesses some tests start); compiling each distinct program once per session instead of once
per use roughly halves the suite's time on 2 cores.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.get("JAXCLIP_CACHE") or os.path.join(tempfile.gettempdir(), "jaxclip-tests")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
