"""One iterative-magnitude-pruning lineage: the walk over its stages, through the store.

The stages themselves (their keys, how each is computed) are engine/lineage_stages.py;
`Lineage` adds the walk: the dense stage and its replicates (the verdict's baseline,
trained as a pack, engine/pack_step.py), then one round after another, each judged
paired against the replicates (objective.py). The walk stops when the unbroken matching
run ends (`prune.patience` misses in a row), at `prune.target_sparsity`, or at the cap
`prune.rounds`; the stages and their keys do not depend on where a lineage stops, so a
longer lineage reuses a shorter one's rounds.

Before computing a stage the lineage asks the store, so any stage any lineage computed
is reused (`reused=1`), and a lineage killed mid-round resumes after its last stored
stage. Without a store, stages live in memory for the run.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import TYPE_CHECKING, Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset
from lth_search.engine.lineage_stages import LineageStages
from lth_search.engine.objective import Verdict, paired_verdict, unpack_correct
from lth_search.engine.pack_step import run_pack_step
from lth_search.engine.results import DenseResult, LineageResult, RoundResult
from lth_search.engine.stage_source import StageSource
from lth_search.store.entry import StageEntry

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lth_search.engine.results import RoundDiagnostics

RoundCallback = Callable[[RoundResult, LineageResult], None]
DenseCallback = Callable[[LineageResult], None]


class Lineage(LineageStages):
    """An IMP lineage for one config. Build it once; `run()` walks its stages."""

    def __init__(self, cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None):
        super().__init__(cfg, store, dataset)
        self.entries: list[StageEntry] = []
        """The stages of the last `run()`: dense first, then one per round."""
        self.replicates: list[StageEntry] = []
        """The dense baseline of the last `run()`: the lineage's own dense stage, then seed+1, ..."""
        self.diagnose: Callable[[StageEntry, StageEntry], "RoundDiagnostics"] | None = None
        """Called with (dense, round stage) for each round's diagnostics; set to
        engine/probes.py's RoundProbes by `attach_probes` when `diagnostics.enabled`."""

    def start_result(self, dense: StageEntry, reused: bool) -> LineageResult:
        """A result holding the dense stage (reused or not) and no round yet."""
        steps = dense.metrics["steps"]
        return LineageResult(
            dense=DenseResult.from_stage(dense.metrics, dense.key, reused),
            rounds=[], steps_executed=0 if reused else steps, steps_reused=steps if reused else 0,
            tolerance=self.cfg.search.tolerance,
        )

    def dense_stages(self) -> list[tuple[StageEntry, bool]]:
        """The dense stage and its replicates, (stage, reused) each: trained as packs of
        `resources.pack` (engine/pack_step.py), or one by one when that is 1."""
        seeds = [self.cfg.seed, *self.replicate_seeds()]
        size = self.cfg.resources.pack
        if size == 1:
            return [self.dense_stage(seed) for seed in seeds]
        stages = []
        for start in range(0, len(seeds), size):
            jobs = [self.dense_job(seed) for seed in seeds[start:start + size]]
            stages += run_pack_step(jobs, self.model, self.cfg.train)
        return stages

    def judge(self, entry: StageEntry) -> Verdict:
        """The paired verdict of a stage against the dense replicates (`run()` trains them first)."""
        return paired_verdict(_correct(entry), [_correct(d) for d in self.replicates], self.cfg.search.tolerance)

    # The walk -------------------------------------------------------------------------------
    def start(self, dense: StageEntry, reused: bool) -> LineageResult:
        """The result of a walk whose dense stage is `dense` (no rounds yet)."""
        self.entries = [dense]
        self.replicates = [dense]
        steps = dense.metrics["steps"]
        return LineageResult(
            dense=DenseResult.from_stage(dense.metrics, dense.key, reused),
            rounds=[],
            steps_executed=0 if reused else steps,
            steps_reused=steps if reused else 0,
            tolerance=self.cfg.search.tolerance,
            patience=self.cfg.prune.patience,
            target_sparsity=self.cfg.prune.target_sparsity,
        )

    def replicate_seeds(self) -> list[int]:
        """Seeds of the dense replicates beyond the lineage's own dense stage."""
        return [self.cfg.seed + offset for offset in range(1, self.cfg.prune.dense_replicates)]

    def add_replicate(self, result: LineageResult, entry: StageEntry, reused: bool) -> None:
        """Count one more dense replicate into the baseline."""
        self.replicates.append(entry)
        _count_steps(result, entry.metrics["steps"], reused)
        result.dense = dataclasses.replace(result.dense, **_baseline(self.replicates))

    def add_round(self, result: LineageResult, entry: StageEntry, reused: bool, round_index: int) -> RoundResult:
        """Judge a finished round against the baseline, append it, and set `result.stop_reason`."""
        self.entries.append(entry)
        verdict = self.judge(entry)
        round_result = RoundResult.from_stage(
            {**entry.metrics, "round": round_index, "matches": verdict.matches, "margin": verdict.margin,
             "margin_se": verdict.se},
            entry.key, reused,
        )
        result.rounds.append(round_result)
        _count_steps(result, round_result.steps, reused)
        if round_index == 1 and verdict.se > 0 and self.cfg.search.tolerance < 2 * verdict.se:
            # in the log and in every round's margin_se, not on a search's console: with several
            # lineages (confirmation seeds) it would repeat once per lineage after the summary
            log.info(
                "search.tolerance %.4f is below twice the verdict's noise (standard error %.4f): matching is "
                "close to a coin flip; raise data.val_size or prune.dense_replicates, or the tolerance",
                self.cfg.search.tolerance, verdict.se,
            )
        result.stop_reason = result.should_stop() or ("cap" if round_index >= self.cfg.prune.rounds else "")
        return round_result

    def run(self, on_round: RoundCallback | None = None, on_dense: DenseCallback | None = None) -> LineageResult:
        """Run (or fetch) the dense stages and the rounds until the lineage stops, calling back
        after the dense baseline and after each round.

        `self.entries[-1]` is the stage just finished when a callback runs (its mask and
        weights are there for whoever logs them); `self.replicates` holds the dense
        baseline (the lineage's own dense stage first).
        """
        (dense, reused), *replicates = self.dense_stages()
        result = self.start(dense, reused)
        for entry, entry_reused in replicates:
            self.add_replicate(result, entry, entry_reused)
        if on_dense is not None:
            on_dense(result)
        parent = dense
        for round_index in range(1, self.cfg.prune.rounds + 1):
            parent, reused = self.round_stage(dense, parent, round_index)
            round_result = self.add_round(result, parent, reused, round_index)
            round_result.diagnostics = self.diagnose(dense, parent) if self.diagnose is not None else None
            if on_round is not None:
                on_round(round_result, result)
            if result.stop_reason:
                break
        result.stop_reason = result.stop_reason or "cap"
        return result


