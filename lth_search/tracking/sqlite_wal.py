"""A local MLflow database that commits without waiting for the disk: SQLite's write-ahead log.

Every MLflow request is a transaction. In SQLite's default (rollback-journal) mode each
commit syncs the journal and the database to disk, two or three fsyncs; every trial's
worker and the driver commit to the same `mlflow.db`, and on 2 cores a commit cost
~27-35 ms of wall time (a 30-metric `log_batch`; ~14 ms in WAL mode, measured side by
side on this machine at load ~7), paid in a trial's slot. In WAL mode with
`synchronous=NORMAL` a commit appends to `mlflow.db-wal` and syncs only at checkpoints;
readers do not block the writer.

What it gives up: a commit survives a crash of any process (a killed trial, a killed
driver), but the last ones may roll back on a power loss or a kernel crash; the database is
never corrupted. MLflow is a view here: the store holds the truth and `lth-search sync`
logs whatever MLflow missed. WAL needs the database's folder on a local disk (its index is
shared memory); a sqlite tracking URI on a network filesystem was never safe, and a cluster
tracks to `mlflow server` (cluster/README.md).

`use_wal` turns it on for a database (a setting kept in the file itself) when lth-search
first opens it; `commit_without_fsync` makes this process's SQLAlchemy connections to a
database in WAL mode use `synchronous=NORMAL` (a setting of each connection, SQLite's
default being FULL). `checkpoint` folds the log back into `mlflow.db` when a search ends,
so the file alone is whole again (`mlflow.db-wal` is otherwise part of the database, and a
copy of `mlflow.db` alone would miss what is in it).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import unquote

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (query removed, %-escapes undone), else None."""
    if not uri.startswith(SQLITE):
        return None
    return Path(unquote(uri[len(SQLITE):].split("?", 1)[0]))


_installed = threading.Lock()
_done = False


def use_wal(database: Path) -> bool:
    """Put `database` in WAL mode (kept in the file); False when it could not be (left as it was).

    Switching needs no other connection in a transaction; a busy database stays in its mode,
    which is as correct, only slower."""
    try:
        with closing(sqlite3.connect(database, timeout=5)) as connection:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error as error:
        log.debug("%s: journal mode left as it was (%s)", database, error)
        return False
    return str(mode).lower() == "wal"


def _normal_sync_in_wal(dbapi_connection: Any, _record: Any) -> None:
    """SQLAlchemy `connect` listener: synchronous=NORMAL on a SQLite connection in WAL mode only
    (in rollback-journal mode NORMAL could corrupt the file on a power loss)."""
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error:  # not a database: MLflow's first query says so, in its own words
        pass
    finally:
        cursor.close()


def commit_without_fsync() -> None:
    """Install the listener for every SQLAlchemy engine of this process (once); before MLflow
    opens a store, so each of its connections gets it."""
    global _done
    with _installed:
        if _done:
            return
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "connect", _normal_sync_in_wal)
        _done = True


def checkpoint(database: Path) -> None:
    """Fold the write-ahead log into the database file and empty it (best effort: a reader
    still open keeps part of it, and the log stays a valid part of the database)."""
    if not database.exists():
        return
    try:
        with closing(sqlite3.connect(database, timeout=5)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:
        log.debug("%s: write-ahead log not folded in (%s)", database, error)
