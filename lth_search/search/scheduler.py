"""Early stopping that is fair across pruning rates, and an Optuna searcher that says "pruned".

A fixed round budget rewards the pruning rate, not ticket quality: after 3 rounds rate
0.4 shows 78 % sparsity and rate 0.2 shows 49 %, so round-clocked ASHA cuts the slow
pruner even when it is better at every sparsity both reached. Here ASHA's clock is the
*sparsity level* (how many 20 % prunes the remaining weights amount to) and its
yardstick the val accuracy margin over the dense network there, so lineages are
compared at equal sparsity. A fast pruner reaches a rung at a sparsity at or above the
rung's, so the comparison can only favour the slow one.

The default recipe (the config's own, the first trial of every search) is never stopped
(`DefaultToTheEnd`): it is what every searched recipe is measured against, so it is judged
to the end of its run; its results still set the rungs the others are cut at.

Ray's OptunaSearch tells a trial the scheduler stopped as COMPLETE with its last value;
a truncated score is not a result, so `PruningAwareOptunaSearch` tells it as PRUNED
(TPE then ranks it by its intermediate values). Whether a lineage ended by itself is
in its trial record: the runner marks it finished before the trial returns.
"""

from __future__ import annotations

import warnings
from typing import Any

from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from lth_search.config import ExperimentConfig
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.trial import DEFAULT_RECIPE, SPARSITY_LEVEL, VAL_MARGIN, sparsity_level
from lth_search.search.trial_status import ended_orphans
from lth_search.store.stage_store import StageStore

RAY_TRIAL_ATTR = "ray_trial_id"
MLFLOW_RUN_ATTR = "mlflow_run_id"
"""User attributes of each Optuna trial: its Ray trial id, and its MLflow run id (which the trainable
reports under the same key), so a study in optuna-dashboard leads to the run and the trial."""
DUPLICATE_ATTR = "duplicate_of"
"""User attribute of a proposal drawn again because it repeated a running trial's recipe: that trial's Ray id."""
REDRAWS = 8
"""Proposals drawn again at most per trial when they repeat a running recipe (a space smaller than the
concurrency then runs a copy rather than ask forever)."""


def max_level(cfg: ExperimentConfig) -> int:
    """The highest level any lineage of the search can reach (its round cap at its fastest rate)."""
    rates = cfg.searched_values().get("rate", [cfg.prune.rate])
    return sparsity_level(1.0 - (1.0 - max(rates)) ** max(1, cfg.prune.rounds)) + 1


def _created_at(trial: Any) -> tuple[int, str]:
    """A trial's place in the order Tune created it: its experiment tag begins with Tune's counter
    (search_generator.py, `"{counter}_{config}"`); a tag without it sorts last, by trial id."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return (int(head), "") if head.isdigit() else (1 << 62, str(trial.trial_id))


def first_waiting(tune_controller: Any) -> Any:
    """FIFOScheduler's choice (the first pending trial, else the first paused one, in creation order)
    among the live trials instead of every trial the search ever had: Tune asks at every step, and a scan
    of all of them makes a search quadratic in its trials (1.2 s of the driver at 1,000, ~2 min at
    10,000; issue 24). Live trials are the running and waiting ones: a few."""
    live = tune_controller.get_live_trials()
    for status in (Trial.PENDING, Trial.PAUSED):
        waiting = [trial for trial in live if trial.status == status]
        if waiting:
            return min(waiting, key=_created_at)
    return None


class ChoosesAmongLive:
    """A scheduler mixin: FIFO's choice among the live trials (`first_waiting`)."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return first_waiting(tune_controller)


class LiveFIFOScheduler(ChoosesAmongLive, FIFOScheduler):
    """FIFOScheduler choosing among the live trials."""


