"""One search trial = one IMP lineage, run without Ray.

`run_trials` walks the trials' lineages (one, or a pack: the confirmation's runs) through
the stage store and, after every stage,
updates the trial record in the store, lets an observer (the MLflow child run, when
tracking is on) log it, and hands the round's report to `report`. In a search,
`report` is Ray Tune's (search/trainable.py: `tune.report` plus a tiny checkpoint); in
`lth-search lineage` and in tests it is a plain function. So the trainable, the CLI and
the tests run the same code, and no test re-implements production wiring.

A retried or resumed trial walks the lineage again: every finished stage comes from the
store, and rounds it reported before (`done`) are not reported twice.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset
from lth_search.engine.lineage.probes import attach_probes
from lth_search.engine.lineage.metric import metric_named
from lth_search.engine.lineage.results import LineageResult, RoundResult
from lth_search.engine.lineage.stages import StageSource
from lth_search.engine.lineage.walk import Handover, Lineage, lineages_for, walk
from lth_search.runs.observers import TrialObserver
from lth_search.runs.record import TrialRecord, TrialStatus

SPARSITY_LEVEL = "sparsity_level"
"""Reported with every round: floor(log(1 - sparsity) / log(0.8)), the scheduler's clock."""
VAL_MARGIN = "val_margin"
"""Reported with every round: val accuracy minus dense val accuracy, the scheduler's yardstick."""
LEVEL_RATE = 0.2
DEFAULT_RECIPE = "default_recipe"
"""Reported with every round: 1 for the search's default recipe, which early stopping never stops."""

Report = Callable[[int, str, dict[str, Any]], None]
"""(round, stage key, metrics): one report per round (round 0 when a lineage has no rounds)."""


def limit_resources(cfg: ExperimentConfig) -> None:
    """Threads to the trial's CPUs; a fractional GPU also caps this process's CUDA memory.

    CPU float results depend on the thread count, so a lineage run from the CLI computes
    exactly what a search trial computes. Ray's fractional GPUs are only bookkeeping:
    without the cap, trials sharing a GPU could take each other's memory.
    """
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    fraction = cuda_memory_fraction(cfg)
    if fraction is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


def cuda_memory_fraction(cfg: ExperimentConfig) -> float | None:
    """The CUDA memory cap `limit_resources` sets: `gpu_memory_fraction`, else a fractional `gpu`."""
    gpu = cfg.resources.gpu
    return cfg.resources.gpu_memory_fraction or (gpu if 0 < gpu < 1 else None)


def sparsity_level(sparsity: float) -> int:
    """How many 20 % prunes leave as few weights as `sparsity` does (48.8 % -> 3).

    Schedulers compare lineages at equal level, i.e. at equal sparsity, whatever their
    pruning rate (search/scheduler.py).
    """
    if sparsity >= 1.0:
        return 10_000
    return int(math.floor(math.log(1.0 - sparsity) / math.log(1.0 - LEVEL_RATE) + 1e-9))


def round_report(result: LineageResult, round_result: RoundResult | None, attempt: int) -> dict[str, Any]:
    """What a trial reports after a round (the dense stage when `round_result` is None).

    The score (`matching_sparsity`) only looks at completed rounds, so it is fair at any
    round: a scheduler compares it at equal compute, a stopped lineage earned it.
    """
    if round_result is None:
        dense = result.dense
        metrics: dict[str, Any] = {
            "round": 0, "sparsity": 0.0, "val_accuracy": dense.val_accuracy, "test_accuracy": dense.test_accuracy,
            "train_loss": dense.train_loss, "train_steps_per_s": dense.train_steps_per_s, "reused": dense.reused,
        }
    else:
        metrics = {
            "round": round_result.round, "sparsity": round_result.sparsity,
            "val_accuracy": round_result.val_accuracy, "test_accuracy": round_result.test_accuracy,
            "train_loss": round_result.train_loss, "train_steps_per_s": round_result.train_steps_per_s,
            "reused": round_result.reused,
        }
    metrics.update(result.metric_values(round_result if round_result is not None else result.dense))
    best = result.best
    metrics[SPARSITY_LEVEL] = sparsity_level(metrics["sparsity"])
    margin = round_result.margin if round_result is not None else None
    # the verdict's paired margin against the dense replicates' mean (the plain difference
    # from this lineage's dense network where a round has none, e.g. the dense report)
    metrics[VAL_MARGIN] = margin if margin is not None else metrics["val_accuracy"] - result.dense.val_accuracy
    metrics.update(
        steps_executed=result.steps_executed,
        steps_reused=result.steps_reused,
        dense_val_accuracy=result.dense.val_accuracy,
        dense_test_accuracy=result.dense.test_accuracy,
        matching_sparsity=best.sparsity,
        matching_val_accuracy=best.val_accuracy,
        matching_round=best.round,
        attempt=attempt,
        lineage_failed=result.failed or "",
        metric=result.metric,
    )
    judged = metric_named(result.metric)
    if judged.name != "accuracy":  # the console's and `best`'s "val perplexity 12.3" at the matching round
        value = judged.val(result.matching_stage)
        if value is not None:
            metrics[f"matching_{judged.val_key}"] = float(value)
    return metrics


