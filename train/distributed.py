"""Multi-host start-up: ``jax.distributed.initialize`` when the job spans several processes.

Call :func:`maybe_initialize` before anything touches JAX devices. ``mode='auto'`` initializes when a
coordinator is given (flag or ``JAX_COORDINATOR_ADDRESS``) or a cluster launcher says there are
several processes (SLURM, Open MPI, multi-host TPU, ``JAX_NUM_PROCESSES``); JAX then auto-detects
the rest (TPU pods, SLURM, Open MPI, Kubernetes). Each process then feeds its own slice of every
global batch (``jax.make_array_from_process_local_data`` in :mod:`train.step`).
"""

from __future__ import annotations

import os
from typing import Literal

import jax

_COUNT_VARS = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE")


def _env_multi_process() -> bool:
    for var in _COUNT_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def maybe_initialize(
    mode: Literal["auto", "on", "off"] = "auto",
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialize ``jax.distributed`` per ``mode``; return whether it was initialized."""
    if mode == "off":
        return False
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if mode == "auto" and not coordinator and num_processes is None and not _env_multi_process():
        return False
    kwargs = {}
    if coordinator:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    elif os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is not None:
        kwargs["process_id"] = process_id
    elif os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


def describe() -> str:
    """``"process 0/2, 4 local / 8 global devices (cpu)"``."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices ({jax.devices()[0].platform})"
    )
