"""Ctrl-C and SIGTERM as a request to stop at the next safe point, whatever the process inherited.

A long command (``generate --batch``, ``eval``, ``train``) runs inside :class:`StopRequests`. The
handlers are installed with :func:`signal.signal` when the block starts, so a process started with
SIGINT ignored (``nohup``, a shell script's background job) still stops on Ctrl-C, and a batch
scheduler's SIGTERM (Kubernetes, Slurm, a TPU VM's maintenance event) is handled like Ctrl-C. A
signal only sets a flag: no exception is raised inside XLA's compile or an orbax restore (which
crashed the process). The command checks :attr:`StopRequests.requested` between batches, finishes
or abandons the batch in flight, writes what is done and exits with :attr:`StopRequests.exit_code`
(130 for SIGINT, 143 for SIGTERM). A second signal stops at once (``os._exit``) with that code;
records written and flushed so far are kept.

Before a command reaches its work (imports, argument checks), :func:`early_signals` makes SIGINT
raise :class:`KeyboardInterrupt` and SIGTERM :class:`Terminated` (a KeyboardInterrupt with exit code
143), also when SIGINT was inherited as ignored; :func:`exit_code` maps either to its status.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a :class:`StopRequests` block (nothing running that must finish): exit with 143."""

    exit_code = 128 + signal.SIGTERM


def exit_code(e: BaseException) -> int:
    """130 for a KeyboardInterrupt (Ctrl-C), 143 for :class:`Terminated` (SIGTERM)."""
    return getattr(e, "exit_code", 128 + signal.SIGINT)


_early: list[int] = []  # a signal the early handlers saw (their exception can be swallowed, e.g. in a gc callback)


def _early_int(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)
    raise KeyboardInterrupt


def _early_term(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)
    raise Terminated()


def early_signals() -> Any:
    """From now on Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated`; returns a function restoring
    the previous handlers. Call it first thing in a command (main thread only; elsewhere it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {signal.SIGINT: signal.signal(signal.SIGINT, _early_int), signal.SIGTERM: signal.signal(signal.SIGTERM, _early_term)}
    old_hook = sys.unraisablehook

    def hook(u: Any) -> None:  # our exception raised where Python cannot propagate it: kept in _early, not printed
        if not isinstance(u.exc_value, KeyboardInterrupt):
            old_hook(u)

    sys.unraisablehook = hook

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        sys.unraisablehook = old_hook

    return restore


class Stopped(Exception):  # noqa: N818 - a request, not an error
    """Raised by a command's own code (never by a signal handler) once it has stopped at a safe point."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """A context manager: while it is open, SIGINT and SIGTERM set :attr:`signum` instead of killing the process.

    ``what`` completes the message printed on the first signal (``"interrupted (SIGTERM): <what>"``).
    Outside the main thread (where handlers cannot be installed) it installs nothing and never fires.
    """

    def __init__(self, what: str = "finishing the batch in flight, then writing what is done"):
        self.what = what
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def check(self) -> None:
        """Raise :class:`Stopped` when a stop was requested (call it at a safe point)."""
        if self.signum is not None:
            raise Stopped(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            os.write(2, f"\n{signal.Signals(signum).name} again: stopping at once\n".encode())
            os._exit(128 + self.signum)
        self.signum = signum
        os.write(2, f"\ninterrupted ({signal.Signals(signum).name}): {self.what} (again to stop at once)\n".encode())

    def __enter__(self) -> StopRequests:
        if _early:  # a signal came before this block and its exception was lost: honour it at the first check
            self.signum = _early[0]
            _early.clear()
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()
        sys.stderr.flush()
