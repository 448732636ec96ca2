"""Test setup: 8 host CPU devices for the sharding tests (set before jax is imported), fp32 parity, and one
persistent compile cache per test session.

Most of the suite's time is XLA compiling the same tiny programs again: in other test files, in the other
xdist worker and in the CLI subprocesses the tests start. A cache directory made fresh for the session (the
controller makes it before the workers start; they and every subprocess inherit it through the environment)
compiles each program once per run, every program however short its compile (jax's default skips programs
compiled in under a second, which is nearly all of the suite's). It is always the session's own directory: a
``JAX_COMPILATION_CACHE_DIR`` the user has set is neither read nor written, and the directory is deleted when
the session ends, so no run reads an older run's executables. Tests of the CLIs' own cache set their own
directory (``FLEXATTN_JAX_CACHE``).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FLEXATTN_JAX_COMPILE_CACHE", "0")  # CLI calls in tests write no cache under the home directory

SESSION_CACHE_ENV = "FLEXATTN_JAX_TEST_SESSION_CACHE"  # set by this session's controller only, inherited by its workers

_SESSION_CACHE = os.environ.get(SESSION_CACHE_ENV)
_OWNED = _SESSION_CACHE is None or not os.path.isdir(_SESSION_CACHE)
if _OWNED:  # the controller (or a plain run): a fresh directory, whatever the user's environment names
    _SESSION_CACHE = tempfile.mkdtemp(prefix="flexattn-jax-test-compile-cache-")
    os.environ[SESSION_CACHE_ENV] = _SESSION_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _OWNED:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
