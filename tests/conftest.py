"""Test setup: 8 fake CPU devices and a persistent XLA compilation cache, set before jax loads.

The tests build many small models whose programs repeat across tests (and across the trainer
subprocesses some tests start); compiling each distinct program once per session instead of once
per use roughly halves the suite's time on 2 cores.
"""

import os
import re
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.get("JAXCLIP_CACHE") or os.path.join(tempfile.gettempdir(), "jaxclip-tests")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# A mesh larger than the backend's devices fails with this message (jaxclip.sharding.mesh_shape).
_TOO_FEW_DEVICES = re.compile(r"needs \d+ devices, \d+ (?:are|is) available")


def pytest_runtest_makereport(item, call):
    """With JAXCLIP_TEST_ACCELERATOR=1 (tools/gpu_check.sh on one GPU), a test that fails only
    because its mesh needs more devices than the accelerator has is reported as skipped: those
    layouts run in CI on 8 fake CPU devices, and the rest of the module still runs on the GPU.

    With JAXCLIP_REQUIRE_DEBIAN=1 (set by tools/test.sh after it installed the Debian data and
    tools as root, i.e. in CI), a test that would skip for want of them fails instead: the data
    tests must run in CI, not quietly skip."""
    if call.excinfo is None:
        return
    import pytest

    if (os.environ.get("JAXCLIP_TEST_ACCELERATOR") == "1"
            and call.excinfo.errisinstance(ValueError)
            and _TOO_FEW_DEVICES.search(str(call.excinfo.value))):
        try:
            pytest.skip(f"on this accelerator: {call.excinfo.value}")
        except pytest.skip.Exception as e:
            call.excinfo = pytest.ExceptionInfo.from_exception(e)
        return
    if os.environ.get("JAXCLIP_REQUIRE_DEBIAN") != "1":
        return

    if call.excinfo.errisinstance(pytest.skip.Exception):
        reason = str(call.excinfo.value)
        if "Debian package" in reason or "apt-get install" in reason:
            try:
                raise RuntimeError(f"JAXCLIP_REQUIRE_DEBIAN=1 but the test skipped: {reason}")
            except RuntimeError as e:
                call.excinfo = pytest.ExceptionInfo.from_exception(e)
