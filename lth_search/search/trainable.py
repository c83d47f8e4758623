"""One search trial = one IMP lineage, run inside Ray Tune.

The trial walks its lineage through the shared stage store and reports once per round
(`training_iteration` = round) with the running objective, so ASHA and Optuna compare
lineages at equal compute. Its checkpoint is tiny (the last reported round and its
stage key): the store holds the real state, so a retried or resumed trial walks the
lineage again, fetching every finished stage, and reports only rounds it has not
reported yet.

After every stage the trial writes its record (choices, config, stage keys, metrics,
attempts) to the store, which is what summaries and `lth-search sync` read: the store
keeps the truth even when MLflow or the driver is gone.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from lth_search.config import ExperimentConfig, validate_config
from lth_search.engine.data import Dataset
from lth_search.engine.lineage import Lineage, LineageResult, RoundResult
from lth_search.engine.objective import matching
from lth_search.search.ray_leases import RayLeaseService
from lth_search.search.space import OPTUNA_TRIAL_KEY, choices_of
from lth_search.store.records import records_namespace
from lth_search.store.stages import StageStore

CHECKPOINT_FILE = "lineage.json"
PROGRESS_METRICS = ["round", "sparsity", "val_accuracy", "test_accuracy", "matching_sparsity", "reused", "attempt"]
"""What Ray's console shows of each result (everything is still in the results files)."""


