"""Several trials as one: lineages of one architecture walked as packs, run without Ray.

The confirmation re-runs a few recipes on a few fresh seeds: lineages that share a
model and a training recipe, the case packs are for (engine/packs.py: R small networks
trained as one batched network pay the per-step overhead once). `run_trial_pack` is
`run_trial` for such a group: each member keeps its own trial record (saved after every
round), reports its rounds, and ends FINISHED; its stages go through the store under
the same keys a lone trial uses, so either reuses the other's. Members of another kind
than IMP (the baselines of engine/kinds.py) have no pack walk and run one by one.
"""

from __future__ import annotations

from typing import Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.engine.pack_lineage import pack_lineages, run_packed
from lth_search.engine.probes import attach_probes
from lth_search.engine.results import LineageResult, RoundResult
from lth_search.engine.stage_source import StageSource
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.trial import limit_resources, round_report, run_trial

PackReport = Callable[[int, int, str, dict[str, Any]], None]
"""(member index, round, stage key, metrics): a member's report after each of its rounds."""


def run_trial_pack(
    cfgs: list[ExperimentConfig],
    store: StageSource,
    report: PackReport,
    records: list[TrialRecord],
    node_id: str | None = None,
) -> list[LineageResult]:
    """Walk the members' lineages (IMP ones as packs of `resources.pack`); finish their records."""
    limit_resources(cfgs[0])
    results: dict[int, LineageResult] = {}
    lone = [i for i, cfg in enumerate(cfgs) if cfg.prune.kind != "imp"]
    for i in lone:
        results[i] = run_trial(cfgs[i], store, lambda r, key, m, i=i: report(i, r, key, m), records[i],
                               node_id=node_id)
    packed = [i for i in range(len(cfgs)) if i not in lone]
    lineages = pack_lineages([cfgs[i] for i in packed], store)
    for lineage in lineages:
        attach_probes(lineage)  # as KindLineage does for a lone trial
    for i in packed:
        records[i].begin_attempt(node_id, -1)
    extra = {"node_id": node_id} if node_id is not None else {}

    def on_round(j: int, round_result: RoundResult, result: LineageResult) -> None:
        record = records[packed[j]]
        record.update(result)
        record.save(store)
        metrics = {**round_report(result, round_result, record.attempt), **extra}
        report(packed[j], round_result.round, round_result.key, metrics)

    for i, result in zip(packed, run_packed(lineages, on_round=on_round)):
        results[i] = result
        records[i].update(result)
        records[i].status = TrialStatus.FINISHED
        records[i].save(store)
    return [results[i] for i in range(len(cfgs))]
