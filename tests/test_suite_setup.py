"""The suite's own compile cache (tests/conftest.py): every program cached however fast it compiled, in a
directory of the session's own even when the user's environment names another, which stays untouched."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_session_cache_settings():
    assert jax.config.jax_compilation_cache_dir == os.environ["FLEXATTN_JAX_TEST_SESSION_CACHE"]
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0


@pytest.mark.skipif(os.environ.get("FLEXATTN_JAX_TEST_INNER") != "1", reason="run by test_the_users_cache_is_not_used")
def test_inner_compiles_into_the_session_cache():
    cache = Path(os.environ["FLEXATTN_JAX_TEST_SESSION_CACHE"])
    assert Path(jax.config.jax_compilation_cache_dir) == cache != Path(os.environ["USER_CACHE"])
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()  # compiles in milliseconds
    assert any(cache.iterdir()), "a fast compile was not cached"


def test_the_users_cache_is_not_used(tmp_path):
    user = tmp_path / "user-cache"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FLEXATTN_JAX_TEST_SESSION_CACHE"}
    env.update(JAX_COMPILATION_CACHE_DIR=str(user), USER_CACHE=str(user), FLEXATTN_JAX_TEST_INNER="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        "tests/test_suite_setup.py::test_inner_compiles_into_the_session_cache"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert not any(user.iterdir())