class TrialRun:
    """The walk's callbacks for one trial: record to the store, log, report."""

    def __init__(self, cfg: ExperimentConfig, lineage: Lineage, store: StageSource, record: TrialRecord | None,
                 observer: TrialObserver | None, report: Report, done: int, extra: dict[str, Any],
                 on_dense: Callable[[LineageResult], None] | None = None) -> None:
        self.cfg, self.lineage, self.store, self.record = cfg, lineage, store, record
        self.observer, self.report, self.done, self.extra = observer, report, done, extra
        self.dense_hook = on_dense

    @property
    def attempt(self) -> int:
        return self.record.attempt if self.record is not None else 1

    def save(self, result: LineageResult) -> None:
        if self.record is not None:
            self.record.update(result)
            self.record.save(self.store)

    def on_dense(self, result: LineageResult) -> None:
        self.save(result)
        if self.observer is not None:
            self.observer.log_dense(result, self.lineage.entries[0])
        if self.dense_hook is not None:
            self.dense_hook(result)
        if (self.cfg.prune.rounds == 0 or result.failed) and self.done < 0:
            self.report(0, result.dense.key, {**round_report(result, None, self.attempt), **self.extra})

    def on_round(self, round_result: RoundResult, result: LineageResult) -> None:
        self.save(result)
        if self.observer is not None:
            self.observer.log_round(round_result, self.lineage.entries[-1])
        if round_result.round > self.done:  # else reported before a restart: Tune and Optuna have it
            metrics = {**round_report(result, round_result, self.attempt), **self.extra}
            self.report(round_result.round, round_result.key, metrics)

    def finish(self, result: LineageResult) -> None:
        if self.record is not None:
            self.record.status = TrialStatus.FINISHED
        self.save(result)
        if self.observer is not None:
            self.observer.finish(result, TrialStatus.FINISHED)


def run_trials(
    cfgs: list[ExperimentConfig],
    store: StageSource,
    reports: list[Report],
    records: list[TrialRecord | None] | None = None,
    observers: list[TrialObserver | None] | None = None,
    done: list[int] | None = None,
    node_id: str | None = None,
    dataset: Dataset | None = None,
    on_dense: Callable[[LineageResult], None] | None = None,
    handover: Handover | None = None,
) -> list[LineageResult]:
    """Walk the trials' lineages together (engine/lineage/walk.py: packs where they share an
    architecture): record, log and report after every stage; finish each record.

    `records` (a search trial's, saved in the store after every stage; None for a lone
    `lth-search lineage`), `observers` (tracking, or None), `done` the last round each trial
    reported before a restart (-1: none). A trial a scheduler stops ends inside its
    `report` (Ray raises there), after its record was written; the driver sets the
    record's final status then. `handover` (walk.py) may leave trials to another worker
    between rounds: their records stay running, for that worker to finish.
    """
    count = len(cfgs)
    records = records or [None] * count
    observers = observers or [None] * count
    done = done or [-1] * count
    limit_resources(cfgs[0])
    for record, restored in zip(records, done):
        if record is not None:
            record.begin_attempt(node_id, restored)
    lineages = [Lineage(cfgs[0], store, dataset)] if count == 1 and dataset is not None else lineages_for(cfgs, store)
    for lineage in lineages:
        attach_probes(lineage)
    extra = {"node_id": node_id} if node_id is not None else {}
    runs = [TrialRun(cfg, lineage, store, record, observer, report, restored, extra, on_dense)
            for cfg, lineage, record, observer, report, restored in zip(cfgs, lineages, records, observers, reports, done)]
    results = walk(lineages, on_dense=lambda i, result: runs[i].on_dense(result),
                   on_round=lambda i, round_result, result: runs[i].on_round(round_result, result),
                   handover=handover)
    for run, result in zip(runs, results):
        if result.stop_reason:  # none: handed over (walk.py), its record for the next worker to finish
            run.finish(result)
    return results


def run_trial(
    cfg: ExperimentConfig,
    store: StageSource,
    report: Report,
    record: TrialRecord | None = None,
    observer: TrialObserver | None = None,
    done: int = -1,
    dataset: Dataset | None = None,
    node_id: str | None = None,
    on_dense: Callable[[LineageResult], None] | None = None,
) -> LineageResult:
    """One trial: `run_trials` with one lineage."""
    [result] = run_trials([cfg], store, [report], [record], [observer], [done], node_id, dataset, on_dense)
    return result
