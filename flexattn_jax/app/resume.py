"""A resumable JSONL answer file: one record per item, each carrying its input ``index``.

A run writes its records in input order and flushes each one, so an interrupted run leaves a
sorted prefix (plus, after Ctrl-C, the answers that were done, still sorted). ``--resume`` scans the
file (:meth:`AnswerLog.scan`), skips the items whose record matches by index and content
(:func:`request_key`: image path + prompt; failed items are retried), appends the rest, and at the end
(:meth:`AnswerLog.finalize`) merges the sorted runs of the file into one, keeping the newest record
of each index: the file then equals an uninterrupted run's. The merge streams the runs (memory
independent of the number of records); the scan keeps one short hash per answered item.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ResumeError(ValueError):
    """The output file cannot be resumed into (not written by this command, or unreadable)."""


def content_key(image: str | None, prompt: str | None, error: str | None = None) -> str:
    """A short hash of an item's content: its image path and prompt (an unreadable input line: its error)."""
    what = [image, prompt] if image is not None or prompt is not None else [None, None, error]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def request_key(req) -> str:
    """:func:`content_key` of an :class:`~flexattn_jax.app.inference.Request` (a path image is keyed by its string)."""
    image = None if req.image is None else str(req.image)
    return content_key(image, req.prompt, req.error)


def record_key(record: dict) -> str:
    """:func:`content_key` of an answer record (the ``image``, ``prompt`` and ``error`` fields)."""
    return content_key(record.get("image"), record.get("prompt"), record.get("error"))


@dataclass
class AnswerLog:
    """What an existing answer file holds: the items answered (index -> content key) and its sorted runs."""

    path: Path
    done: dict[int, str] = field(default_factory=dict)
    runs: list[tuple[int, int]] = field(default_factory=list)  # byte ranges, each with strictly increasing indices
    records: int = 0
    truncated: bool = False  # a partial last line was cut off (the process was killed mid-write)

    @classmethod
    def scan(cls, path: str | Path) -> AnswerLog:
        """Read ``path`` (missing: empty); cut a partial last line; raise :class:`ResumeError` on a foreign line."""
        log = cls(Path(path))
        if not log.path.exists():
            return log
        good_end, start, last = 0, 0, None
        with open(log.path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    record = json.loads(raw)
                    index = record["index"]
                    ok = raw.endswith(b"\n") and isinstance(record, dict) and isinstance(index, int) and index >= 0
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    if raw.endswith(b"\n"):  # a complete line that is not ours: do not touch the file
                        raise ResumeError(f"--resume: {log.path} line {n} is not an answer record of this command; "
                                          "use another --output or delete it")
                    log.truncated = True
                    break
                if last is not None and index <= last:
                    log.runs.append((start, good_end))
                    start = good_end
                last = index
                good_end += len(raw)
                log.records += 1
                if record.get("error") is None:
                    log.done[index] = record_key(record)
                else:
                    log.done.pop(index, None)  # a failed item is retried
        if good_end > start:
            log.runs.append((start, good_end))
        if log.truncated:
            os.truncate(log.path, good_end)
        return log

    def is_done(self, index: int, key: str) -> bool:
        """Whether item ``index`` with content ``key`` has an answer in the file."""
        return self.done.get(index) == key

    def end(self) -> int:
        return self.runs[-1][1] if self.runs else 0

    def finalize(self, total: int) -> bool:
        """Merge the file's runs (those scanned and what was appended since) into one sorted by index.

        The newest record of each index wins; records of indices ``>= total`` (the input got
        shorter) are dropped. Returns whether the file was rewritten (a single clean run is left as is).
        """
        size = self.path.stat().st_size
        runs = [*self.runs, (self.end(), size)] if size > self.end() else list(self.runs)
        if len(runs) <= 1 and self.records == len(self.done) and all(i < total for i in self.done):
            return False
        tmp = self.path.with_name(self.path.name + ".merging")
        with open(tmp, "wb") as out:
            streams = [_records(self.path, a, b, -r) for r, (a, b) in enumerate(runs)]
            last = None
            for index, _, raw in heapq.merge(*streams):
                if index != last and index < total:
                    out.write(raw)
                last = index
        os.replace(tmp, self.path)
        return True


def _records(path: Path, start: int, end: int, order: int) -> Iterator[tuple[int, int, bytes]]:
    """``(index, order, line)`` of the records in ``path[start:end]`` (``order``: newer runs first at equal index)."""
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < end:
            raw = f.readline()
            if not raw:
                return
            yield json.loads(raw)["index"], order, raw
