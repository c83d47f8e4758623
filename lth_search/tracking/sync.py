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
from lth_search.tracking.child_runs import ChildRuns, RunPlace, RunView, read_child_runs, reread
from lth_search.tracking.describe import search_tags
from lth_search.tracking.layout import INFERENCE_METRICS, LINEAGE_PLOT, summary_metrics
from lth_search.tracking.parent import log_confirmation, log_search_summary
from lth_search.tracking.search_run import SearchTracker
from lth_search.tracking.ticket_table import inference_column
from lth_search.tracking.trial_run import TERMINAL, TrialTracker, trials_detailed_live

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
    nothing raises. The child runs are read once for all three (child_runs.py).
    """
    if not search.open():
        return {}
    search.ensure_config()
    children = read_child_runs(search)
    counts, touched = reconcile(search, records, children.complete if children is not None else {})
    chosen = confirmation and confirmation["trial_id"]
    detailed = detailed_trials(search.cfg, records, chosen)
    touched |= time_best_trials(search, detailed, children)
    places = children.places if children is not None else {}
    rows = children.tickets() if children is not None and reread(search, children, touched) else None
    del children  # the driver's peak is at the finish: nothing is held longer than it is needed
    if confirmation is not None:
        log_confirmation(search, confirmation)
    log_search_summary(search, sum(len(r.round_keys) for r in records), chosen, rows)
    del rows
    counts["plots"] = plot_best_trials(search, detailed, places)
    return counts


def reconcile(search: SearchTracker, records: list[TrialRecord],
              complete: dict[str, RunView]) -> tuple[dict[str, int], set[str]]:
    """Log, for every trial record, what its child run lacks (`complete`: the runs that may already
    show theirs, child_runs.py). Returns counts of what was logged and the runs it opened (what they
    show may have changed)."""
    stages = _Stages(search.cfg)
    counts = {"trials": 0, "dense": 0, "rounds": 0, "summaries": 0}
    touched: set[str] = set()
    for record in sorted(records, key=lambda r: r.trial_id):
        tracker = None if _up_to_date(complete.get(record.trial_id), record) else reconcile_trial(search, record, stages)
        logged: list[str] = []
        if tracker is not None:  # an opened run (reconcile_trial returns only those): its rows may have changed
            logged = tracker.logged
            touched.add(tracker.run_id)
        counts["trials"] += 1
        counts["dense"] += logged.count("dense")
        counts["rounds"] += sum(item.startswith("round_") for item in logged)
        counts["summaries"] += logged.count("summary")
    return counts, touched


def _up_to_date(run: RunView | None, record: TrialRecord) -> bool:
    """Whether a complete run (child_runs.py) already shows this record: ended with its status and its
    summary. A trial the driver stopped or failed after the run ended is reconciled in full."""
    if run is None or record.status not in TERMINAL or run.status_tag != record.status.value:
        return False
    if run.run_status != TERMINAL[record.status]:
        return False
    cfg = validate_config(record.config, source=f"trial record {record.trial_id}")
    result = record.result(cfg.search.tolerance, cfg.prune.patience)
    return result is not None and all(run.metrics.get(k) == v for k, v in summary_metrics(result).items())


def _tracker(search: SearchTracker, record: TrialRecord) -> tuple[TrialTracker, LineageResult] | None:
    """The tracker of the trial's child run (not opened yet) and its lineage so far; None before its
    dense stage."""
    cfg = validate_config(record.config, source=f"trial record {record.trial_id}")
    cfg.tracking = search.cfg.tracking.model_copy()  # where MLflow is now, not where it was
    result = record.result(cfg.search.tolerance, cfg.prune.patience, cfg.verdict_metric())
    if result is None:
        return None
    tracker = TrialTracker(cfg, search.parent_run_id, record.trial_id, record.choices, search.io,
                           tags=search_tags(record.search_id, record.optuna_trial))
    return tracker, result


def _trial_run(search: SearchTracker, record: TrialRecord) -> tuple[TrialTracker, LineageResult] | None:
    """The trial's child run (found or created, with what it holds) and its lineage so far; None before
    its dense stage or when MLflow does not answer."""
    found = _tracker(search, record)
    return found if found is not None and found[0].ensure_run() else None


def _placed_run(search: SearchTracker, record: TrialRecord,
                place: RunPlace | None) -> tuple[TrialTracker, LineageResult] | None:
    """`_trial_run` for drawing its plot: at a place the finish already read (child_runs.py), the run
    is opened there and asked only whether it has its plot (one listing, not a search by tag and the
    five reads of everything it holds)."""
    if place is None:
        return _trial_run(search, record)
    found = _tracker_at(search, record, place)
    if found is None:
        return None
    io = search.io
    ok, names = io.call(f"list the plots of trial {record.trial_id}",
                        lambda: io.artifact_names(place.run_id, LINEAGE_PLOT.rsplit("/", 1)[0]))
    if not ok:
        return None
    found[0].state.plot = LINEAGE_PLOT in names
    return found


def _tracker_at(search: SearchTracker, record: TrialRecord,
                place: RunPlace) -> tuple[TrialTracker, LineageResult] | None:
    """`_tracker`, its run the one at `place` (no search by tag, nothing it holds read)."""
    found = _tracker(search, record)
    if found is not None:
        found[0].run_id, found[0].artifact_uri = place.run_id, place.artifact_uri
    return found


def reconcile_trial(search: SearchTracker, record: TrialRecord, stages: _Stages) -> TrialTracker | None:
    """Bring one trial's child run up to date; returns its tracker (`logged`: what was logged, dense,
    round_N, summary), None before its dense stage or when MLflow does not answer."""
    found = _trial_run(search, record)
    if found is None:
        return None
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
    return tracker


def detailed_trials(cfg: ExperimentConfig, records: list[TrialRecord], chosen: str | None) -> list[TrialRecord]:
    """The trials a search too large for every trial to plot itself and time its inference gains as it
    ends (trial_run.py `trials_detailed_live`) does both for at its finish: its best `tracking.trial_plots`
    (runs/best.py's order), then the trial its confirmation `chosen` if it is not among them (the
    default recipe can win the confirmation from outside the best few on val). [] for a smaller search."""
    if trials_detailed_live(cfg):
        return []
    best = best_records(records, cfg.tracking.trial_plots)
    if chosen is None or chosen in {record.trial_id for record in best}:
        return best
    return best + [record for record in records if record.trial_id == chosen][:1]


def time_best_trials(search: SearchTracker, detailed: list[TrialRecord], children: ChildRuns | None) -> set[str]:
    """Time the rounds' inference gains of the `detailed` trials (`detailed_trials`), those whose runs
    lack them; returns the runs given them. Before the tickets table is read, so that its rows and
    `best` show them. `children`: the trials' runs as the finish read them (child_runs.py); None when
    MLflow did not answer then, and the gains are left to `lth-search sync`."""
    if not search.cfg.tracking.measure_inference or children is None:
        return set()
    stages = _Stages(search.cfg)
    timed = set()
    for record in detailed:
        place = children.places.get(record.trial_id)
        if place is None or _has_gains(children.rows.get(place.run_id)):
            continue
        found = _tracker_at(search, record, place)
        if found is not None and found[0].log_gains(found[1], stages.get):
            timed.add(place.run_id)
    return timed


def plot_best_trials(search: SearchTracker, detailed: list[TrialRecord], places: dict[str, RunPlace]) -> int:
    """Plot the `detailed` trials (`detailed_trials`), those that lack their plot; returns how many were
    drawn. `places`: the trials' runs as the finish read them (child_runs.py), by trial id."""
    drawn = 0
    for record in detailed:
        found = _placed_run(search, record, places.get(record.trial_id))
        if found is not None and not found[0].state.plot:
            found[0].plot(found[1])
            drawn += found[0].state.plot
    return drawn


def _has_gains(rows: list[dict[str, Any]] | None) -> bool:
    """Whether a run's ticket rows (ticket_table.py) show inference gains at some round."""
    return any(row.get(inference_column(name)) is not None for row in rows or [] for name in INFERENCE_METRICS)


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
