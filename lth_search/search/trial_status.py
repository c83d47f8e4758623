"""Trial statuses: what the driver writes into the trial records, live and after the fact.

Only the driver knows why a trial ended (finished, stopped by the scheduler, failed,
abandoned by a killed driver); the trial itself writes only RUNNING and FINISHED. This
module keeps the records right from Tune's callbacks while the search runs, and from
Ray's saved state at its end or on resume, when a callback's write was lost.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray import tune

from lth_search.config import ExperimentConfig
from lth_search.errors import LthError
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.search.console import SearchConsole
from lth_search.store.stage_store import StageStore


class TrialEvents(tune.Callback):
    """Final trial statuses into the trial records (the lines a person reads: console.py).

    Only the driver knows why a trial ended: a trial the scheduler stops and one cut short
    by an interrupted search both end inside `tune.report`, but only the first gets
    `on_trial_complete`. Ray pickles callbacks into its experiment state and restores
    copies of them on resume, so all state is the config and the console (the store is
    reopened lazily).
    """

    def __init__(self, cfg: ExperimentConfig, console: SearchConsole) -> None:
        self.cfg, self.console = cfg, console
        self._store: StageStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> StageStore:
        if self._store is None:
            self._store = StageStore.from_config(self.cfg)
        return self._store

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = TrialRecord.load(self.store, self.cfg.name, trial.trial_id)
        ended = record is not None and record.status is TrialStatus.FINISHED
        status = TrialStatus.FINISHED if ended else TrialStatus.STOPPED
        self._set_status(trial.trial_id, status)
        self.console.ended(trial, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set_status(trial.trial_id, TrialStatus.ERROR)
        self.console.failed(trial)

    def _set_status(self, trial_id: str, status: TrialStatus) -> None:
        try:
            save_status(self.store, self.cfg.name, trial_id, status)
        except (LthError, OSError, ValueError) as error:  # raised in a Tune callback, it would kill the driver
            self.console.line(f"trial {trial_id}: cannot record status {status.value} now ({error}); "
                          "settled from Ray's state at the end of the search or on resume")


def save_status(store: StageStore, search: str, trial_id: str, status: TrialStatus) -> None:
    record = TrialRecord.load(store, search, trial_id)
    if record is not None and record.status is not status:
        record.status = status
        record.save(store)


def settle(store: StageStore, cfg: ExperimentConfig, records: dict[str, TrialRecord], ended: set[str]) -> None:
    """Final statuses for trials Ray saw end (result `done`) whose record does not say so.

    The callback's write may have failed (disk full) or its driver been killed before it
    ran; Ray's saved state still knows the trial ended. The trial writes FINISHED itself
    when its lineage ends, so an ended trial still marked running was stopped by the
    scheduler. Interrupted trials are never `done` (Ray snapshots before it stops them).
    """
    for trial_id in sorted(ended):
        record = records.get(trial_id)
        if record is not None and not record.status.final:
            save_status(store, cfg.name, trial_id, TrialStatus.STOPPED)
            record.status = TrialStatus.STOPPED


def ray_trials(grid: tune.ResultGrid) -> dict[str, bool]:
    """Every trial Ray knows at the end, by id, with whether it errored.

    A trial that never reported has no `trial_id` metric; its folder name carries the id.
    """
    trials: dict[str, bool] = {}
    for result in grid:
        trial_id = result.metrics.get("trial_id")
        if trial_id is None:
            found = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", Path(result.path).name)
            trial_id = found.group(1) if found else Path(result.path).name
        trials[trial_id] = result.error is not None
    return trials


def ended_trials(grid: tune.ResultGrid) -> dict[str, bool]:
    """Trial id -> whether Ray saw it end (`done`: finished or stopped by the scheduler, not interrupted)."""
    return {r.metrics["trial_id"]: bool(r.metrics.get("done")) for r in grid if "trial_id" in r.metrics}


COUNTED = (TrialStatus.FINISHED, TrialStatus.STOPPED, TrialStatus.ERROR)
"""The statuses of a trial that is one of the search's lineages (the summary counts them)."""


def ended_orphans(records: list[TrialRecord], known: set[str]) -> set[str]:
    """Trials that ended (finished, stopped, errored) though Ray's restored state never had them:
    started by a killed driver after Ray's last snapshot, they ended before it died. They are
    lineages of the search, so they count against its budget as Tune's own trials do (a resumed
    search runs that many fewer: relocation.py); an unfinished one is abandoned instead and a
    replacement runs (`abandon_orphans`)."""
    return {r.trial_id for r in records if r.trial_id not in known and r.status in COUNTED}


def abandon_orphans(store: StageStore, records: dict[str, TrialRecord], known: set[str]) -> None:
    """Mark trials Ray does not know: started by a killed driver after Ray's last snapshot.

    Ray's restored state never had them, so the search ran replacements; their stages
    stay in the store (and were reused), their records say what happened.
    """
    for trial_id, record in records.items():
        if trial_id not in known and not record.status.final:
            record.status = TrialStatus.ABANDONED
            record.save(store)
