"""The trial record: what one search trial did, kept in the store beside its stages.

It is the contract between the trial (its one writer, `runs/trial.py`), the driver
(final statuses), the summary, `lth-search sync` and the tests, so it is one typed
record with `to_json`/`from_json`, never a dict read by string keys. The JSON layout
is the one earlier versions wrote (records in existing stores still read).

Attempts are kept apart (pid, node, round restored from, stage keys it trained), so
anyone can tell which work a retry or a resumed search recomputed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from lth_search.engine.lineage.metric import metric_named
from lth_search.engine.lineage.results import (
    DenseResult,
    LineageResult,
    RoundResult,
    _known_fields,
)
from lth_search.runs.saved_paths import CONFIG_PATHS, from_saved, state_root, to_saved
from lth_search.store.records import records_namespace
from lth_search.store.stage_store import StageStore


class TrialStatus(str, Enum):
    """Where a trial is. The values are the words stored in records (JSON strings)."""

    RUNNING = "running"
    FINISHED = "finished"
    """Walked its whole lineage."""
    STOPPED = "stopped"
    """Stopped by the scheduler before its lineage ended."""
    ERROR = "error"
    """Failed after its retries."""
    ABANDONED = "abandoned"
    """Started by a driver that was killed before Ray saved it; a replacement ran instead."""

    @property
    def final(self) -> bool:
        return self is not TrialStatus.RUNNING


@dataclass
class Attempt:
    """One process's go at a trial (a Ray retry or a resumed search makes another)."""

    attempt: int
    pid: int
    node_id: str | None
    started_at: float
    restored_round: int
    executed_keys: list[str] = field(default_factory=list)
    steps_executed: int = 0


@dataclass
class RoundRecord(RoundResult):
    """A round as the record keeps it: the result plus the attempt that first reported it."""

    attempt: int = 1


@dataclass
class MatchingRecord:
    """The trial's score at the time of writing (see engine/lineage/objective.py)."""

    sparsity: float
    round: int
    val_accuracy: float
    test_accuracy: float
    metric: str = "accuracy"
    """The metric the lineage was judged on (engine/lineage/metric.py)."""
    val_metric: float | None = None
    """`val_<metric>` at the matching round (None for accuracy: `val_accuracy`)."""
    test_metric: float | None = None


