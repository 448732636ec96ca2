"""Resumable JSONL answer files for ``generate --batch`` and ``eval``: one mechanism, nothing lost, nothing mixed.

A file starts with a **header record** (:func:`make_header`) naming the command and everything that
changes an answer: a fingerprint of the checkpoint (:func:`checkpoint_fingerprint`: its metadata, a
digest of the parameter directory and of the tokenizer files, computed from file names, sizes and
the small metadata files, never from the gigabytes of array data), the settings (sampling, budget,
strategy, dtype, overrides, ...) and, for ``generate``, the identity of the input file. Each record
then carries its item's content key, which includes its image's content hash. Resuming:

* a file that does not start with a header of this command is refused, whatever its last byte, and
  never edited (:class:`ResumeError`);
* a header that differs from this run's is refused, naming each field that changed (another
  checkpoint, ``--max-new-tokens``, another batch file, ...), and the file is not edited;
* only then is a last line cut short by a kill removed (the only edit of an existing file besides
  appending), and items whose record matches by content are skipped.

``generate`` writes its records in input order and flushes each one, so an interrupted run leaves a
sorted prefix. :meth:`AnswerLog.finalize` merges the sorted runs of the file into one, keeping the
newest record of each index (a retried failure or an item whose image changed); no index is ever
dropped, so the file of a resumed run equals an uninterrupted run's. The merge streams the runs;
the scan keeps one short hash per answered item.
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import itertools
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER_KEY = "flexattn_jax"
HEADER_VERSION = 1
SMALL_FILE = 1 << 16  # parameter-directory files up to this size (orbax metadata, manifests) are hashed whole


class ResumeError(ValueError):
    """The output file cannot be resumed into (not written by this command, another run's, or unreadable)."""


class OutputBusyError(ValueError):
    """Another live run holds the lock of this output (its PID is in the message); nothing was written."""


# ---- one writer per output ---------------------------------------------------------------------------

LOCK_SUFFIX = ".lock"


def lock_path(output: str | Path) -> Path:
    """The lock file of an answers file or run directory: its path plus ``.lock``, next to it."""
    p = Path(output)
    return p.with_name(p.name + LOCK_SUFFIX)


@dataclass
class OutputLock:
    """An exclusive ``flock`` on :func:`lock_path` of an output, held for a whole run (:func:`lock_output`).

    The lock file holds the holder's PID. The kernel drops the lock when its process dies, so a lock
    file left by a killed run is taken over (``stale_pid`` is that run's PID); :meth:`release` removes it.
    """

    path: Path | None  # None: an output that is not a regular file (a pipe, /dev/full): nothing to lock
    fd: int | None = None
    stale_pid: int | None = None

    def release(self) -> None:
        """Remove the lock file and drop the lock (a waiting run then sees the file gone and retries)."""
        if self.fd is None:
            return
        try:
            if self.path is not None and os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def lock_output(output: str | Path, flag: str) -> OutputLock:
    """Take the exclusive lock of ``output`` (an answers file or a run directory) for this process, at once.

    Raises :class:`OutputBusyError` naming ``flag``, the output and the holder's PID when a live run holds
    it; nothing is written then. An output that exists and is neither a regular file nor a directory
    (``/dev/full``, a pipe) gets no lock. A stale lock file (its run was killed) is taken over.
    """
    out = Path(output)
    if out.exists() and not (out.is_file() or out.is_dir()):
        return OutputLock(None)
    path = lock_path(out)
    try:  # the output's parent may not exist yet (`--out runs/vstar`): the run would make it anyway
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputBusyError(f"{flag} {out}: cannot create its directory {path.parent} ({e.strerror or e})") from e
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputBusyError(f"{flag} {out}: cannot create its lock file {path} ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_pid(fd)
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise OutputBusyError(f"{flag} {out} is being written by another run (PID {holder or 'unknown'}, lock file "
                                      f"{path}); nothing was written: wait for it to finish, or use another {flag}") from e
            raise OutputBusyError(f"{flag} {out}: cannot lock {path} ({e.strerror or e})") from e
        try:  # the file locked must still be the one at the path (a finishing holder removes it)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _lock_pid(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return OutputLock(path, fd, stale if stale != os.getpid() else None)


# ---- fingerprints ------------------------------------------------------------------------------------

def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def image_sha256(image: Any) -> str | None:
    """The content hash of a request's image: a path's bytes (None when unreadable), a PIL image's pixels."""
    if image is None:
        return None
    if isinstance(image, str | Path):
        try:
            return file_sha256(image)
        except OSError:
            return None
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    try:  # a PIL image: mode, size and pixels
        return hashlib.sha256(repr((image.mode, image.size)).encode() + image.tobytes()).hexdigest()
    except Exception:  # noqa: BLE001 - a lazily decoded image that cannot be decoded: its item fails anyway
        return None


def checkpoint_fingerprint(directory: str | Path) -> dict[str, str]:
    """What identifies a converted checkpoint's answers: sha256 of ``metadata.json``, of the parameter directory's
    file names and sizes with the content of its small files (orbax ``_METADATA``, manifests), and of the tokenizer files.

    Cheap (no array data is read) and independent of where the directory lies or when it was copied.
    """
    from flexattn_jax.tokenizer import TOKENIZER_FILES

    d = Path(directory)
    params = hashlib.sha256()
    root = d / "params"
    for p in sorted(root.rglob("*")) if root.is_dir() else []:
        if p.is_file():
            size = p.stat().st_size
            params.update(f"{p.relative_to(root)}\0{size}\0".encode())
            if size <= SMALL_FILE and p.name != "_CHECKPOINT_METADATA":  # that one holds the save time only
                params.update(p.read_bytes())
    tok = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (d / name).is_file():
            tok.update(name.encode() + b"\0" + (d / name).read_bytes())
    meta = d / "metadata.json"
    return {"metadata_sha256": file_sha256(meta) if meta.is_file() else "", "params_digest": params.hexdigest(),
            "tokenizer_sha256": tok.hexdigest()}


def input_identity(path: str | Path) -> dict[str, Any]:
    """An input file's identity: its path and, for a regular file, its size and sha256 (a pipe: its path only)."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve())}
    try:
        if stat.S_ISREG(p.stat().st_mode):
            out.update(size=p.stat().st_size, sha256=file_sha256(p))
        else:
            out["kind"] = "stream"
    except OSError:
        pass  # unreadable: the command's own check names it
    return out


def make_header(kind: str, **fields: Any) -> dict[str, Any]:
    """The first record of an answer file: ``{"flexattn_jax": kind, "version": 1, **fields}`` (JSON-normalised)."""
    return json.loads(json.dumps({HEADER_KEY: kind, "version": HEADER_VERSION, **fields}, sort_keys=True, default=str))


def header_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """``['settings.max_new_tokens (file 2, now 3)', ...]``: the header fields that differ."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix.rstrip("."): d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    diff = [f"{k} (file {_short(a.get(k))}, now {_short(b.get(k))})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diff[:limit] + ([f"{len(diff) - limit} more"] if len(diff) > limit else [])


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:16] + "..." + text[-16:]


# ---- reading an answer file ----------------------------------------------------------------------

def read_records(path: str | Path, header: dict[str, Any], flag: str, is_record) -> Iterator[tuple[int, bytes, dict]]:
    """``(line number, raw line, record)`` of the records after the header of an existing answer file.

    Refuses (:class:`ResumeError`, naming ``flag``, the file and what differs) a file whose first line
    is not ``header``'s kind, or whose header differs from ``header``, or with a complete line that
    is not a record (``is_record(obj)``); the file is then left as it is. A missing or empty file
    yields nothing. A last line without its newline (a kill mid-write) is cut off the file, which is
    then known to be this command's.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    kind = header[HEADER_KEY]
    with open(path, "rb") as f:
        first = f.readline()
        try:
            found = json.loads(first)
        except ValueError:
            found = None
        if not (isinstance(found, dict) and found.get(HEADER_KEY) == kind and first.endswith(b"\n")):
            raise ResumeError(f"{flag} {path} was not written by this command (its first line is not a {kind!r} header "
                              "record); it was left as it is: use another output, or delete it")
        if found != header:
            changed = header_diff(found, header)
            raise ResumeError(f"{flag} {path} holds answers of another run; changed: {'; '.join(changed)}; it was left as "
                              "it is: rerun with the settings it was written with, or use another output")
        good_end = len(first)
        for n, raw in enumerate(f, 2):
            try:
                record = json.loads(raw)
                ok = isinstance(record, dict) and is_record(record)
            except ValueError:
                ok = False
            if not raw.endswith(b"\n"):  # cut by a kill mid-write (whatever it parses to): ours, drop it
                break
            if not ok:
                raise ResumeError(f"{flag} {path} line {n} is not a record of this command; it was left as it is: "
                                  "use another output, or delete it")
            good_end += len(raw)
            yield n, raw, record
    if good_end < path.stat().st_size:
        os.truncate(path, good_end)


def write_header(f, header: dict[str, Any]) -> None:
    """Write ``header`` as the first line of a new answer file (one write, flushed)."""
    f.write(json.dumps(header, sort_keys=True) + "\n")
    f.flush()


# ---- generate's answer file ---------------------------------------------------------------------

def content_key(image: str | None, prompt: str | None, error: str | None = None, image_sha256: str | None = None) -> str:
    """A short hash of an item's content: its image (path and content hash) and prompt (an unreadable line: its error)."""
    what = [image, prompt, image_sha256] if image is not None or prompt is not None else [None, None, error]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def record_key(record: dict) -> str:
    """:func:`content_key` of an answer record (its ``image``, ``image_sha256``, ``prompt`` and ``error`` fields)."""
    return content_key(record.get("image"), record.get("prompt"), record.get("error"), record.get("image_sha256"))


def _is_answer(record: dict) -> bool:
    return isinstance(record.get("index"), int) and record["index"] >= 0 and HEADER_KEY not in record


@dataclass
class AnswerLog:
    """What an existing answer file holds: the items answered (index -> content key), its sorted runs, its header."""

    path: Path
    header: dict[str, Any]
    done: dict[int, str] = field(default_factory=dict)
    runs: list[tuple[int, int]] = field(default_factory=list)  # byte ranges, each with strictly increasing indices
    records: int = 0
    start: int = 0  # the first record's byte offset (after the header)

    @classmethod
    def scan(cls, path: str | Path, header: dict[str, Any], flag: str = "--output") -> AnswerLog:
        """Read ``path`` (missing or empty: nothing done) after checking it is this run's (see :func:`read_records`)."""
        log = cls(Path(path), header)
        records = read_records(log.path, header, flag, _is_answer)
        first = next(records, None)  # the header is checked here
        if log.path.exists() and log.path.stat().st_size:
            log.start = _header_length(log.path)
        start = offset = log.start
        last = None
        for _, raw, record in itertools.chain([first], records) if first is not None else ():
            index = record["index"]
            if last is not None and index <= last:
                log.runs.append((start, offset))
                start = offset
            last = index
            offset += len(raw)
            log.records += 1
            if record.get("error") is None:
                log.done[index] = record_key(record)
            else:
                log.done.pop(index, None)  # a failed item is retried
        if offset > start:
            log.runs.append((start, offset))
        return log

    @property
    def has_header(self) -> bool:
        return self.start > 0

    def is_done(self, index: int, key: str) -> bool:
        """Whether item ``index`` with content ``key`` has an answer in the file."""
        return self.done.get(index) == key

    def end(self) -> int:
        return self.runs[-1][1] if self.runs else self.start

    def finalize(self) -> bool:
        """Merge the file's runs (those scanned and what was appended since) into one sorted by index.

        The newest record of each index wins (a retried item, an item whose content changed); no
        index is dropped. Returns whether the file was rewritten (a single clean run is left as is).
        """
        size = self.path.stat().st_size
        runs = [*self.runs, (self.end(), size)] if size > self.end() else list(self.runs)
        if len(runs) <= 1 and self.records == len(self.done):
            return False
        tmp = self.path.with_name(self.path.name + ".merging")
        with open(tmp, "wb") as out, open(self.path, "rb") as src:
            out.write(src.read(self.start))  # the header
            streams = [_records(self.path, a, b, -r) for r, (a, b) in enumerate(runs)]
            last = None
            for index, _, raw in heapq.merge(*streams):
                if index != last:
                    out.write(raw)
                last = index
        os.replace(tmp, self.path)
        return True


def _header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return len(f.readline())


def _records(path: Path, start: int, end: int, order: int) -> Iterator[tuple[int, int, bytes]]:
    """``(index, order, line)`` of the records in ``path[start:end]`` (``order``: newer runs first at equal index)."""
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < end:
            raw = f.readline()
            if not raw:
                return
            yield json.loads(raw)["index"], order, raw
