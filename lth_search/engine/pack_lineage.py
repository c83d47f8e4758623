"""Several IMP lineages of one architecture, run stage by stage as packs.

Replicate seeds, dense replicates, confirmation runs and compared recipes are lineages
that share an architecture and a training recipe. `LineagePack` walks them together:
the dense stages as one pack, then round r of every lineage as one pack, each trained by
engine/packs.py `train_pack` in lockstep. Every member's stages still go through the
store one by one, under the same keys `Lineage` uses, so a pack and a lone lineage
reuse each other's stages: a member whose stage is stored (or being computed by another
worker, which it waits for) is not retrained, and members that need the same stage
(the same dense stage of one seed) train it once.

Single flight is per stage as in `Lineage` (engine/pack_step.py holds the lease of
every stage a pack is about to train). A member leaves the pack when its walk stops
(`prune.patience` misses in a row, its target sparsity, or its own `prune.rounds`), as
its lone `Lineage.run` would; packs hold at most `resources.pack` members.
"""

from __future__ import annotations

from typing import Callable

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.lineage import Lineage
from lth_search.engine.stage_source import MemoryStages, StageSource
from lth_search.engine.pack_step import PackJob, run_pack_step
from lth_search.engine.packs import Mode
from lth_search.engine.results import LineageResult, RoundResult
from lth_search.store.entry import StageEntry

PackRoundCallback = Callable[[int, RoundResult, LineageResult], None]
"""(member index, the round just finished, that member's result so far)."""


def pack_signature(lineage: Lineage) -> str:
    """What members of one pack must share: model, resolved recipe, device, data shapes."""
    return repr((lineage.cfg.model, lineage.recipe, str(lineage.device), lineage.data.input_shape,
                 lineage.data.num_classes))


class LineagePack:
    """Lineages sharing model, data set, recipe and device; `run()` walks them as packs."""

    def __init__(self, lineages: list[Lineage], mode: Mode = "auto") -> None:
        if not lineages:
            raise ValueError("a lineage pack needs at least one lineage")
        if len({pack_signature(lineage) for lineage in lineages}) > 1:
            raise ValueError("pack members must share model, data shapes, resolved training recipe and device")
        self.lineages = lineages
        self.mode = mode

    def _pack_step(self, jobs: list[PackJob]) -> list[tuple[StageEntry, bool]]:
        """(stage, reused) per job: stored ones fetched, the rest trained as packs of `resources.pack`."""
        size = self.lineages[0].cfg.resources.pack
        done: list[tuple[StageEntry, bool]] = []
        for start in range(0, len(jobs), size):
            done += run_pack_step(jobs[start:start + size], self.lineages[0].model, self.lineages[0].cfg.train,
                                  self.mode)
        return done

    def run(self, on_round: PackRoundCallback | None = None) -> list[LineageResult]:
        """Every lineage's result, as `Lineage.run` would give it; `lineage.entries` are set."""
        count = len(self.lineages)
        seeds = [[lineage.cfg.seed, *lineage.replicate_seeds()] for lineage in self.lineages]
        owners = [(i, seed) for i in range(count) for seed in seeds[i]]
        dense = self._pack_step([self.lineages[i].dense_job(seed) for i, seed in owners])
        results: list[LineageResult] = []
        for i, lineage in enumerate(self.lineages):  # own dense stage first, then the replicates
            (own, reused), *replicates = [stage for (j, _), stage in zip(owners, dense) if j == i]
            results.append(lineage.start(own, reused))
            for entry, entry_reused in replicates:
                lineage.add_replicate(results[i], entry, entry_reused)
        rounds = max(lineage.cfg.prune.rounds for lineage in self.lineages)
        for round_index in range(1, rounds + 1):
            members = [i for i, lineage in enumerate(self.lineages)
                       if lineage.cfg.prune.rounds >= round_index and not results[i].stop_reason]
            if not members:
                break
            jobs = [self.lineages[i].round_job(self.lineages[i].entries[0], self.lineages[i].entries[-1], round_index)
                    for i in members]
            for i, (entry, reused) in zip(members, self._pack_step(jobs)):
                lineage = self.lineages[i]
                round_result = lineage.add_round(results[i], entry, reused, round_index)
                if lineage.diagnose is not None:
                    round_result.diagnostics = lineage.diagnose(lineage.entries[0], entry)
                if on_round is not None:
                    on_round(i, round_result, results[i])
        for result in results:
            result.stop_reason = result.stop_reason or "cap"
        return results


def pack_lineages(cfgs: list[ExperimentConfig], store: StageSource | None = None) -> list[Lineage]:
    """A lineage per config, stages through `store` (memory when None), each data split
    loaded once per (data, seed, device) however many members share it."""
    store = store if store is not None else MemoryStages()
    datasets: dict[tuple, Dataset] = {}
    lineages = []
    for cfg in cfgs:
        device = resolve_device(cfg.train.device)
        where = (repr(cfg.data.identity()), cfg.data.root, cfg.seed, str(device))
        if where not in datasets:
            datasets[where] = load_dataset(cfg.data, cfg.seed, device)
        lineages.append(Lineage(cfg, store, datasets[where]))
    return lineages


def run_packed(lineages: list[Lineage], mode: Mode = "auto", on_round: PackRoundCallback | None = None,
               ) -> list[LineageResult]:
    """Walk IMP lineages of any architectures: one `LineagePack` per shared signature.

    Results (and `on_round`'s member index) follow the order of `lineages`."""
    groups: dict[str, list[int]] = {}
    for index, lineage in enumerate(lineages):
        groups.setdefault(pack_signature(lineage), []).append(index)
    results: dict[int, LineageResult] = {}
    for members in groups.values():
        callback = None if on_round is None else (
            lambda j, round_result, result, members=members: on_round(members[j], round_result, result))
        for index, result in zip(members, LineagePack([lineages[i] for i in members], mode).run(callback)):
            results[index] = result
    return [results[i] for i in range(len(lineages))]


def run_lineage_pack(
    cfgs: list[ExperimentConfig],
    store: StageSource | None = None,
    mode: Mode = "auto",
    on_round: PackRoundCallback | None = None,
) -> list[LineageResult]:
    """Run the IMP lineages of `cfgs` (one architecture and recipe) as packs, stages through `store`.

    Without a store, stages live in memory for this call (shared by the members).
    """
    return LineagePack(pack_lineages(cfgs, store), mode).run(on_round)
