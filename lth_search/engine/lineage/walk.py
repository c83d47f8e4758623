"""The walk: ONE loop over the rounds of N lineages, of any kinds; a lone lineage is a pack of one.

Every lineage, whatever its kind, is walked the same way:

1. its dense stage and `prune.dense_replicates - 1` replicates (seeds seed+1, ...), every
   lineage's at once, fetched or trained as packs (stages.py `fetch_or_train`);
2. round by round: the round's stage of every lineage still walking, fetched or trained as
   packs (a kind trained at IMP's sparsities first gets the IMP round it needs, in the
   same pack step as the iterative kinds' rounds); then each round is judged by the
   paired verdict against its own lineage's replicates (objective.py), and a lineage stops
   when its unbroken matching run ends (`prune.patience` misses in a row), at
   `prune.target_sparsity`, at its round cap, or when its dense network did not train.

So the verdict, the baseline, patience, stopping and step counting are written once, here,
for every kind (kinds.py says only how a kind's round is trained). A failed stage (a
non-finite loss, chance-level accuracy) never matches, and a lineage whose dense network
failed stops with one warning line saying what to try.

Stages and their keys do not depend on where a lineage stops, or on what it is packed
with, so a longer lineage reuses a shorter one's rounds, and any walk reuses any other's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from typing import TYPE_CHECKING, Any, Callable

import torch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.lineage import keys
from lth_search.engine.lineage.kinds import Kind, kind_of
from lth_search.engine.lineage.metric import Metric, metric_named
from lth_search.engine.lineage.objective import (
    Verdict,
    chance_level,
    lm_training_failure,
    paired_verdict,
    training_failure,
    unpack_correct,
)
from lth_search.engine.lineage.results import DenseResult, LineageResult, RoundResult
from lth_search.engine.lineage.stages import VAL_VALUES, MemoryStages, StageJob, Stages, StageSource
from lth_search.store.entry import StageEntry

if TYPE_CHECKING:
    from lth_search.engine.lineage.results import RoundDiagnostics

log = logging.getLogger(__name__)

DenseCallback = Callable[[int, LineageResult], None]
"""(lineage index, its result holding the dense baseline and no round yet)."""
RoundCallback = Callable[[int, RoundResult, LineageResult], None]
"""(lineage index, the round just finished, that lineage's result so far)."""
Handover = Callable[[list[int]], list[int]]
"""(indices of the lineages still walking) -> those to leave to another walk (`walk`)."""


class Lineage(Stages):
    """One lineage of a kind (prune.kind by default): its stages and where its walk is.

    `run()` walks it alone (a pack of one); `walk([...])` walks several together.
    `entries` holds the stages of the walk so far (dense first, then one per round: the
    stage just finished is `entries[-1]` when a callback runs), `replicates` the dense
    baseline (the lineage's own dense stage first).
    """

    def __init__(self, cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None,
                 kind: str | None = None, rounds: int | None = None, stop_at_run_end: bool = True):
        super().__init__(cfg, store, dataset)
        self.kind: Kind = kind_of(kind or cfg.prune.kind)
        self.rounds = cfg.prune.rounds if rounds is None else rounds
        """The round cap of this walk (prune.rounds unless told: `compare` walks every kind to
        the IMP lineage's length)."""
        self.stop_at_run_end = stop_at_run_end
        """False walks to the cap whatever the verdict (compare's kinds, judged all the same)."""
        self.entries: list[StageEntry] = []
        self.replicates: list[StageEntry] = []
        self.imp_entries: list[StageEntry] = []
        """The IMP lineage's stages a kind trained at IMP's sparsities is walked against."""
        self.diagnose: Callable[[StageEntry, StageEntry], "RoundDiagnostics"] | None = None
        """Called with (dense, round stage) for each round's diagnostics (probes.py `attach_probes`)."""
        self.metric: Metric = metric_named(cfg.verdict_metric())
        """What the verdict judges (search.metric; auto follows the data's task)."""
        val = self.data.val
        self.language_model = self.data.task == "causal_lm"
        self.chance = 0.0 if self.language_model else chance_level(val.y.cpu().numpy())
        self.outputs = self._outputs() if self.language_model else self.data.num_classes
        """Tokens the model predicts among (a language model's logits): the uniform prediction's loss is log of it."""
        self.val_size = len(val)

    def _outputs(self) -> int:
        """How many tokens the model's logits cover (at least the tokenizer's vocabulary): a
        checkpoint's output layer is often larger than the tokenizer (padded, or another tokenizer)."""
        with torch.no_grad():
            logits = self.model(self.data.val.x[:1])
        return max(int(logits.shape[1]), self.data.num_classes)

    @property
    def label(self) -> str:
        """How a warning names this lineage."""
        return f"lineage {self.cfg.name} seed {self.cfg.seed} ({self.kind.name})"

    def replicate_seeds(self) -> list[int]:
        """Seeds of the dense baseline: the lineage's own, then seed+1, seed+2, ..."""
        return [self.cfg.seed + offset for offset in range(self.cfg.prune.dense_replicates)]

    def stage_keys(self) -> list[str]:
        """Keys of an IMP lineage's dense stage and of every round, computable without training."""
        out = [keys.stage_key(self.dense_inputs())]
        for r in range(1, self.cfg.prune.rounds + 1):
            out.append(keys.stage_key(keys.round_inputs(out[-1], r, self.cfg.prune.choices())))
        return out

    def judge(self, entry: StageEntry) -> Verdict:
        """The paired verdict of a stage against the dense replicates, on the lineage's metric."""
        search = self.cfg.search
        values = _losses if self.metric.judges_loss else _correct
        return paired_verdict(values(entry), [values(d) for d in self.replicates], search.tolerance,
                              search.confidence, self.metric.higher_is_better)

    def failure(self, entry: StageEntry) -> str | None:
        """Why `entry` did not train, if it did not: a language model against the uniform
        prediction's loss (objective.py `lm_training_failure`), a classifier against chance
        (`training_failure`), whatever the metric judged."""
        metrics = entry.metrics
        if self.language_model:
            return lm_training_failure(float(metrics["train_loss"]), float(metrics["val_loss"]), self.outputs)
        why = training_failure(float(metrics["train_loss"]), float(metrics["val_accuracy"]), self.chance,
                               self.val_size)
        if why is None and self.metric.judges_loss and not math.isfinite(float(metrics["val_loss"])):
            return f"val loss is {metrics['val_loss']}"
        return why

    def run(self, on_round: Callable[[RoundResult, LineageResult], None] | None = None,
            on_dense: Callable[[LineageResult], None] | None = None) -> LineageResult:
        """Walk this lineage alone: a pack of one."""
        [result] = walk(
            [self],
            on_dense=None if on_dense is None else lambda _, result: on_dense(result),
            on_round=None if on_round is None else lambda _, round_result, result: on_round(round_result, result),
        )
        return result

    # The walk's steps, for this lineage --------------------------------------------------------
    def begin(self, dense: list[tuple[StageEntry, bool]]) -> LineageResult:
        """The result holding the dense baseline (own dense stage first) and no round yet."""
        (own, reused), *others = dense
        self.entries, self.replicates, self.imp_entries = [own], [entry for entry, _ in dense], [own]
        result = LineageResult(
            dense=DenseResult.from_stage(own.metrics, own.key, reused), rounds=[], steps_executed=0,
            steps_reused=0, tolerance=self.cfg.search.tolerance, patience=self.cfg.prune.patience,
            target_sparsity=self.cfg.prune.target_sparsity, kind=self.kind.name, metric=self.metric.name,
        )
        for entry, entry_reused in dense:
            result.count(int(entry.metrics["steps"]), entry_reused)
        result.dense = dataclasses.replace(result.dense, **_baseline(self.replicates))
        failures = [(entry.inputs["seed"], self.failure(entry)) for entry, _ in dense]
        failed = next(((seed, why) for seed, why in failures if why), None)
        if failed is not None:
            result.dense.failed = f"dense network (seed {failed[0]}) did not train: {failed[1]}"
            result.stop_reason = "dense_failed"
            log.warning("%s stopped: %s; try a lower train.lr (or a warmup), and check the data for NaN or inf",
                        self.label, result.dense.failed)
        return result

    def round_job(self, r: int) -> StageJob:
        """This lineage's round r: after its own last stage, or at the IMP round r (imp_entries[r])."""
        previous = self.entries[-1] if self.kind.iterative else self.imp_entries[r]
        return self.kind.round_job(self, self.entries[0], previous, r)

    def imp_round_job(self, r: int) -> StageJob:
        """The IMP lineage's round r that a kind trained at IMP's sparsities needs."""
        return kind_of("imp").round_job(self, self.entries[0], self.imp_entries[-1], r)

    def add_round(self, result: LineageResult, entry: StageEntry, reused: bool, r: int) -> RoundResult:
        """Judge a finished round against the baseline, append it, and set `result.stop_reason`."""
        self.entries.append(entry)
        verdict = self.judge(entry)
        failed = self.failure(entry)
        round_result = RoundResult.from_stage(
            {**entry.metrics, "round": r, "matches": verdict.matches and failed is None, "margin": verdict.margin,
             "margin_se": verdict.se, "failed": failed},
            entry.key, reused,
        )
        if failed is not None:
            log.warning("%s round %d failed: %s", self.label, r, failed)
        result.rounds.append(round_result)
        result.count(round_result.steps, reused)
        if r == 1 and verdict.se > 0 and self.cfg.search.tolerance < 2 * verdict.se:
            log.info(
                "search.tolerance %.4f is below twice the verdict's noise (standard error %.4f, %s): matching is "
                "close to a coin flip; raise data.val_size or prune.dense_replicates, or the tolerance",
                self.cfg.search.tolerance, verdict.se, self.metric.name,
            )
        stop = result.should_stop() if self.stop_at_run_end else ""
        result.stop_reason = stop or ("cap" if r >= self.rounds else "")
        if self.diagnose is not None:
            round_result.diagnostics = self.diagnose(self.entries[0], entry)
        return round_result


def walk(lineages: list[Lineage], on_dense: DenseCallback | None = None,
         on_round: RoundCallback | None = None, handover: Handover | None = None) -> list[LineageResult]:
    """Walk every lineage to its stop, stage by stage as packs; results in the order given.

    `handover`, asked before every round with the lineages still walking, names those this
    walk leaves to another (a worker with nothing left to do): they stop here with their
    rounds so far stored and recorded, no stop reason, to be walked on elsewhere, where every
    stored stage is fetched again, not trained."""
    dense_jobs = [(i, lineage.dense_job(seed)) for i, lineage in enumerate(lineages)
                  for seed in lineage.replicate_seeds()]
    dense = _step(lineages, dense_jobs)
    results: list[LineageResult] = []
    left: set[int] = set()
    for i, lineage in enumerate(lineages):
        results.append(lineage.begin([stage for (j, _), stage in zip(dense_jobs, dense) if j == i]))
        if on_dense is not None:
            on_dense(i, results[i])
    for r in range(1, max((lineage.rounds for lineage in lineages), default=0) + 1):
        active = [i for i, lineage in enumerate(lineages)
                  if r <= lineage.rounds and not results[i].stop_reason and i not in left]
        if handover is not None and active:
            left.update(handover(active))
            active = [i for i in active if i not in left]
        if not active:
            break
        # the IMP rounds that kinds at IMP's sparsities need, beside the iterative kinds' own rounds
        shadow = [(i, lineages[i].imp_round_job(r)) for i in active if lineages[i].kind.at_imp_sparsities]
        own_first = [(i, lineages[i].round_job(r)) for i in active if lineages[i].kind.iterative]
        first = _step(lineages, shadow + own_first)
        for (i, _), (entry, reused) in zip(shadow, first):
            lineages[i].imp_entries.append(entry)
            results[i].count(int(entry.metrics["steps"]), reused)
        own_second = [(i, lineages[i].round_job(r)) for i in active if lineages[i].kind.at_imp_sparsities]
        own = dict(zip([i for i, _ in own_first], first[len(shadow):]))
        own.update(zip([i for i, _ in own_second], _step(lineages, own_second)))
        for i in active:
            entry, reused = own[i]
            round_result = lineages[i].add_round(results[i], entry, reused, r)
            if on_round is not None:
                on_round(i, round_result, results[i])
    for i, result in enumerate(results):
        if i not in left:
            result.stop_reason = result.stop_reason or "cap"
    return results


def _step(lineages: list[Lineage], jobs: list[tuple[int, StageJob]]) -> list[tuple[StageEntry, bool]]:
    """(stage, reused) per (lineage index, job), in order: one `fetch_or_train` per group of
    lineages that can share a pack (same signature), trained with that group's first model."""
    groups: dict[str, list[int]] = {}
    for position, (i, _) in enumerate(jobs):
        groups.setdefault(lineages[i].signature, []).append(position)
    done: dict[int, tuple[StageEntry, bool]] = {}
    for positions in groups.values():
        owner = lineages[jobs[positions[0]][0]]
        for position, stage in zip(positions, owner.fetch_or_train([jobs[p][1] for p in positions])):
            done[position] = stage
    return [done[p] for p in range(len(jobs))]


def _correct(entry: StageEntry) -> Any:
    """A stage's per-example val correctness (a bool vector)."""
    packed = entry.metrics["val_correct"]
    return unpack_correct(packed["bits"], packed["n"])


def _losses(entry: StageEntry) -> Any:
    """A stage's per-example val losses (stages.py `split_scores`: their mean is `val_loss`)."""
    return entry.weights[VAL_VALUES]["loss"].double().numpy()


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
        "baseline_val_loss": sum(r.metrics["val_loss"] for r in replicates) / len(replicates),
    }


def lineages_for(cfgs: list[ExperimentConfig], store: StageSource | None = None,
                 kinds: list[str | None] | None = None) -> list[Lineage]:
    """A lineage per config (of `kinds[i]`, default its prune.kind), stages through `store`
    (memory when None, shared by all), each data split loaded once per (data, seed, device)."""
    store = store if store is not None else MemoryStages()
    datasets: dict[tuple, Dataset] = {}
    lineages = []
    for index, cfg in enumerate(cfgs):
        device = resolve_device(cfg.train.device)
        where = (repr(cfg.data.identity()), cfg.data.root, cfg.seed, str(device))
        if where not in datasets:
            datasets[where] = load_dataset(cfg.data, cfg.seed, device)
        lineages.append(Lineage(cfg, store, datasets[where], kind=kinds[index] if kinds else None))
    return lineages


def run_lineage(cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None,
                on_round: Callable[[RoundResult, LineageResult], None] | None = None) -> LineageResult:
    """Run one lineage of `cfg` in this process (stages through `store` when given)."""
    return Lineage(cfg, store, dataset).run(on_round)
