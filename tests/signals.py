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


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignore" else signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.execvp(sys.argv[2], sys.argv[2:])
