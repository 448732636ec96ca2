"""JAX's persistent compilation cache for the command-line tools.

Each CLI call is a new process, so without a cache every call compiles ``generate`` from scratch
(most of the wall time of a short call). With the cache on, compiled executables are stored under
:func:`default_cache_dir` and a second identical call loads them instead of compiling.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import jax

_log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$FLEXATTN_JAX_CACHE``, else ``$XDG_CACHE_HOME/flexattn-jax/jax``, else ``~/.cache/flexattn-jax/jax``."""
    if os.environ.get("FLEXATTN_JAX_CACHE"):
        return Path(os.environ["FLEXATTN_JAX_CACHE"]).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home).expanduser() / "flexattn-jax" / "jax"


class CacheCounter:
    """Counts the persistent cache's hits and misses of this process (JAX monitoring events)."""

    EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

    def __init__(self) -> None:
        self.hits = self.misses = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_) -> None:
        what = self.EVENTS.get(event)
        if what is not None:
            setattr(self, what, getattr(self, what) + 1)


TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # jax.monitoring: a jitted function traced (its cache missed)
_traces = threading.local()


def _count_trace(event: str, duration_secs: float, **_) -> None:
    if event == TRACE_EVENT:
        _traces.count = getattr(_traces, "count", 0) + 1


jax.monitoring.register_event_duration_secs_listener(_count_trace)


def traces_in_this_thread() -> int:
    """How many times jitted functions were traced in the calling thread so far (JAX monitoring events): a call
    that raises it compiled a new program (from scratch or from the persistent cache) instead of reusing one."""
    return getattr(_traces, "count", 0)


def enable_compile_cache(path: str | Path | None = None) -> Path:
    """Turn the persistent cache on at ``path`` (default :func:`default_cache_dir`); every executable is cached.

    Call before the first compile. Returns the directory (created).
    """
    path = Path(path).expanduser() if path is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def setup_compile_cache(path: str | Path | None, *, disabled: bool = False) -> CacheCounter | None:
    """The CLIs' switch: on unless ``disabled`` (``--no-compile-cache``) or ``FLEXATTN_JAX_COMPILE_CACHE=0``.

    A cache directory that cannot be made is a warning (the run goes on uncached), not an error.
    Returns the hit/miss counter, or None when the cache is off.
    """
    if disabled or os.environ.get("FLEXATTN_JAX_COMPILE_CACHE", "1") == "0":
        return None
    try:
        enable_compile_cache(path)
    except OSError as e:
        _log.warning("compile cache off (%s)", e)
        return None
    return CacheCounter()
