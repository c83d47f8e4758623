"""A moved or copied `lth_runs/` finds its MLflow artifacts again, and a copy writes only to itself.

MLflow keeps artifact locations as absolute URIs in its database (`file:///old/lth_runs/
mlartifacts/<experiment>/<run>/artifacts`): the sqlite store resolves any relative
location against the current folder when it is created, and has no notion of a
location relative to the database. Local searches keep their artifacts beside the
database (`<db folder>/mlartifacts/`, tracking/client.py `artifact_root_for`), so a
folder that was moved keeps them, only under another prefix.

`reroot_artifacts(uri)` rewrites that prefix when it is stale: when an experiment's
artifact folder is `<old>/mlartifacts/<name>`, `<old>` is not where the database now is,
and `<db folder>/mlartifacts/<name>` exists. That covers a move (the old folder is gone)
and a copy (`cp -a OUT COPY`: the copy's database named OUT's artifacts, so a resume or
sync in COPY would have written its masks and plots into OUT). Every
lth-search command that opens a sqlite tracking URI calls it first (`new_client`), so
`lth-search best` / `tickets` / `sync` / `resume` on the moved folder work, and so do
`mlflow ui` and `mlflow.pyfunc.load_model` afterwards. Nothing outside the database's
own folder is ever named. MLflow's per-process cache of artifact repositories is keyed
by run id alone, so it is cleared after a rewrite (a copy holds its original's run ids).
Server-backed tracking (`mlflow server --serve-artifacts`,
`mlflow-artifacts:/` locations) needs none of this: its locations are relative to the
server's `--artifacts-destination` already.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from lth_search.tracking.sqlite_wal import sqlite_path

log = logging.getLogger(__name__)

ARTIFACT_FOLDER = "mlartifacts"
COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
"""Where MLflow 3's sqlite schema keeps artifact URIs."""


def _database(uri: str) -> Path | None:
    path = sqlite_path(uri)
    return path if path is not None and path.is_file() else None


def _stale_roots(connection: sqlite3.Connection, here: Path) -> set[Path]:
    """The old `.../mlartifacts` folders the experiments name instead of `here`."""
    stale = set()
    for (location,) in connection.execute("SELECT artifact_location FROM experiments"):
        if not location or not location.startswith("file://"):
            continue
        path = Path(unquote(urlparse(location).path))
        root = path.parent
        if root.name == ARTIFACT_FOLDER and root != here and (here / path.name).exists():
            stale.add(root)
    return stale


def _like(prefix: str) -> str:
    """`prefix` as a LIKE pattern matching itself followed by `/...` (escape: backslash)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"


def reroot_artifacts(uri: str) -> int:
    """Point a moved sqlite database's artifact locations at its own `mlartifacts/`; returns rows changed.

    A no-op (0) for any other URI, a database where nothing is stale, or one MLflow never
    wrote. Failures (a locked or read-only database) are warned about, never raised:
    the caller then sees MLflow's own error for the artifact it cannot find.
    """
    database = _database(uri)
    if database is None:
        return 0
    here = (database.parent / ARTIFACT_FOLDER).resolve()
    try:
        with sqlite3.connect(database, timeout=30) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "experiments" not in tables:
                return 0
            changed = 0
            for old in _stale_roots(connection, here):
                old_uri, new_uri = old.as_uri(), here.as_uri()
                for table, column in COLUMNS:
                    if table not in tables:
                        continue
                    cursor = connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} LIKE ? ESCAPE '\\'",
                        (new_uri, len(old_uri) + 1, _like(old_uri)),
                    )
                    changed += cursor.rowcount
                log.warning("MLflow database %s was moved or copied: its artifact locations now point to %s "
                            "(were %s)", database, here, old)
        if changed:
            _forget_artifact_repositories()
        return changed
    except sqlite3.DatabaseError as error:
        if "not a database" in str(error):
            return 0  # not MLflow's: MLflow itself says so, in one line
        log.warning("MLflow database %s: cannot point its artifact locations at %s (%s)", database, here, error)
        return 0


def _forget_artifact_repositories() -> None:
    """Drop MLflow's per-process cache of artifact repositories, which is keyed by run id alone."""
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.clear()