def _correct(entry: StageEntry) -> Any:
    """A stage's per-example val correctness (a bool vector)."""
    packed = entry.metrics["val_correct"]
    return unpack_correct(packed["bits"], packed["n"])


def _baseline(replicates: list[StageEntry]) -> dict[str, Any]:
    """What the result says about the replicated dense baseline (beside the own dense's metrics)."""
    vals = [r.metrics["val_accuracy"] for r in replicates]
    return {
        "replicates": len(replicates),
        "replicate_keys": [r.key for r in replicates],
        "replicate_val_accuracies": vals,
        "baseline_val_accuracy": sum(vals) / len(vals),
        "baseline_test_accuracy": sum(r.metrics["test_accuracy"] for r in replicates) / len(replicates),
        "baseline_val_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
    }


def _count_steps(result: LineageResult, steps: int, reused: bool) -> None:
    if reused:
        result.steps_reused += steps
    else:
        result.steps_executed += steps


def run_lineage(
    cfg: ExperimentConfig,
    store: StageSource | None = None,
    dataset: Dataset | None = None,
    on_round: RoundCallback | None = None,
) -> LineageResult:
    """Run one IMP lineage for `cfg` in this process (stages through `store` when given)."""
    return Lineage(cfg, store, dataset).run(on_round)

