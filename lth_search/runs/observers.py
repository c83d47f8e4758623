"""The seams between a search and whoever watches it (tracking), as protocols.

The search package (Ray) and the tracking package (MLflow) never import each other:
`api` builds the MLflow observers (tracking/mlflow_observers.py) and hands them to the search
driver, which only knows these protocols. With tracking off, they are None.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from lth_search.config import ExperimentConfig
from lth_search.engine.lineage.results import LineageResult, RoundResult
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.store.entry import StageEntry


class TrialObserver(Protocol):
    """Logs a trial as it runs (tracking/trial_run.py `TrialTracker` is the MLflow one).

    Every method is idempotent and never raises into the lineage: a retry fills in what
    a dead attempt missed, and what could not be logged is synced from the store later.
    """

    def log_dense(self, result: LineageResult, entry: StageEntry | None) -> None: ...

    def log_round(self, round_result: RoundResult, entry: StageEntry | None) -> None: ...

    def finish(self, result: LineageResult, status: TrialStatus = TrialStatus.FINISHED) -> None: ...

    def flush(self) -> None:
        """Send what was logged and is still queued (a trial that ends without `finish`: stopped early)."""


TrialObserverFactory = Callable[
    [ExperimentConfig, "str | None", str, dict[str, Any], "str | None", "int | None", bool], "TrialObserver | None"
]
"""(trial config, parent run id, trial id, choices, search id, Optuna trial number, first attempt:
the store holds no record of the trial) -> observer; picklable (Ray ships it to workers)."""


class SearchObserver(Protocol):
    """The search's own run (the MLflow parent run), opened before any trial starts."""

    parent_run_id: str | None

    def finish(self, records: list[TrialRecord], confirmation: dict[str, Any] | None = None) -> None:
        """Fill in what trials could not log, write the search's summary and confirmation
        (SearchState.confirmation); end the run."""

    def links(self) -> dict[str, Any]:
        """Where to look: `tracking_uri`, `mlflow_command`, `mlflow_link`, ... for the summary."""


class SearchTracking(Protocol):
    """How a search is tracked: opens the search's run and makes the trials' observers."""

    trial_observer: TrialObserverFactory

    def start(self, cfg: ExperimentConfig, results_path: str, parent_run_id: str | None) -> SearchObserver:
        """Open (or, on resume, find) the search's run."""
