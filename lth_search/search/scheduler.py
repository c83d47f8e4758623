"""Early stopping that is fair across pruning rates, and an Optuna searcher that says "pruned".

A fixed round budget rewards the pruning rate, not ticket quality: after 3 rounds rate
0.4 shows 78 % sparsity and rate 0.2 shows 49 %, so round-clocked ASHA cuts the slow
pruner even when it is better at every sparsity both reached. Here ASHA's clock is the
*sparsity level* (how many 20 % prunes the remaining weights amount to) and its
yardstick the val accuracy margin over the dense network there, so lineages are
compared at equal sparsity. A fast pruner reaches a rung at a sparsity at or above the
rung's, so the comparison can only favour the slow one.

Ray's OptunaSearch tells a trial the scheduler stopped as COMPLETE with its last value;
a truncated score is not a result, so `PruningAwareOptunaSearch` tells it as PRUNED
(TPE then ranks it by its intermediate values). Whether a lineage ended by itself is
in its trial record: the runner marks it finished before the trial returns.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from lth_search.config import ExperimentConfig
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.trial import SPARSITY_LEVEL, VAL_MARGIN, sparsity_level
from lth_search.store.stages import StageStore


def max_level(cfg: ExperimentConfig) -> int:
    """The highest level any lineage of the search can reach (its round cap at its fastest rate)."""
    rates = cfg.searched_values().get("rate", [cfg.prune.rate])
    return sparsity_level(1.0 - (1.0 - max(rates)) ** max(1, cfg.prune.rounds)) + 1


def make_scheduler(cfg: ExperimentConfig) -> Any:
    asha = cfg.search.asha
    if not asha.enabled or cfg.prune.rounds < 2:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=SPARSITY_LEVEL,
        metric=VAL_MARGIN,
        mode="max",
        max_t=max(max_level(cfg), asha.grace_period + 1),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells a lineage the scheduler stopped as PRUNED, not as COMPLETE.

    Ray pickles the searcher's `__dict__` into its experiment state, so it keeps only the
    config and opens the store when a trial completes.
    """

    def __init__(self, *args: Any, cfg: ExperimentConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lth_cfg = cfg.model_dump(mode="json")

    def relocate(self, cfg: ExperimentConfig, journal: str) -> None:
        """After Ray restored this searcher for a search resumed in another folder (search/relocation.py)."""
        from lth_search.search.relocation import relocate_study

        self._lth_cfg = cfg.model_dump(mode="json")
        if self._ot_study is not None:
            relocate_study(self._ot_study, journal)

    def _ended_by_itself(self, trial_id: str) -> bool:
        cfg = ExperimentConfig.model_validate(self._lth_cfg)
        record = TrialRecord.load(StageStore.from_config(cfg), cfg.name, trial_id)
        return record is not None and record.status is TrialStatus.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and not self._ended_by_itself(trial_id):
            result = None  # OptunaSearch tells a trial without a value as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
