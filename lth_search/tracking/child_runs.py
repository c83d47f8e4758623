"""What a search's finish (and `lth-search sync`) reads of its child runs: one pass over them.

The finish needs three things of every trial run: whether it already shows its trial record
(a complete run's status and summary metrics: sync.py skips it), where it is (its run id and
artifact folder: the best trials' plots go there), and its ticket rows (the parent's tickets
table). Each used to be its own listing of every child run: at 1,000 trials the complete runs
took 2.4 s, the 20 best-trial plots' tag searches and artifact listings ~2 s, and the tickets
table 3.7 s, in the 13 s finish on one core (issue 24). One pass reads the runs a page at a
time with their metric histories (ticket_table.py `runs_with_rows`) and keeps only these
three small views; a run that the reconciliation then logs to is read again by itself
(`reread`), so the table is what MLflow holds once the finish is done.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from lth_search.tracking.client import RUN_PAGE
from lth_search.tracking.layout import COMPLETE, STATUS, TRIAL_ID, is_summary_metric
from lth_search.tracking.search_run import SearchTracker
from lth_search.tracking.ticket_table import SearchRef, run_rows, runs_with_rows, sort_rows


@dataclass(frozen=True)
class RunView:
    """What sync.py `_up_to_date` reads of a complete run: its status and its summary metrics. A whole
    run (tags with their descriptions, params, data-set inputs, its other metrics: dozens of names,
    each a new string in every run) is not kept for every trial of the search (issue 24: the
    driver's peak at the finish)."""

    status_tag: str | None
    run_status: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunPlace:
    """Where a trial's newest run is: what its plot needs to be uploaded without a search by tag."""

    run_id: str
    artifact_uri: str


@dataclass
class ChildRuns:
    """The search's child runs as the finish reads them (module docstring)."""

    complete: dict[str, RunView] = field(default_factory=dict)
    """By trial id: runs their trial ended with nothing missing (the COMPLETE tag)."""
    places: dict[str, RunPlace] = field(default_factory=dict)
    """By trial id: the trial's newest run."""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """By run id: its ticket rows (ticket_table.py `run_rows`)."""

    def tickets(self) -> list[dict[str, Any]]:
        """Every ticket row, in ticket_table.py `ticket_rows`' order."""
        return sort_rows([row for rows in self.rows.values() for row in rows])


def _summary(run: Any) -> dict[str, float]:
    """A run's summary metrics (`layout.is_summary_metric`), their names shared between runs."""
    return {sys.intern(name): value for name, value in run.data.metrics.items() if is_summary_metric(name)}


def read_child_runs(search: SearchTracker) -> ChildRuns | None:
    """The search's child runs in one pass; None when MLflow does not answer (then each part reads
    what it needs itself, and fails the way it did alone)."""
    if search.parent_run_id is None or search.experiment is None:
        return None
    ref = SearchRef(search.cfg.experiment_name(), search.experiment, search.parent_run_id)

    def read() -> ChildRuns:
        children = ChildRuns()
        for run, rows in runs_with_rows(search.io.client, ref):  # oldest first: the newest place wins
            tags, trial_id = run.data.tags, run.data.tags.get(TRIAL_ID)
            children.rows[run.info.run_id] = rows
            if trial_id is not None:
                children.places[trial_id] = RunPlace(run.info.run_id, run.info.artifact_uri)
                if tags.get(COMPLETE) == "1":
                    children.complete[trial_id] = RunView(tags.get(STATUS), run.info.status, _summary(run))
        return children

    ok, found = search.io.call("read the trials' runs", read)
    return found if ok else None


def reread(search: SearchTracker, children: ChildRuns, run_ids: set[str]) -> bool:
    """Read again the ticket rows of runs the finish logged to (or created); False when MLflow fails or
    there are more than a page of them (a sync after an outage: then the table is read again whole, in
    one query per page and metric rather than a few per run)."""
    if len(run_ids) > RUN_PAGE:
        return False
    client = search.io.client

    def read() -> None:
        for run_id in run_ids:
            children.rows[run_id] = run_rows(client, client.get_run(run_id))

    ok, _ = search.io.call("read the trials' runs again", read)
    return ok
