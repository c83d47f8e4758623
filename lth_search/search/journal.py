"""Where a search's Optuna study lives: a journal on the store's storage, appended to, never rewritten.

A local path (the default store) uses Optuna's own `JournalFileBackend`: one file of JSON
lines, appended under its file lock (without its fsync per append:
`UnsyncedJournalFileBackend`). Any other store URI (s3://, gs://, local://, sftp://, ...)
uses `StoreJournalBackend`. Object stores cannot append, and rewriting one journal
object on every Optuna call costs a PUT of the whole study each time: ~2.5 KB a trial, so
~25 MB a PUT, several times per trial, at 10,000 trials. Instead every append is one new
object in the folder `<journal>.d/`, named by the sequence numbers of the logs it holds,
`<first>-<end>.jsonl` (zero-padded, so names sort in log order); every `CHUNK_LOGS` logs
the writer also writes one chunk object holding them all, so a resume reads a few chunks
instead of thousands of small objects. Bytes written per trial stay constant (each log
is written twice: alone and in its chunk), whatever the study's size. A journal written
as one object by an earlier version is read as the first segment, and continued.

Reading walks the names from log 0: at each position it takes the object that starts
there and reaches furthest (a chunk over its small segments), and stops at the first
gap, so it returns a prefix of the log in order, never a log twice, never half an object
(objects are written whole: `_put`).

Process safety, as Optuna's `BaseJournalBackend` asks (concurrent `read_logs` and
`append_logs` from several processes): only the search driver writes the journal (Ray's
OptunaSearch runs in the driver), and one driver at a time drives a search
(runs/search_lease.py; a resumed driver starts after the old one died), so there is one
writer. It numbers its appends itself, after reading the journal once; readers (another
process loading the study, optuna-dashboard) see whole objects in log order. A second
concurrent writer is what the search lease refuses: two writers would both write the
next number. The writer's own reads come from what it has read and written (cached), so
an Optuna call costs no request beyond its append.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import optuna
import pyarrow.fs as pafs
from optuna.storages.journal import BaseJournalBackend
from optuna.storages.journal._file import get_lock_file  # the lock Optuna's own append takes

from lth_search.store.uri import read_file, resolve_uri, write_file

CHUNK_LOGS = 1000
"""Logs per chunk object (~250 KB): a 10,000-trial study (~120,000 logs) resumes in ~120 reads."""
SEGMENT = re.compile(r"(\d{12})-(\d{12})\.jsonl")
"""A journal object's name: the sequence numbers of its first log and of the one after its last."""


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _put(uri: str, data: bytes) -> None:
    """Write a new journal object whole (store/uri.py `write_file`: one PUT on an object store, which
    publishes an object only when its upload completes; elsewhere write aside, then move)."""
    write_file(uri, data)


def _encode(logs: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()


class StoreJournalBackend(BaseJournalBackend):
    """An append-only Optuna journal of objects at a store URI (see the module docstring)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.folder = uri.rstrip("/") + ".d"
        self._logs: list[dict[str, Any]] | None = None
        self._chunked = 0
        """How many logs, from the first, the chunk objects hold."""

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "folder": self.folder, "_logs": None, "_chunked": 0}  # reread after a restore

    def _segments(self) -> dict[int, tuple[int, str]]:
        """First log number -> (end, name) of the furthest-reaching object starting there."""
        _, filesystem, path = resolve_uri(self.folder)
        found: dict[int, tuple[int, str]] = {}
        for info in filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            match = SEGMENT.fullmatch(info.base_name)
            if match and info.type == pafs.FileType.File:
                first, end = int(match.group(1)), int(match.group(2))
                if end > first and end > found.get(first, (-1, ""))[0]:
                    found[first] = (end, info.base_name)
        return found

    def _all(self) -> list[dict[str, Any]]:
        if self._logs is None:
            logs = _lines(read_file(self.uri) or b"")  # a journal written whole by an earlier version
            self._chunked = len(logs)
            segments = self._segments()
            while len(logs) in segments:
                end, name = segments[len(logs)]
                data = read_file(f"{self.folder}/{name}")
                if data is None:
                    break
                part = _lines(data)
                if len(part) != end - len(logs):
                    raise ValueError(f"{self.folder}/{name}: {len(part)} logs where its name says {end - len(logs)}")
                logs += part
                if len(part) >= CHUNK_LOGS:
                    self._chunked = end
            self._logs = logs
        return self._logs

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self._all()[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        cached = self._all()
        first, end = len(cached), len(cached) + len(logs)
        _put(f"{self.folder}/{first:012d}-{end:012d}.jsonl", _encode(list(logs)))
        cached += logs
        if end - self._chunked >= CHUNK_LOGS:  # the logs since the last chunk, as one object
            _put(f"{self.folder}/{self._chunked:012d}-{end:012d}.jsonl", _encode(cached[self._chunked:end]))
            self._chunked = end


class UnsyncedJournalFileBackend(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file, appended under its lock, without an fsync per append.

    Optuna syncs every append to the disk. The driver appends ~10 times a trial (the trial,
    each suggested parameter, attributes, the tell) on the one thread that also starts the
    next trial, so at N = 400 tiny trials the syncs were 10-12 % of the driver's time, and
    a slot waited on each (issue 24). Without them, a killed driver loses nothing: its writes
    are in the operating system's cache, which every other process reads. A power loss can
    lose the last appends, as it can the last MLflow commits (tracking/sqlite_wal.py) and
    Ray's last snapshot; the resume then runs those lineages again from the store.
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with get_lock_file(self._lock), open(self._file_path, "ab") as handle:
            handle.write(text.encode("utf-8"))


def journal_storage(uri: str) -> optuna.storages.BaseStorage:
    """The study storage at `uri`: survives a killed driver, needs no database server."""
    _, filesystem, path = resolve_uri(uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        backend: BaseJournalBackend = UnsyncedJournalFileBackend(path)
    else:
        backend = StoreJournalBackend(uri)
    return optuna.storages.JournalStorage(backend)
