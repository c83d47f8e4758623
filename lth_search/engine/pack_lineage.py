"""Several IMP lineages of one architecture, run stage by stage as packs.

Replicate seeds, dense replicates, confirmation runs and compared recipes are lineages
that share an architecture and a training recipe. `LineagePack` walks them together:
the dense stages as one pack, then round r of every lineage as one pack, each trained by
engine/packs.py `train_pack` in lockstep. Every member's stages still go through the
store one by one, under the same keys `Lineage` uses, so a pack and a lone lineage
reuse each other's stages: a member whose stage is stored (or being computed by another
worker, which it waits for) is not retrained, and members that need the same stage
(the same dense stage of one seed) train it once.

Single flight is per stage as in `Lineage`: a pack asks the store for each member's
stage before training (waiting on another worker's lease), trains the missing ones
together, then publishes each with `get_or_compute`; a stage another worker published
in between wins and ours is dropped (both are the same function of the same inputs).

This walks `prune.rounds` rounds per member (a member with fewer rounds leaves the
pack); early stopping stays with whoever drives it (`on_round`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.lineage import Lineage, MemoryStages, StageSource
from lth_search.engine.models import build_model
from lth_search.engine.packs import Mode, PackMember, train_pack
from lth_search.engine.results import LineageResult, RoundResult
from lth_search.engine.train import TrainResult
from lth_search.store.keys import content_key
from lth_search.store.stages import StageEntry

PackRoundCallback = Callable[[int, RoundResult, LineageResult], None]
"""(member index, the round just finished, that member's result so far)."""


class _Missing(Exception):
    """Raised inside `get_or_compute` to ask the store only whether a stage exists."""


def _raise_missing() -> StageEntry:
    raise _Missing


def stored_stage(store: StageSource, key: str) -> StageEntry | None:
    """The stored stage, waiting for a worker that holds its lease; None when absent.

    Any `StageSource` answers this through `get_or_compute`: a compute that raises
    leaves nothing behind (the store releases its lease)."""
    try:
        entry, _ = store.get_or_compute(key, _raise_missing)
    except _Missing:
        return None
    return entry


@dataclass
class _Job:
    """One member's stage in a pack step: its key, and how to train and finish it."""

    member: int
    key: str
    member_spec: Callable[[], PackMember]
    finish: Callable[[TrainResult], StageEntry]


class LineagePack:
    """Lineages sharing model, data set, recipe and device; `run()` walks them as packs."""

    def __init__(self, lineages: list[Lineage], mode: Mode = "auto") -> None:
        if not lineages:
            raise ValueError("a lineage pack needs at least one lineage")
        first = lineages[0]
        shared = lambda lineage: (  # noqa: E731
            lineage.cfg.model, lineage.recipe, lineage.device, lineage.data.input_shape, lineage.data.num_classes
        )
        if any(shared(lineage) != shared(first) for lineage in lineages[1:]):
            raise ValueError("pack members must share model, data shapes, resolved training recipe and device")
        self.lineages = lineages
        self.mode = mode

    def _pack_step(self, jobs: list[_Job]) -> dict[int, tuple[StageEntry, bool]]:
        """member -> (stage, reused) for every job: stored ones fetched, the rest trained as one pack."""
        done: dict[int, tuple[StageEntry, bool]] = {}
        first_of_key: dict[str, _Job] = {}
        for job in jobs:
            entry = stored_stage(self.lineages[job.member].store, job.key)
            if entry is not None:
                done[job.member] = (entry, True)
            else:
                first_of_key.setdefault(job.key, job)
        training = list(first_of_key.values())
        template = self.lineages[training[0].member].model if training else None
        results = train_pack(template, [job.member_spec() for job in training], self.lineages[0].cfg.train,
                             self.mode) if training else []
        for job, result in zip(training, results):
            entry = job.finish(result)
            done[job.member] = self.lineages[job.member].store.get_or_compute(job.key, lambda e=entry: e)
        for job in jobs:  # members that needed a stage another member of this pack trained
            if job.member not in done:
                done[job.member] = (done[first_of_key[job.key].member][0], True)
        return done

    def _dense_job(self, index: int, seed: int | None = None) -> _Job:
        """The dense stage trained with `seed` (default the lineage's own; else a replicate)."""
        lineage = self.lineages[index]
        inputs = lineage.dense_inputs(seed)
        key = content_key(inputs)
        seed = inputs["seed"]

        def spec() -> PackMember:
            fresh = build_model(lineage.cfg.model, lineage.data.input_shape, lineage.data.num_classes, seed)
            return PackMember(fresh.state_dict(), lineage.data, seed, 0, lineage.total_steps,
                              snapshot_steps=lineage.cfg.prune.rewind_steps)

        return _Job(index, key, spec, lambda result: lineage.dense_entry(key, inputs, result))

    def _round_job(self, index: int, dense: StageEntry, parent: StageEntry, round_index: int) -> _Job:
        lineage = self.lineages[index]
        inputs = lineage.round_inputs(parent.key, round_index)
        key = content_key(inputs)
        prepared: dict[str, Any] = {}

        def spec() -> PackMember:
            prepared["mask"] = mask = lineage.next_mask(parent)
            start, prepared["factors"] = lineage.round_start(dense, mask)
            device_mask = {name: m.to(lineage.device) for name, m in mask.items()}
            return PackMember(start, lineage.data, lineage.cfg.seed, lineage.cfg.prune.rewind_step,
                              lineage.total_steps, device_mask)

        def finish(result: TrainResult) -> StageEntry:
            return lineage.round_entry(key, inputs, prepared["mask"], prepared["factors"], result, round_index)

        return _Job(index, key, spec, finish)

    def run(self, on_round: PackRoundCallback | None = None) -> list[LineageResult]:
        """Every lineage's result, as `Lineage.run` would give it; `lineage.entries` are set."""
        count = len(self.lineages)
        dense = self._pack_step([self._dense_job(i) for i in range(count)])
        results = [lineage.start(*dense[i]) for i, lineage in enumerate(self.lineages)]
        seeds = [lineage.replicate_seeds() for lineage in self.lineages]
        for offset in range(max(len(s) for s in seeds)):  # the dense replicates, one pack per offset
            members = [i for i in range(count) if offset < len(seeds[i])]
            replicas = self._pack_step([self._dense_job(i, seeds[i][offset]) for i in members])
            for i in members:
                self.lineages[i].add_replicate(results[i], *replicas[i])
        rounds = max(lineage.cfg.prune.rounds for lineage in self.lineages)
        for round_index in range(1, rounds + 1):
            members = [i for i, lineage in enumerate(self.lineages)
                       if lineage.cfg.prune.rounds >= round_index and not results[i].stop_reason]
            if not members:
                break
            jobs = [self._round_job(i, self.lineages[i].entries[0], self.lineages[i].entries[-1], round_index)
                    for i in members]
            finished = self._pack_step(jobs)
            for i in members:
                round_result = self.lineages[i].add_round(results[i], *finished[i], round_index)
                if on_round is not None:
                    on_round(i, round_result, results[i])
        for result in results:
            result.stop_reason = result.stop_reason or "cap"
        return results


def run_lineage_pack(
    cfgs: list[ExperimentConfig],
    store: StageSource | None = None,
    mode: Mode = "auto",
    on_round: PackRoundCallback | None = None,
) -> list[LineageResult]:
    """Run the IMP lineages of `cfgs` (one architecture and recipe) as packs, stages through `store`.

    Each data split is loaded once per (data, seed); without a store, stages live in
    memory for this call (shared by the members).
    """
    store = store if store is not None else MemoryStages()
    datasets: dict[tuple, Dataset] = {}
    lineages = []
    for cfg in cfgs:
        device = resolve_device(cfg.train.device)
        where = (repr(cfg.data.identity()), cfg.data.root, cfg.seed, str(device))
        if where not in datasets:
            datasets[where] = load_dataset(cfg.data, cfg.seed, device)
        lineages.append(Lineage(cfg, store, datasets[where]))
    return LineagePack(lineages, mode).run(on_round)