def lineage_trial(config: dict[str, Any], base: dict[str, Any], dataset: Dataset, context: dict[str, Any]) -> None:
    """The function trainable (Ray passes `config`; `tune.with_parameters` the rest).

    `base` is the search's config as a dict, `context` holds the search id and the
    MLflow parent run id.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per round is noise
    cfg = validate_config(base, source="search config")
    choices = choices_of(config)
    trial_cfg = cfg.with_choices(choices)
    _limit_resources(trial_cfg)
    trial_id = tune.get_context().get_trial_id()
    done = _checkpointed_round(tune.get_checkpoint())
    if done >= trial_cfg.prune.rounds:
        return  # restored after its last report (a driver killed before Ray saw the trial end)
    store = StageStore(
        trial_cfg.store_uri(),
        lease_timeout_s=trial_cfg.store.lease_timeout_s,
        heartbeat_s=trial_cfg.store.heartbeat_s,
        lease_service=RayLeaseService(cfg.name, owner=f"trial:{trial_id}"),
    )
    record = TrialRecord(store, cfg.name, trial_id, context, choices, config.get(OPTUNA_TRIAL_KEY), trial_cfg, done)
    tracker = _start_tracker(trial_cfg, context, trial_id, choices, config.get(OPTUNA_TRIAL_KEY))
    lineage = Lineage(trial_cfg, store, dataset)
    reporter = _Reporter(trial_cfg, lineage, record, tracker, done)
    # A trial ASHA stops (or an interrupted search) ends inside tune.report (SystemExit),
    # after its record was written; the driver sets the record's final status.
    result = lineage.run(on_round=reporter.on_round, on_dense=reporter.on_dense)
    record.finish(result, "finished")
    if tracker is not None:
        tracker.finish(result)


def _limit_resources(cfg: ExperimentConfig) -> None:
    """Threads to the trial's CPUs; a fractional GPU also caps this process's CUDA memory.

    Ray's fractional GPUs are only bookkeeping: without the cap, trials sharing a GPU
    could take each other's memory.
    """
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    gpu = cfg.resources.gpu
    fraction = cfg.resources.gpu_memory_fraction or (gpu if 0 < gpu < 1 else None)
    if fraction is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


def _checkpointed_round(checkpoint: tune.Checkpoint | None) -> int:
    """The last round this trial already reported (-1: none, 0: the dense-only report)."""
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / CHECKPOINT_FILE).read_text())
    return int(state["round"])


def _start_tracker(cfg: ExperimentConfig, context: dict[str, Any], trial_id: str, choices: dict[str, Any],
                   optuna_trial: int | None) -> Any:
    if not cfg.tracking.enabled:
        return None
    from lth_search.tracking.runs import TrialTracker

    return TrialTracker.start(cfg, context.get("parent_run_id"), trial_id, choices, context.get("search_id"), optuna_trial)


class _Reporter:
    """The lineage callbacks: report to Tune, log to MLflow, record to the store."""

    def __init__(self, cfg: ExperimentConfig, lineage: Lineage, record: "TrialRecord", tracker: Any, done: int):
        self.cfg, self.lineage, self.record, self.tracker, self.done = cfg, lineage, record, tracker, done

    def on_dense(self, result: LineageResult) -> None:
        self.record.update(result, self.lineage)
        if self.tracker is not None:  # idempotent: a retry fills in what a dead attempt missed
            self.tracker.log_dense(result, self.lineage.entries[0])
        if self.cfg.prune.rounds == 0 and self.done < 0:
            self._report(0, result.dense["key"], {"round": 0, "sparsity": 0.0, **_dense_metrics(result)}, result)

    def on_round(self, round_result: RoundResult, result: LineageResult) -> None:
        self.record.update(result, self.lineage)
        if self.tracker is not None:
            self.tracker.log_round(round_result, self.lineage.entries[-1])
        if round_result.round <= self.done:
            return  # reported before a restart; Tune and Optuna already have it
        metrics = {
            "round": round_result.round,
            "sparsity": round_result.sparsity,
            "val_accuracy": round_result.val_accuracy,
            "test_accuracy": round_result.test_accuracy,
            "train_loss": round_result.train_loss,
            "train_steps_per_s": round_result.train_steps_per_s,
            "reused": round_result.reused,
        }
        self._report(round_result.round, round_result.key, metrics, result)

    def _report(self, round_index: int, key: str, metrics: dict[str, Any], result: LineageResult) -> None:
        best = matching(result.dense["val_accuracy"], result.rounds, self.cfg.search.tolerance)
        metrics.update(
            steps_executed=result.steps_executed,
            steps_reused=result.steps_reused,
            dense_val_accuracy=result.dense["val_accuracy"],
            dense_test_accuracy=result.dense["test_accuracy"],
            matching_sparsity=best.sparsity,
            matching_val_accuracy=best.val_accuracy,
            matching_round=best.round,
            attempt=self.record.attempt,
            node_id=ray.get_runtime_context().get_node_id(),
        )
        with tempfile.TemporaryDirectory(prefix="lth-ckpt-") as directory:
            state = {"round": round_index, "key": key, "trial_id": self.record.trial_id}
            (Path(directory) / CHECKPOINT_FILE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _dense_metrics(result: LineageResult) -> dict[str, Any]:
    dense = result.dense
    return {
        "val_accuracy": dense["val_accuracy"],
        "test_accuracy": dense["test_accuracy"],
        "train_loss": dense["train_loss"],
        "train_steps_per_s": dense["train_steps_per_s"],
        "reused": dense["reused"],
    }


class TrialRecord:
    """The trial's JSON record in the store, rewritten after every stage.

    Attempts are kept apart (pid, node, round restored from, stage keys it trained), so
    anyone can tell which work a retry or a resumed search recomputed.
    """

    def __init__(
        self, store: StageStore, search_name: str, trial_id: str, context: dict[str, Any],
        choices: dict[str, Any], optuna_trial: int | None, cfg: ExperimentConfig, restored_round: int,
    ) -> None:
        self.store, self.namespace, self.trial_id = store, records_namespace(search_name), trial_id
        previous = store.record(self.namespace, trial_id) or {}
        self.attempts: list[dict[str, Any]] = list(previous.get("attempts", []))
        self.attempt = len(self.attempts) + 1
        self.attempts.append({
            "attempt": self.attempt,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": time.time(),
            "restored_round": restored_round,
            "executed_keys": [],
            "steps_executed": 0,
        })
        self.rounds: dict[str, dict[str, Any]] = {r["key"]: r for r in previous.get("rounds", [])}
        self.payload: dict[str, Any] = {
            "search": search_name,
            "search_id": context.get("search_id"),
            "trial_id": trial_id,
            "optuna_trial": optuna_trial,
            "choices": choices,
            "config": cfg.model_dump(mode="json"),
            "status": "running",
        }

    def update(self, result: LineageResult, lineage: Lineage) -> None:
        current = self.attempts[-1]
        current["steps_executed"] = result.steps_executed
        current["executed_keys"] = _executed_keys(result)
        for item in result.rounds:
            self.rounds.setdefault(item.key, {**asdict(item), "attempt": self.attempt})
        self._write(result)

    def finish(self, result: LineageResult, status: str) -> None:
        self.payload["status"] = status
        self._write(result)

    def _write(self, result: LineageResult) -> None:
        rounds = sorted(self.rounds.values(), key=lambda r: r["round"])
        rounds = [r for r in rounds if r["key"] in {x.key for x in result.rounds}]
        best = matching(result.dense["val_accuracy"], result.rounds, result.tolerance)
        test_at = {r["round"]: r["test_accuracy"] for r in rounds}
        total = result.dense["steps"] + sum(r.steps for r in result.rounds)
        executed = sum(a["steps_executed"] for a in self.attempts)
        self.payload.update(
            dense=result.dense,
            dense_key=result.dense["key"],
            round_keys=[r.key for r in result.rounds],
            rounds=rounds,
            matching={
                "sparsity": best.sparsity,
                "round": best.round,
                "val_accuracy": best.val_accuracy,
                "test_accuracy": test_at.get(best.round, result.dense["test_accuracy"]),
            },
            attempts=self.attempts,
            steps_executed=executed,
            steps_reused=max(0, total - executed),
            updated_at=time.time(),
        )
        self.store.put_record(self.namespace, self.trial_id, self.payload)


def _executed_keys(result: LineageResult) -> list[str]:
    keys = [] if result.dense["reused"] else [result.dense["key"]]
    return keys + [r.key for r in result.rounds if not r.reused]
