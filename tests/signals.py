"""Signal dispositions for CLI subprocesses in tests, set by the test itself and never inherited from how pytest
was launched (foreground, a background job, nohup): ``python -m tests.signals default|ignore CMD...`` sets SIGTERM
to its default, SIGINT to its default or ignored (as a process started by a script's ``&`` or by nohup inherits
it), unblocks every signal, and execs CMD."""

from __future__ import annotations

import os
import signal
import sys


def with_signals(cmd: list[str], sigint: str = "default") -> list[str]:
    """``cmd`` run through this module's wrapper with SIGINT ``'default'`` or ``'ignore'`` (SIGTERM default)."""
    assert sigint in ("default", "ignore")
    return [sys.executable, "-m", "tests.signals", sigint, *cmd]


def open_fifo_for_writing(fifo, proc, timeout: float) -> int:
    """A non-blocking write end of ``fifo`` once the CLI ``proc`` has opened it for reading (``os.open`` fails
    until then); a CLI that exits or takes longer than ``timeout`` seconds fails the test with its stderr
    instead of hanging it."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignore" else signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.execvp(sys.argv[2], sys.argv[2:])
