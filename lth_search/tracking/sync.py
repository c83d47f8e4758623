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

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from lth_search.config import ExperimentConfig, validate_config
from lth_search.errors import TrackingFailure
from lth_search.runs.state import SearchState
from lth_search.engine.lineage import LineageResult, RoundResult
from lth_search.store.records import records_namespace
from lth_search.store.stages import StageEntry, StageStore
from lth_search.tracking.runs import TERMINAL, SearchTracker, TrialTracker
from lth_search.tracking.layout import summary_metrics

log = logging.getLogger(__name__)

_ROUND_FIELDS = [f.name for f in dataclasses.fields(RoundResult)]


def result_from_record(record: dict[str, Any], cfg: ExperimentConfig) -> LineageResult | None:
    """The LineageResult a trial had when it wrote `record` (None before its dense stage)."""
    dense = record.get("dense")
    if not dense:
        return None
    keys = set(record.get("round_keys") or [])
    rounds = [
        RoundResult(**{name: item[name] for name in _ROUND_FIELDS if name in item})
        for item in sorted(record.get("rounds") or [], key=lambda r: r["round"])
        if not keys or item["key"] in keys
    ]
    return LineageResult(
        dense=dense, rounds=rounds, steps_executed=int(record.get("steps_executed", 0)),
        steps_reused=int(record.get("steps_reused", 0)), tolerance=cfg.search.tolerance,
    )


class _Stages:
    """Stage entries read from the store on demand (only for what MLflow lacks)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._store: StageStore | None = None

    def get(self, key: str) -> StageEntry | None:
        if self._store is None:
            self._store = StageStore.from_config(self.cfg)
        entry = self._store.get(key)
        if entry is None:
            log.warning("stage %s is not in the store %s; its mask / weights cannot be logged", key[:12], self.cfg.store_uri())
        return entry


def reconcile(search: SearchTracker, records: list[dict[str, Any]]) -> dict[str, int]:
    """Log, for every trial record, what its child run lacks. Returns counts of what was logged."""
    stages = _Stages(search.cfg)
    counts = {"trials": 0, "dense": 0, "rounds": 0, "summaries": 0}
    for record in sorted(records, key=lambda r: str(r.get("trial_id"))):
        logged = reconcile_trial(search, record, stages)
        counts["trials"] += 1
        counts["dense"] += logged.count("dense")
        counts["rounds"] += sum(item.startswith("round_") for item in logged)
        counts["summaries"] += logged.count("summary")
    return counts


def reconcile_trial(search: SearchTracker, record: dict[str, Any], stages: _Stages) -> list[str]:
    """Bring one trial's child run up to date; returns what was logged (dense, round_N, summary)."""
    cfg = validate_config(record["config"], source=f"trial record {record.get('trial_id')}")
    cfg.tracking = search.cfg.tracking.model_copy()  # where MLflow is now, not where it was
    result = result_from_record(record, cfg)
    if result is None:
        return []
    tracker = TrialTracker(cfg, search.parent_run_id, str(record["trial_id"]), record.get("choices") or {}, search.io)
    if not tracker.ensure_run():
        return []
    if tracker.needs_dense():
        tracker.log_dense(result, stages.get(record["dense_key"]) if not tracker.state.rewind else None)
    for round_result in result.rounds:
        if tracker.needs_round(round_result.round):
            entry = stages.get(round_result.key) if round_result.round not in tracker.state.masks else None
            tracker.log_round(round_result, entry)
    status = record.get("status")
    if status in TERMINAL and _needs_finish(tracker, result, status):
        tracker.finish(result, status)
    return tracker.logged


def _needs_finish(tracker: TrialTracker, result: LineageResult, status: str) -> bool:
    changed = any(tracker.state.metrics.get(k) != v for k, v in summary_metrics(result).items())
    return bool(tracker.logged) or changed or tracker.state.status != TERMINAL[status]


def read_search_json(name: str, output_dir: str | Path) -> dict[str, Any]:
    """The driver's `<output_dir>/searches/<name>/search.json`, checked (runs/state.py's SearchState)."""
    return dataclasses.asdict(SearchState.load(name, output_dir))


def _save_parent_run_id(name: str, output_dir: str | Path, parent_run_id: str) -> None:
    """Remember the parent run a sync created or found, so the next sync continues it."""
    state = SearchState.load(name, output_dir)
    state.parent_run_id = parent_run_id
    state.save()


def sync_search(name: str, output_dir: str | Path = "./lth_runs", tracking_uri: str | None = None,
                progress: Callable[[str], None] = print) -> dict[str, int]:
    """Log to MLflow every trial-round the store holds for search `name` and MLflow lacks.

    Then the parent's tickets table, plot and summary are rewritten, and a finished
    search's run is ended. Raises TrackingError when MLflow still does not answer.
    """
    meta = read_search_json(name, output_dir)
    cfg = validate_config(meta["config"], source=f"search {name}").absolute()
    cfg.tracking.enabled = True
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    store = StageStore.from_config(cfg)
    search_id = meta.get("search_id")
    unreadable: list[str] = []
    stored = store.records(records_namespace(name), unreadable)
    records = [r for r in stored.values() if search_id is None or r.get("search_id") == search_id]
    progress(f"sync {name}: {len(records)} trial record(s) in {cfg.store_uri()} -> MLflow at {cfg.tracking_uri()}")
    search = SearchTracker.start(cfg, meta.get("results_path") or meta.get("ray_results_path"), meta.get("parent_run_id"))
    if search.parent_run_id is None:
        raise TrackingFailure(f"MLflow at {cfg.tracking_uri()} does not answer; nothing was synced, try again later")
    if search.parent_run_id != meta.get("parent_run_id"):
        _save_parent_run_id(name, output_dir, search.parent_run_id)
    counts = search.refresh(records)
    if meta.get("status") == "finished":
        search.io.call("end the search run", lambda: search.io.client.set_terminated(search.parent_run_id, "FINISHED"))
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
