"""Test setup: 8 host CPU devices for the sharding tests (set before jax is imported), fp32 parity."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FLEXATTN_JAX_COMPILE_CACHE", "0")  # CLI calls in tests write no cache under the home directory
