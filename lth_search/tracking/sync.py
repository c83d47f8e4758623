"""Bring MLflow up to date with the store: the store holds the truth, MLflow a view of it.

A trial logs to MLflow as it goes; when the tracking server is down those calls fail
(after retries) and the lineage carries on. Its trial record in the store (trial.py:
choices, config, dense result, stage keys, every completed round's RoundResult fields)
and the stages themselves hold everything MLflow should have shown. `reconcile` walks
the records, asks each child run what it holds (metric history, mask artifacts) and
logs only what is missing, with the values, steps and masks an uninterrupted run would
have logged. `SearchTracker.finish` runs it for every trial; `lth-search sync NAME`
runs it later, once the server answers again.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

from lth_search.config import ExperimentConfig, validate_config
from lth_search.engine.lineage.results import LineageResult
from lth_search.errors import TrackingFailure
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.search_lease import SearchLease
from lth_search.runs.state import SearchState, SearchStatus
from lth_search.runs.summary import best_records
from lth_search.store.entry import StageEntry
from lth_search.store.stage_store import StageStore
from lth_search.tracking.describe import search_tags
from lth_search.tracking.layout import COMPLETE, PARENT, STATUS, TRIAL_ID, is_summary_metric, summary_metrics
from lth_search.tracking.parent import log_confirmation, log_search_summary
from lth_search.tracking.search_run import SearchTracker
from lth_search.tracking.trial_run import TERMINAL, TrialTracker, trials_plot_live

log = logging.getLogger(__name__)


class _Stages:
    """Stage entries read from the store on demand (only for what MLflow lacks)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._store: StageStore | None = None

    def get(self, key: str | None) -> StageEntry | None:
        if key is None:
            return None
        if self._store is None:
            self._store = StageStore.from_config(self.cfg)
        entry = self._store.get(key)
        if entry is None:
            log.warning("stage %s is not in the store %s; its mask / weights cannot be logged", key[:12], self.cfg.store_uri())
        return entry


def refresh(search: SearchTracker, records: list[TrialRecord], confirmation: dict[str, Any] | None = None) -> dict[str, int]:
    """Reconcile every trial record with MLflow and rewrite the parent's artifacts.

    `confirmation` (Confirmation.to_json() with the chosen `trial_id`) goes to the parent
    and decides the best ticket. Returns counts of what was logged now (see `reconcile`);
    nothing raises.
    """
    if not search.open():
        return {}
    search.ensure_config()
    counts = reconcile(search, records)
    counts["plots"] = plot_best_trials(search, records)
    if confirmation is not None:
        log_confirmation(search, confirmation)
    log_search_summary(search, sum(len(r.round_keys) for r in records), confirmation and confirmation["trial_id"])
    return counts


def reconcile(search: SearchTracker, records: list[TrialRecord]) -> dict[str, int]:
    """Log, for every trial record, what its child run lacks. Returns counts of what was logged."""
    stages = _Stages(search.cfg)
    counts = {"trials": 0, "dense": 0, "rounds": 0, "summaries": 0}
    complete = _complete_runs(search)
    for record in sorted(records, key=lambda r: r.trial_id):
        logged = [] if _up_to_date(complete.get(record.trial_id), record) else reconcile_trial(search, record, stages)
        counts["trials"] += 1
        counts["dense"] += logged.count("dense")
        counts["rounds"] += sum(item.startswith("round_") for item in logged)
        counts["summaries"] += logged.count("summary")
    return counts


@dataclass(frozen=True)
class _RunView:
    """What `_up_to_date` reads of a complete run: its status and its summary metrics. The whole runs
    (tags with their descriptions, params, data-set inputs) are read a page at a time and not kept, nor
    are a run's other metrics (per-layer sparsities, per-round series' latest values: dozens of names,
    each a new string in every run), kept for every trial of the search until the reconciliation ends
    (issue 24: the driver's peak at the finish)."""

    status_tag: str | None
    run_status: str
    metrics: dict[str, float]


def _complete_runs(search: SearchTracker) -> dict[str, _RunView]:
    """The search's child runs that their trials ended with nothing missing, by trial id, in one query
    per page of runs (client.RUN_PAGE): asking each run what it holds costs ~5 queries a trial at the end
    of a search."""
    if search.parent_run_id is None or search.experiment is None:
        return {}
    tags = {PARENT: search.parent_run_id, COMPLETE: "1"}

    def views() -> dict[str, _RunView]:
        return {run.data.tags.get(TRIAL_ID): _RunView(run.data.tags.get(STATUS), run.info.status, _summary(run))
                for run in search.io.tagged_runs(search.experiment, tags)}

    ok, found = search.io.call("list the trials' runs", views)
    return found if ok else {}


def _summary(run: Any) -> dict[str, float]:
    """A run's summary metrics (`layout.is_summary_metric`), their names shared between runs."""
    return {sys.intern(name): value for name, value in run.data.metrics.items() if is_summary_metric(name)}


def _up_to_date(run: _RunView | None, record: TrialRecord) -> bool:
    """Whether a complete run (`_complete_runs`) already shows this record: ended with its status and its
    summary. A trial the driver stopped or failed after the run ended is reconciled in full."""
    if run is None or record.status not in TERMINAL or run.status_tag != record.status.value:
        return False
    if run.run_status != TERMINAL[record.status]:
        return False
    cfg = validate_config(record.config, source=f"trial record {record.trial_id}")
    result = record.result(cfg.search.tolerance, cfg.prune.patience)
    return result is not None and all(run.metrics.get(k) == v for k, v in summary_metrics(result).items())


