"""One logging configuration and one progress-bar factory for every command.

The library logs through module loggers (``logging.getLogger(__name__)``) and prints nothing itself; the
``flexattn-jax`` command (and ``python -m train`` / ``python -m convert``) calls :func:`configure_logging` once:
level from ``--log-level`` or the ``FLEXATTN_JAX_LOG`` environment variable (default ``info``), records of this
project's packages on stderr as ``HH:MM:SS LEVEL logger: message``; other libraries' loggers stay at warning.
A command's real output (answers, tables, JSON summaries) stays on stdout.

Every progress bar comes from :func:`progress`: a live tqdm bar when its stream (stderr) is a terminal, else one
plain line every ``interval`` seconds and one at the end, no carriage returns: a log file or CI log stays readable.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

LOG_ENV = "FLEXATTN_JAX_LOG"
PACKAGES = ("flexattn_jax", "train", "convert", "bench")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_INTERVAL_S = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""
LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str | None = None, stream: TextIO | None = None) -> int:
    """Send this project's log records at ``level`` (else ``$FLEXATTN_JAX_LOG``, else info) to ``stream`` (stderr).

    Calling it again replaces the handler it installed (no duplicate lines); returns the numeric level. An unknown
    level raises ValueError naming it.
    """
    name = (level or os.environ.get(LOG_ENV) or "info").strip().lower()
    if name not in LEVELS:
        source = "--log-level" if level else LOG_ENV
        raise ValueError(f"{source} {name!r}: use one of {', '.join(LEVELS)}")
    value = getattr(logging, name.upper())
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "flexattn_jax", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.flexattn_jax = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    for package in PACKAGES:
        logging.getLogger(package).setLevel(value)
    return value


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each record (a redirected or captured stderr included)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an interactive terminal (a live bar may redraw itself there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """A stream for tqdm that turns each redraw (``'\\r' + text + padding``) into one line; bare ``'\\r'``/``'\\n'`` are dropped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None, unit: str = "it",
             disable: bool = False, initial: int = 0, file: TextIO | None = None, interval: float = PLAIN_INTERVAL_S) -> Any:
    """A tqdm progress bar on ``file`` (default stderr): live on a terminal, else a plain line every ``interval`` s."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=stream, dynamic_ncols=True)
    head = "{desc}: " if desc else ""
    done = "{percentage:3.0f}% {n_fmt}/{total_fmt}" if total is not None else "{n_fmt}"
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=_Lines(stream),
                mininterval=interval, maxinterval=max(interval, 10.0), ascii=True,
                bar_format=head + done + " {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