def make_scheduler(cfg: ExperimentConfig) -> Any:
    asha = cfg.search.asha
    if not asha.enabled or cfg.prune.rounds < 2:
        return LiveFIFOScheduler()
    return DefaultToTheEnd(
        time_attr=SPARSITY_LEVEL,
        metric=VAL_MARGIN,
        mode="max",
        max_t=max(max_level(cfg), asha.grace_period + 1),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


class DefaultToTheEnd(ChoosesAmongLive, ASHAScheduler):
    """ASHA at equal sparsity that never stops the default recipe (its results still count)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(DEFAULT_RECIPE) else decision


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells a lineage the scheduler stopped as PRUNED, not as COMPLETE.

    Ray pickles the searcher's `__dict__` into its experiment state, so it keeps only the
    config and opens the store when a trial completes.
    """

    def __init__(self, *args: Any, cfg: ExperimentConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lth_cfg = cfg.model_dump(mode="json")

    def _setup_study(self, mode: str | list) -> None:
        """The study, its objectives named (optuna-dashboard shows them instead of "Objective 0")."""
        super()._setup_study(mode)
        names = self._metric if isinstance(self._metric, list) else [self._metric]
        if self._ot_study.metric_names != names:
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2: not the user's concern
                warnings.simplefilter("ignore", ExperimentalWarning)
                self._ot_study.set_metric_names(names)

    def suggest(self, trial_id: str) -> dict | None:
        """Optuna's proposal, its trial tagged with the Ray trial id (user attribute `ray_trial_id`).

        A proposal identical to a running trial's recipe is drawn again (at most `REDRAWS` times):
        the copy would wait for each of the other's stages and then report the same bytes, a slot
        idle for a whole lineage (quickstart seed 41: two of its first four trials, 14 s of a core,
        the search's overhead 1.29). Random start-up draws with replacement, and in a small space
        TPE proposes a running recipe too. The copy's Optuna trial is told FAIL, which TPE ignores,
        with user attribute `duplicate_of` naming the running trial. A recipe that ended is not
        redrawn: proposing it again is TPE's own judgement, and its stages are all stored."""
        config = super().suggest(trial_id)
        for _ in range(REDRAWS):
            twin = self._running_twin(trial_id)
            if twin is None:
                break
            copy = self._ot_trials.pop(trial_id)
            copy.set_user_attr(DUPLICATE_ATTR, twin)
            self._tell_failed(copy)
            config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and RAY_TRIAL_ATTR not in ot_trial.user_attrs:
            ot_trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def _tell_failed(self, copy: Any) -> None:
        """Tells Optuna a drawn copy FAILed. Optuna's own BruteForceSampler calls `Study.stop` from
        `after_trial` once every recipe has run or runs, and `stop` raises RuntimeError outside
        `Study.optimize` (a resumed exhaustive search, in CI). Searches now use
        `space.ExhaustiveSampler`, which does not stop; a search saved before it brings the old
        sampler back in Ray's snapshot. Optuna stores the state in its tell's `finally`, so the
        copy is FAIL either way; anything else is raised."""
        try:
            self._ot_study.tell(copy, state=TrialState.FAIL)
        except RuntimeError:
            if not copy.storage.get_trial(copy._trial_id).state.is_finished():
                raise

    def _running_twin(self, trial_id: str) -> str | None:
        """The running trial (its Ray id) whose recipe `trial_id`'s proposal repeats, if any: the
        searcher keeps an Optuna trial only while its trial runs (`on_trial_complete` drops it)."""
        params = self._ot_trials[trial_id].params
        return next((other for other, ot_trial in self._ot_trials.items()
                     if other != trial_id and ot_trial.params == params), None)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Also links the Optuna trial to the trial's MLflow run (user attribute `mlflow_run_id`).

        A trial the study holds as finished (`_told_before`) is left alone: Optuna refuses any
        update to it, its user attributes too."""
        if self._told_before(trial_id):
            return
        ot_trial = self._ot_trials.get(trial_id)
        run_id = result.get(MLFLOW_RUN_ATTR)
        if ot_trial is not None and run_id and trial_id not in self._completed_trials \
                and ot_trial.user_attrs.get(MLFLOW_RUN_ATTR) != run_id:
            ot_trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
        super().on_trial_result(trial_id, result)

    def _told_before(self, trial_id: str) -> bool:
        """Whether the study already holds this trial's end, though this searcher has not told it.

        Ray snapshots the search on its own clock (driver.py), so a search resumed after a killed
        driver may run again a lineage that ended after the snapshot: the store gives it every
        stage back, and its reports reach a searcher restored from before its end, while the
        study (the journal, written as it goes) has it finished. Optuna refuses to update a
        finished trial; what it holds is that trial's result already. (`Trial._trial_id` is
        Optuna's own key of the trial, private in Optuna 5.1.)"""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        return ot_trial.storage.get_trial(ot_trial._trial_id).state.is_finished()

    def relocate(self, cfg: ExperimentConfig, journal: str) -> None:
        """After Ray restored this searcher for a search resumed in another folder (search/relocation.py)."""
        from lth_search.search.relocation import relocate_study

        self._lth_cfg = cfg.model_dump(mode="json")
        if self._ot_study is not None:
            relocate_study(self._ot_study, journal)

    def adopt_ended_orphans(self, search_id: str) -> int:
        """Count, once, the trials of this search that ended after Ray's last snapshot
        (trial_status.py `ended_orphans`); returns how many are new. A resumed search runs that
        many fewer trials (relocation.py), so its lineages stay within its budget. The ones
        counted are kept (`_adopted`, pickled with this searcher into Ray's snapshots), so a
        search resumed again does not count them twice."""
        name, store = self._records()
        records = TrialRecord.load_all(store, name, search_id, unreadable=[])
        adopted: set[str] = self.__dict__.setdefault("_adopted", set())  # absent from a searcher saved before it
        known = set(self._completed_trials) | set(self._ot_trials) | adopted
        found = ended_orphans(records, known)
        adopted |= found
        return len(found)

    def _records(self) -> tuple[str, StageStore]:
        """(the search's name, the store its trial records are in), from the config it keeps."""
        cfg = ExperimentConfig.model_validate(self._lth_cfg)
        return cfg.name, StageStore.from_config(cfg)

    def _ended_by_itself(self, trial_id: str) -> bool:
        name, store = self._records()
        record = TrialRecord.load(store, name, trial_id)
        return record is not None and record.status is TrialStatus.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tells Optuna, then forgets the trial's Optuna handle.

        OptunaSearch keeps every trial's `optuna.Trial` (`_ot_trials`, with its cached
        FrozenTrial) for good, and Ray pickles the searcher into every snapshot of the search:
        ~1.2 KB a trial, written again at every snapshot. A told trial's handle is never used
        again (`_completed_trials` answers a late result or completion; the study holds the
        trial), so only running trials keep one. Checked against Ray 2.60's OptunaSearch.
        """
        if self._told_before(trial_id):
            self._completed_trials.add(trial_id)
            self._ot_trials.pop(trial_id, None)
            return
        if result and not error and not self._ended_by_itself(trial_id):
            result = None  # OptunaSearch tells a trial without a value as PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
        if trial_id in self._completed_trials:
            self._ot_trials.pop(trial_id, None)
