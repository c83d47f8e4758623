"""A copied or moved sqlite MLflow database keeps its artifacts beside itself.

lth-search puts an experiment's artifacts beside its sqlite database
(`<folder>/mlartifacts/<experiment>`, client.py `artifact_root_for`), but MLflow stores
that location, and every run's artifact URI, as absolute URIs. After `cp -a OUT COPY`
the copy's database still names OUT's artifact folder, so a resumed search or a sync
in COPY would write its masks and plots into OUT; after `mv OUT NEW` into a folder
that is gone. MLflow has no API to move an artifact root, so before the database is
written to, the artifact locations under the old `<folder>/mlartifacts/` are pointed
at the database's own folder, in one transaction. A database whose artifacts live
elsewhere (a server, a location chosen by hand) is left alone.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARTIFACTS = "mlartifacts"
COLUMNS = (
    ("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
    ("model_versions", "source"), ("model_versions", "storage_location"),
)
"""Where MLflow 3.17's schema keeps artifact URIs (tables absent from a schema are skipped)."""


def follow_moved_database(uri: str, experiment: Any) -> bool:
    """Point the artifact URIs of a moved sqlite database back beside it; True if it was moved.

    `experiment` is the MLflow Experiment whose `artifact_location` tells where the
    database was when the experiment was made (`<old folder>/mlartifacts/<name>`).
    """
    if not uri.startswith("sqlite:///"):
        return False
    database = Path(uri[len("sqlite:///"):])
    old = str(getattr(experiment, "artifact_location", "") or "")
    suffix = f"/{ARTIFACTS}/{experiment.name}"
    new_root = (database.parent / ARTIFACTS).as_uri() + "/"
    if not old.startswith("file://") or not old.endswith(suffix) or old == new_root + experiment.name:
        return False
    old_root = old[: -len(experiment.name)]
    with sqlite3.connect(database, timeout=30) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in COLUMNS:
            if table in tables:
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (new_root, len(old_root) + 1, len(old_root), old_root),
                )
    _forget_artifact_repositories()
    log.info("MLflow database %s was moved: its artifacts are now under %s", database, new_root)
    return True


def _forget_artifact_repositories() -> None:
    """Drop MLflow's per-process cache of artifact repositories, which is keyed by run id alone.

    A copied database holds the same run ids as its original: a process that wrote to
    the original (a notebook, the tests) would otherwise keep writing there.
    """
    from mlflow.tracking._tracking_service import utils

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.clear()
