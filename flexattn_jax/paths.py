"""Output-path checks shared by every command that writes: run them before any work starts.

A command that loads a model, reads a checkpoint or trains for an hour must not find out at the
end that its output cannot be written, nor destroy its own input. Each check raises
:class:`OutputPathError` (a ``ValueError``) with one line naming the flag and the path:

* :func:`check_output_dir` for a directory the command creates (or replaces with ``--overwrite``):
  refused when it is, contains, or lies inside one of the ``sources``; when it exists and may not be
  replaced; when it is a file; when nothing can be created where it goes.
* :func:`check_output_file` for a file: refused when it is one of the ``sources`` (same file,
  through links too) or lies inside a source directory, when its directory does not exist, when it
  is a directory, when it cannot be written.

Writability is probed by creating (and removing) a temporary file, so it holds for root and for
read-only mounts alike; the checks create nothing that stays.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputPathError", "check_output_dir", "check_output_file", "is_within"]

PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output path that would destroy an input, cannot be written, or exists and may not be replaced."""


def _resolve(p: PathLike) -> Path:
    return Path(p).expanduser().resolve()


def is_within(a: PathLike, b: PathLike) -> bool:
    """Whether path ``a`` is ``b`` or lies inside it (both resolved, links followed; neither need exist)."""
    ra, rb = _resolve(a), _resolve(b)
    return ra == rb or rb in ra.parents


def _nearest_existing(p: Path) -> Path:
    for q in (p, *p.parents):
        if q.exists():
            return q
    return Path(p.anchor or ".")


def _probe_writable(directory: Path, flag: str, target: Path) -> None:
    """Create and remove a temporary file in ``directory``; an OSError becomes an OutputPathError."""
    if not directory.is_dir():
        raise OutputPathError(f"{flag} {target}: {directory} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise OutputPathError(f"{flag} {target}: cannot write in {directory} ({e.strerror or e})") from e


def _check_sources(out: Path, sources: Iterable[PathLike | None], flag: str) -> None:
    ro = _resolve(out)
    for src in sources:
        if src is None:
            continue
        rs = _resolve(src)
        if ro == rs or (rs.exists() and ro.exists() and os.path.samefile(ro, rs)):
            raise OutputPathError(f"{flag} {out} is the input {src}; choose another path")
        if rs in ro.parents:
            raise OutputPathError(f"{flag} {out} lies inside the input {src}; choose a path outside it")
        if ro in rs.parents:
            raise OutputPathError(f"{flag} {out} contains the input {src}; replacing it would delete the input")


def check_output_dir(
    out: PathLike,
    *,
    sources: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    exist_ok: bool = False,
    flag: str = "OUT",
) -> Path:
    """Check a directory the command will write, before any work; returns it as a Path.

    ``sources`` are the command's inputs (files or directories): ``out`` may not be one, contain
    one or lie inside one. An existing ``out`` is an error unless ``overwrite`` (it will be replaced;
    the message suggests ``--overwrite``) or ``exist_ok`` (files are added to it). Its nearest
    existing ancestor (or itself, when it exists and is reused) must accept a new file.
    """
    path = Path(out)
    _check_sources(path, sources, flag)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputPathError(f"{flag} {out} exists and is not a directory")
        if not (overwrite or exist_ok):
            raise OutputPathError(f"{flag} {out} already exists (pass --overwrite to replace it)")
        # replaced: a sibling is written and renamed; reused: files go inside
        _probe_writable(_resolve(path) if exist_ok and not overwrite else _resolve(path).parent, flag, path)
        return path
    _probe_writable(_nearest_existing(_resolve(path)), flag, path)
    return path


def check_output_file(
    out: PathLike,
    *,
    sources: Iterable[PathLike | None] = (),
    make_parents: bool = False,
    flag: str = "--output",
) -> Path:
    """Check a file the command will write (replacing it if it exists), before any work; returns it.

    ``out`` may not be one of ``sources`` (compared after resolving links, and by inode when both
    exist) nor lie inside a source directory. Its directory must exist (unless ``make_parents``)
    and accept a new file; an existing directory at ``out`` is refused.
    """
    path = Path(out)
    _check_sources(path, sources, flag)
    if path.is_dir():
        raise OutputPathError(f"{flag} {out} is a directory; give a file path")
    parent = _resolve(path).parent
    if not parent.exists():
        if not make_parents:
            raise OutputPathError(f"{flag} {out}: the directory {parent} does not exist")
        parent = _nearest_existing(parent)
    _probe_writable(parent, flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{flag} {out} exists and is not writable")
    return path
