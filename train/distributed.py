"""Multi-host start-up: ``jax.distributed.initialize`` when the job spans several processes.

Call :func:`maybe_initialize` before anything touches JAX devices. ``mode='auto'`` initializes when a
coordinator is given (flag or ``JAX_COORDINATOR_ADDRESS``) or a cluster launcher says there are
several processes (SLURM, Open MPI, multi-host TPU, ``JAX_NUM_PROCESSES``); JAX then auto-detects
the rest (TPU pods, SLURM, Open MPI, Kubernetes). Each process then feeds its own slice of every
global batch (``jax.make_array_from_process_local_data`` in :mod:`train.step`).
"""

from __future__ import annotations

import os
import signal
import threading
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
    # jax.distributed installs a C++ SIGTERM handler (its preemption notifier) over the process's own; keep ours,
    # which asks the training loop to stop after the step in flight, and StepAgreement makes every process stop
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    jax.distributed.initialize(**kwargs)
    for s, handler in kept.items():
        if handler is not None:
            signal.signal(s, handler)
    return True


def describe() -> str:
    """``"process 0/2, 4 local / 8 global devices (cpu)"``."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices ({jax.devices()[0].platform})"
    )


class HostLost(RuntimeError):
    """Another process did not reach a step's agreement in time, or reported that it failed."""


_runs = [0]  # train() calls in this process: the same sequence on every process, so their keys never collide


class StepAgreement:
    """Every process's word before each step, exchanged through ``jax.distributed``'s key-value store.

    Each process publishes ``go``, ``stop`` (a SIGTERM/Ctrl-C flag of its own), ``end`` (its data ran out) or
    ``fail: <why>`` for the step, with its batch length, then reads every other process's word: any ``stop``
    stops all of them before the same step, any ``fail`` ends all of them with an error naming that process,
    and all pad to the longest batch. A process that has not spoken after ``timeout_s``
    (dead, or stuck) raises :class:`HostLost` naming it, instead of waiting in a collective for ever. The
    store lives on the coordinator, outside the devices: the exchange does not wait for the step in flight.
    With one process it is a no-op (the verdict is this process's word).
    """

    def __init__(self, timeout_s: float):
        self.count, self.index = jax.process_count(), jax.process_index()
        self.timeout_ms = max(1, int(timeout_s * 1000))
        self.client = None
        if self.count > 1:
            from jax._src.distributed import global_state

            self.client = global_state.client
        _runs[0] += 1
        self.prefix = f"flexattn_train/{_runs[0]}"

    def _key(self, step: int, process: int) -> str:
        return f"{self.prefix}/{step}/{process}"

    def publish(self, step: int, word: str) -> None:
        """Say ``word`` for ``step`` (once per step and process)."""
        if self.client is not None:
            self.client.key_value_set(self._key(step, self.index), word)
            if step >= 2:  # keep the store small: the words of step - 2 have been read by everyone
                try:
                    self.client.key_value_delete(self._key(step - 2, self.index))
                except Exception:  # noqa: BLE001 - housekeeping only
                    pass

    def agree(self, step: int, word: str, value: int = 0) -> tuple[str, int]:
        """Publish this process's ``word`` (``go``, ``stop`` or ``end``: its data ran out) and ``value`` (its batch
        length) for ``step`` and read all others': ``(verdict, max value)``, the same on every process. The
        verdict is ``stop`` if any process said it, else ``end`` if any did, else ``go``.

        Raises :class:`HostLost` when a process failed or is silent past the timeout."""
        if self.client is None:
            return word, value
        self.publish(step, f"{word} {int(value)}")
        words, values = [word], [int(value)]
        for p in range(self.count):
            if p == self.index:
                continue
            try:
                got = self.client.blocking_key_value_get(self._key(step, p), self.timeout_ms)
            except Exception as e:  # noqa: BLE001 - the client raises a bare XlaRuntimeError on a deadline
                raise HostLost(f"process {p} of {self.count} did not reach step {step + 1} within "
                               f"{self.timeout_ms / 1000:g} s (dead or stuck; --sync-timeout-s): "
                               f"{str(e).splitlines()[0][:200]}") from None
            if got.startswith("fail"):
                raise HostLost(f"process {p} of {self.count} stopped before step {step + 1}: {got[5:].strip()}")
            w, v = got.split(" ", 1)
            words.append(w)
            values.append(int(v))
        verdict = next((w for w in ("stop", "end") if w in words), "go")
        return verdict, max(values)

    def fail(self, step: int, why: str) -> None:
        """Tell the others this process is leaving at ``step`` with an error (best effort: it may be dead)."""
        if self.client is not None:
            try:
                self.client.key_value_set(self._key(step, self.index), f"fail: {why}"[:2000])
            except Exception:  # noqa: BLE001 - the word was already set, or the coordinator is gone
                pass
