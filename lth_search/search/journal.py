"""Where a search's Optuna study lives: a journal file on the store's storage.

A local path (the default store) uses Optuna's own `JournalFileBackend`, with its file
locks. Any other store URI (s3://, gs://, local://, sftp://, ...) uses
`StoreJournalBackend`: the same append-only log of JSON lines, kept as one object that
is rewritten (atomically) on every append. Object stores cannot append, and the journal
is small (a few KB per trial), so rewriting it costs one PUT per Optuna call.

Process safety, as Optuna's `BaseJournalBackend` asks: only the search driver writes
the journal (Ray's OptunaSearch runs in the driver), and a resumed driver starts after
the old one died, so one writer at a time holds; readers see whole versions only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import optuna
import pyarrow.fs as pafs
from optuna.storages.journal import BaseJournalBackend

from lth_search.store.uri import read_file, resolve_uri, write_file


class StoreJournalBackend(BaseJournalBackend):
    """An Optuna journal as one JSON-lines object at a store URI (see the module docstring)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._logs: list[dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "_logs": None}  # Ray pickles the searcher: reread the journal after a restore

    def _all(self) -> list[dict[str, Any]]:
        if self._logs is None:
            data = read_file(self.uri) or b""
            self._logs = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return self._logs

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        return self._all()[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        updated = self._all() + list(logs)
        write_file(self.uri, "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in updated).encode())
        self._logs = updated


def journal_storage(uri: str) -> optuna.storages.BaseStorage:
    """The study storage at `uri`: survives a killed driver, needs no database server."""
    _, filesystem, path = resolve_uri(uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        backend: BaseJournalBackend = optuna.storages.journal.JournalFileBackend(path)
    else:
        backend = StoreJournalBackend(uri)
    return optuna.storages.JournalStorage(backend)
