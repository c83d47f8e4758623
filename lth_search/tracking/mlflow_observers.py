"""MLflow as a search's observer: what `api` hands the search driver (runs/observers.py).

The driver knows only the protocols; these classes put the parent run (SearchTracker),
the trials' child runs (TrialTracker.start, shipped to Ray workers by reference) and the
end-of-search reconciliation (sync.refresh) behind them.
"""

from __future__ import annotations

from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.runs.record import TrialRecord
from lth_search.tracking.links import experiment_id, ui_links
from lth_search.tracking.search_run import SearchTracker
from lth_search.tracking.sqlite_wal import checkpoint, sqlite_path
from lth_search.tracking.sync import refresh
from lth_search.tracking.trial_run import TrialTracker


class MlflowSearch:
    """The parent run of one search (SearchObserver)."""

    def __init__(self, tracker: SearchTracker) -> None:
        self.tracker = tracker

    @property
    def parent_run_id(self) -> str | None:
        return self.tracker.parent_run_id

    def finish(self, records: list[TrialRecord], confirmation: dict[str, Any] | None = None) -> None:
        refresh(self.tracker, records, confirmation)
        self.tracker.end()
        database = sqlite_path(self.tracker.cfg.tracking_uri())
        if database is not None:  # mlflow.db whole again without its write-ahead log
            checkpoint(database)

    def links(self) -> dict[str, Any]:
        cfg = self.tracker.cfg
        uri = cfg.tracking_uri()
        return {"tracking_uri": uri, "parent_run_id": self.parent_run_id, **ui_links(uri, experiment_id(cfg))}


class MlflowTracking:
    """How a search is tracked in MLflow (SearchTracking)."""

    trial_observer = staticmethod(TrialTracker.start)

    def start(self, cfg: ExperimentConfig, results_path: str, parent_run_id: str | None) -> MlflowSearch:
        return MlflowSearch(SearchTracker.start(cfg, ray_results_path=results_path, parent_run_id=parent_run_id))


def search_tracking(cfg: ExperimentConfig) -> MlflowTracking | None:
    """The tracking of a search with config `cfg` (None when tracking is off)."""
    return MlflowTracking() if cfg.tracking.enabled else None