def _trial_run(search: SearchTracker, record: TrialRecord) -> tuple[TrialTracker, LineageResult] | None:
    """The trial's child run (found or created) and its lineage so far; None before its dense stage or
    when MLflow does not answer."""
    cfg = validate_config(record.config, source=f"trial record {record.trial_id}")
    cfg.tracking = search.cfg.tracking.model_copy()  # where MLflow is now, not where it was
    result = record.result(cfg.search.tolerance, cfg.prune.patience, cfg.verdict_metric())
    if result is None:
        return None
    tracker = TrialTracker(cfg, search.parent_run_id, record.trial_id, record.choices, search.io,
                           tags=search_tags(record.search_id, record.optuna_trial))
    return (tracker, result) if tracker.ensure_run() else None


def reconcile_trial(search: SearchTracker, record: TrialRecord, stages: _Stages) -> list[str]:
    """Bring one trial's child run up to date; returns what was logged (dense, round_N, summary)."""
    found = _trial_run(search, record)
    if found is None:
        return []
    tracker, result = found
    if tracker.needs_dense():
        tracker.log_dense(result, stages.get(record.dense_key) if tracker.needs_dense_stage() else None)
    for round_result in result.rounds:
        if tracker.needs_round(round_result.round):
            entry = stages.get(round_result.key) if tracker.needs_round_stage(round_result.round) else None
            tracker.log_round(round_result, entry)
    tracker.flush()
    if record.status in TERMINAL and _needs_finish(tracker, result, record.status):
        tracker.finish(result, record.status)
    return tracker.logged


def plot_best_trials(search: SearchTracker, records: list[TrialRecord]) -> int:
    """Plot the best `tracking.trial_plots` trials of a search too large for every trial to plot itself
    (trial_run.py `trials_plot_live`), those that lack their plot; returns how many were drawn."""
    cfg = search.cfg
    if trials_plot_live(cfg):
        return 0
    drawn = 0
    for record in best_records(records, cfg.tracking.trial_plots):
        found = _trial_run(search, record)
        if found is not None and not found[0].state.plot:
            found[0].plot(found[1])
            drawn += found[0].state.plot
    return drawn


def _needs_finish(tracker: TrialTracker, result, status: TrialStatus) -> bool:
    changed = any(tracker.state.metrics.get(k) != v for k, v in summary_metrics(result).items())
    return bool(tracker.logged) or changed or tracker.state.status != TERMINAL[status]


def sync_search(name: str, output_dir: str | None = None, tracking_uri: str | None = None,
                progress: Callable[[str], None] = print, store_uri: str | None = None) -> dict[str, int]:
    """Log to MLflow every trial-round the store holds for search `name` and MLflow lacks.

    Then the parent's tickets table, plot and summary are rewritten, and a finished
    search's run is ended. Raises TrackingFailure (exit 1) when MLflow still does not answer or a record cannot be read.

    It holds the search's driver lease (runs/search_lease.py) while it writes, so it is refused in
    one line (SearchBusy, exit 1) while a driver runs the search: that driver's trials log as they
    go and its finish reconciles the same way, and two writers would log a round twice or rewrite
    the parent's tables under each other.
    """
    state = SearchState.load(name, output_dir, store_uri=store_uri)
    cfg = state.cfg().absolute()
    cfg.tracking.enabled = True
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    store = StageStore.from_config(cfg)
    with SearchLease(store, name, "sync"):
        return _sync(name, state, cfg, store, progress)


def _sync(name: str, state: SearchState, cfg: ExperimentConfig, store: StageStore,
          progress: Callable[[str], None]) -> dict[str, int]:
    unreadable: list[str] = []
    records = TrialRecord.load_all(store, name, state.search_id, unreadable=unreadable)
    progress(f"sync {name}: {len(records)} trial record(s) in {cfg.store_uri()} -> MLflow at {cfg.tracking_uri()}")
    search = SearchTracker.start(cfg, state.results_path, state.parent_run_id)
    if search.parent_run_id is None:
        raise TrackingFailure(f"MLflow at {cfg.tracking_uri()} does not answer; nothing was synced, try again later")
    if search.parent_run_id != state.parent_run_id:  # remembered: the next sync continues this run
        state.parent_run_id = search.parent_run_id
        state.save()
    counts = refresh(search, records, state.confirmation)
    if state.status is SearchStatus.FINISHED:
        search.end()
    if unreadable:
        raise TrackingFailure(
            f"sync {name}: {len(unreadable)} trial record(s) in {cfg.store_uri()} cannot be read "
            f"({', '.join(sorted(unreadable)[:5])}); the other {len(records)} were synced"
        )
    if search.missed:
        raise TrackingFailure(
            f"sync {name}: {len(search.missed)} MLflow call(s) failed (first: {search.missed[0]}); run it again"
        )
    progress(
        f"sync {name}: logged {counts.get('rounds', 0)} round(s), {counts.get('dense', 0)} dense stage(s), "
        f"{counts.get('summaries', 0)} summary(ies) over {counts.get('trials', 0)} trial(s); MLflow is up to date"
    )
    return counts