@dataclass
class TrialRecord:
    """One search trial: its choices, config, stages walked, score, status and attempts."""

    search: str
    trial_id: str
    role: str = "search"
    """"search" for a search trial, "confirm" for a confirmation run (kept apart in the store)."""
    search_id: str | None = None
    optuna_trial: int | None = None
    choices: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """The trial's own config (the search config with its choices applied), as JSON."""
    status: TrialStatus = TrialStatus.RUNNING
    dense: DenseResult | None = None
    round_keys: list[str] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    matching: MatchingRecord | None = None
    attempts: list[Attempt] = field(default_factory=list)
    steps_executed: int = 0
    steps_reused: int = 0
    updated_at: float = 0.0

    # Reading ---------------------------------------------------------------------------------
    @property
    def dense_key(self) -> str | None:
        return self.dense.key if self.dense is not None else None

    @property
    def attempt(self) -> int:
        """The number of the current (latest) attempt."""
        return self.attempts[-1].attempt if self.attempts else 0

    def result(self, tolerance: float, patience: int = 1, metric: str = "accuracy") -> LineageResult | None:
        """The LineageResult the trial had when it wrote this record (None before its dense stage)."""
        if self.dense is None:
            return None
        keys = set(self.round_keys)
        rounds = [
            RoundResult.from_json(asdict(r)) for r in sorted(self.rounds, key=lambda r: r.round)
            if not keys or r.key in keys
        ]
        return LineageResult(self.dense, rounds, self.steps_executed, self.steps_reused, tolerance, patience,
                             metric=metric)

    # Writing (the trial) ----------------------------------------------------------------------
    def begin_attempt(self, node_id: str | None, restored_round: int) -> None:
        """Start this process's attempt, after those of earlier processes."""
        self.attempts.append(Attempt(
            attempt=self.attempt + 1, pid=os.getpid(), node_id=node_id, started_at=time.time(),
            restored_round=restored_round,
        ))
        self.status = TrialStatus.RUNNING

    def update(self, result: LineageResult) -> None:
        """Take the lineage's state after a stage (the current attempt's work included)."""
        current = self.attempts[-1]
        current.steps_executed = result.steps_executed
        current.executed_keys = result.executed_keys
        known = {r.key: r for r in self.rounds}
        self.rounds = [
            known.get(item.key) or RoundRecord(**asdict(item), attempt=current.attempt) for item in result.rounds
        ]
        self.dense = result.dense
        self.round_keys = [r.key for r in result.rounds]
        best = result.best
        metric = metric_named(result.metric)
        values = result.metric_values(result.matching_stage)
        self.matching = MatchingRecord(best.sparsity, best.round, best.val_accuracy, result.matching_test_accuracy,
                                       result.metric, values.get(metric.val_key), values.get(metric.test_key))
        total = result.dense.steps * result.dense.replicates + sum(r.steps for r in result.rounds)
        self.steps_executed = sum(a.steps_executed for a in self.attempts)
        self.steps_reused = max(0, total - self.steps_executed)
        self.updated_at = time.time()

    # JSON --------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record as JSON. The config and choices are the record's own dicts, not copies
        (`dataclasses.asdict` copied the whole config at every save, four times a trial): write
        the JSON out, do not change it."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(
            status=self.status.value, dense=asdict(self.dense) if self.dense is not None else None,
            rounds=[asdict(r) for r in self.rounds], matching=asdict(self.matching) if self.matching else None,
            attempts=[asdict(a) for a in self.attempts], round_keys=list(self.round_keys), dense_key=self.dense_key,
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrialRecord":
        """A record from its JSON; raises ValueError (naming the trial) when it is not one."""
        try:
            values = _known_fields(cls, data)
            values["status"] = TrialStatus(data.get("status", "running"))
            values["dense"] = DenseResult.from_json(data["dense"]) if data.get("dense") else None
            values["rounds"] = [RoundRecord(**_known_fields(RoundRecord, r)) for r in data.get("rounds") or []]
            values["matching"] = MatchingRecord(**data["matching"]) if data.get("matching") else None
            values["attempts"] = [Attempt(**_known_fields(Attempt, a)) for a in data.get("attempts") or []]
            return cls(**values)
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"trial record {data.get('trial_id')!r} is not a trial record ({error})") from None

    # Store --------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, store: StageStore, search: str, trial_id: str, search_id: str | None, optuna_trial: int | None,
        choices: dict[str, Any], config: dict[str, Any], role: str = "search",
    ) -> "TrialRecord":
        """The trial's record: the one in the store (a retry, a resumed search) or a new one."""
        record = cls.load(store, search, trial_id, role) or cls(search=search, trial_id=trial_id, role=role)
        record.search_id, record.optuna_trial, record.choices, record.config = search_id, optuna_trial, choices, config
        return record

    def save(self, store: StageStore) -> None:
        """Into the store, its config's paths relative to the store's folder (runs/saved_paths.py)."""
        saved = to_saved(self.to_json(), state_root(store.uri), CONFIG_PATHS)
        store.put_record(records_namespace(self.search, self.role), self.trial_id, saved)

    @classmethod
    def load(cls, store: StageStore, search: str, trial_id: str, role: str = "search") -> "TrialRecord | None":
        data = store.record(records_namespace(search, role), trial_id)
        return cls.from_json(from_saved(data, state_root(store.uri))) if data is not None else None

    @classmethod
    def load_all(
        cls, store: StageStore, search: str, search_id: str | None = None, role: str = "search",
        unreadable: list[str] | None = None,
    ) -> list["TrialRecord"]:
        """Every trial record of a search name (of one search id when given), sorted by trial id.

        Damaged records (unreadable JSON, or JSON that is not a trial record) are left out
        and named in `unreadable` when given; without it, the first one raises ValueError.
        The records' configs share their equal parts (`share_equal_parts`): read them, never
        change them in place.
        """
        records, parts = [], {}
        for name, data in store.records(records_namespace(search, role), unreadable).items():
            try:
                records.append(cls.from_json(from_saved(data, state_root(store.uri))))
                records[-1].config = share_equal_parts(records[-1].config, parts)
            except ValueError:
                if unreadable is None:
                    raise
                unreadable.append(name)
        return sorted(
            (r for r in records if search_id is None or r.search_id == search_id), key=lambda r: r.trial_id
        )


def share_equal_parts(value: Any, parts: dict[str, Any]) -> Any:
    """`value` (JSON) with each dict or list equal to one already in `parts` replaced by that one.

    A search's trial records each hold the whole search config with the trial's choices applied:
    ~10 KB of Python objects a record, equal but for a few values. The driver's finish reads every
    record at once, so at 1,000 trials they held ~12 MB of its peak (issue 24); sharing what is equal
    (the data, model, train, tracking sections, the search space) keeps one copy of it.
    """
    if isinstance(value, dict):
        value = {sys.intern(key): share_equal_parts(item, parts) for key, item in value.items()}
    elif isinstance(value, list):
        value = [share_equal_parts(item, parts) for item in value]
    else:
        return value
    return parts.setdefault(json.dumps(value, sort_keys=True, default=str), value)
