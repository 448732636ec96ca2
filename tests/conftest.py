"""Test setup: 8 host CPU devices for the sharding tests (set before jax is imported), fp32 parity, and one
persistent compile cache per test session.

Most of the suite's time is XLA compiling the same tiny programs again: in other test files, in the other
xdist worker and in the CLI subprocesses the tests start. A cache directory made fresh for the session (the
controller makes it before the workers start; they and every subprocess inherit it through the environment)
compiles each program once per run. It is deleted when the session ends, so no run reads an older run's
executables. Tests of the CLIs' own cache set their own directory (``FLEXATTN_JAX_CACHE``).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FLEXATTN_JAX_COMPILE_CACHE", "0")  # CLI calls in tests write no cache under the home directory

_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run): make it; xdist workers inherit it
    _SESSION_CACHE = tempfile.mkdtemp(prefix="flexattn-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
