"""Early stopping is fair across pruning rates; a stopped lineage is told to Optuna as pruned.

Synthetic accuracy curves through a real Ray Tune run with the search's own scheduler
and searcher: a slow pruner (rate 0.2) that is better at every sparsity both reach
must not be stopped before a fast, worse one (rate 0.4). Round-clocked ASHA on the
matching sparsity, what the search used before, stops exactly that slow pruner: the
contrast shows the test can fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import ray.cloudpickle
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from conftest import tiny_config
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.trial import DEFAULT_RECIPE, SPARSITY_LEVEL, VAL_MARGIN, sparsity_level
from lth_search.search.scheduler import MLFLOW_RUN_ATTR, PruningAwareOptunaSearch, make_scheduler
from lth_search.search.space import journal_storage
from lth_search.store.stage_store import StageStore

DENSE_VAL = 0.65
CURVES = {
    # name: (rate, val accuracy drop below dense at every round); both match within 2 pp
    "slow_good": (0.2, 0.002),
    "fast_bad": (0.4, 0.015),
}
ROUNDS = 8

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import a test module


def synthetic_lineage(config: dict, store_uri: str, search: str, default_curve: str | None = None) -> None:
    """Reports what a lineage trial reports, from a known curve; ends like the runner does."""
    rate, drop = CURVES[config["curve"]]
    trial_id = tune.get_context().get_trial_id()
    for round_index in range(1, ROUNDS + 1):
        sparsity = 1 - (1 - rate) ** round_index
        tune.report({
            "round": round_index, "sparsity": sparsity, "val_accuracy": DENSE_VAL - drop,
            SPARSITY_LEVEL: sparsity_level(sparsity), VAL_MARGIN: -drop, "matching_sparsity": sparsity,
            DEFAULT_RECIPE: int(config["curve"] == default_curve),
        })
    record = TrialRecord(search=search, trial_id=trial_id, status=TrialStatus.FINISHED)
    record.save(StageStore(store_uri))


def run(scheduler, searcher, store_uri: str, search: str, tmp_path: Path, default_curve: str | None = None
        ) -> dict[str, int]:
    """curve -> the last round it reported (`default_curve` reports itself as the default recipe)."""
    trainable = tune.with_parameters(synthetic_lineage, store_uri=store_uri, search=search, default_curve=default_curve)
    grid = tune.Tuner(
        trainable,
        # one actor runs both trials in turn (a second would only repeat the first's start-up)
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=len(CURVES),
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=search, storage_path=str(tmp_path / "ray"), verbose=0),
    ).fit()
    return {r.config["curve"]: r.metrics["round"] for r in grid}


def curve_space(trial: optuna.Trial) -> None:
    trial.suggest_categorical("curve", list(CURVES))


def searcher(cfg, tmp_path: Path, study: str, first: str) -> PruningAwareOptunaSearch:
    """The search's searcher over the two curves, `first` tried first (one trial at a time)."""
    order = [first, *(name for name in CURVES if name != first)]
    return PruningAwareOptunaSearch(
        space=curve_space, metric="matching_sparsity", mode="max", sampler=optuna.samplers.BruteForceSampler(seed=0),
        study_name=study, storage=journal_storage(str(tmp_path / f"{study}.journal")),
        points_to_evaluate=[{"curve": name} for name in order], cfg=cfg,
    )


@pytest.mark.parametrize("first", ["fast_bad", "slow_good"])
def test_a_slow_better_pruner_is_never_stopped_and_stopped_trials_are_pruned(ray_local, data_root, tmp_path, first):
    cfg = tiny_config(data_root, tmp_path, name="fair", prune__rounds=ROUNDS, search__asha__grace_period=3,
                      **{"search.space.rate": "[0.2, 0.4]"})
    last = run(make_scheduler(cfg), searcher(cfg, tmp_path, "fair", first), cfg.store_uri(), "fair", tmp_path)
    assert last["slow_good"] == ROUNDS  # never cut, though it is slower, whichever ran first
    study = optuna.load_study(study_name="fair", storage=journal_storage(str(tmp_path / "fair.journal")))
    states = {t.params["curve"]: t.state for t in study.trials}
    assert states["slow_good"] == optuna.trial.TrialState.COMPLETE
    if first == "slow_good":  # the worse one arrives at a rung second: cut there, and told as pruned
        assert last["fast_bad"] < ROUNDS
        assert states["fast_bad"] == optuna.trial.TrialState.PRUNED


def test_the_default_recipe_is_judged_to_the_end(ray_local, data_root, tmp_path):
    """The worse pruner, arriving second at a rung, is cut above; as the default recipe it never is."""
    cfg = tiny_config(data_root, tmp_path, name="default", prune__rounds=ROUNDS, search__asha__grace_period=3,
                      **{"search.space.rate": "[0.2, 0.4]"})
    last = run(make_scheduler(cfg), searcher(cfg, tmp_path, "default", "slow_good"), cfg.store_uri(), "default",
               tmp_path, default_curve="fast_bad")
    assert last == {"slow_good": ROUNDS, "fast_bad": ROUNDS}


def test_round_clocked_asha_would_cut_the_slow_pruner(ray_local, data_root, tmp_path):
    """The contrast: ASHA on rounds and matching sparsity stops the better, slower pruner."""
    cfg = tiny_config(data_root, tmp_path, name="unfair", prune__rounds=ROUNDS,
                      **{"search.space.rate": "[0.2, 0.4]"})
    unfair = ASHAScheduler(time_attr="training_iteration", metric="matching_sparsity", mode="max",
                           max_t=ROUNDS, grace_period=3, reduction_factor=2)
    last = run(unfair, searcher(cfg, tmp_path, "unfair", "fast_bad"), cfg.store_uri(), "unfair", tmp_path)
    assert last["slow_good"] < ROUNDS


@pytest.mark.parametrize(("sparsity", "level"), [(0.0, 0), (0.2, 1), (0.36, 2), (0.488, 3), (0.4, 2), (0.64, 4)])
def test_sparsity_level_counts_twenty_percent_prunes(sparsity, level):
    assert sparsity_level(sparsity) == level


def test_a_searcher_restored_from_before_a_trials_end_does_not_tell_the_study_twice(data_root, tmp_path):
    """Ray snapshots the search on its own clock, so a resumed search may run again a lineage that
    ended after the snapshot; its reports reach a searcher restored from before that end, while the
    study (the journal) holds it finished. Optuna refuses to update a finished trial: the searcher
    must keep the study's end as it is, and go on."""
    cfg = tiny_config(data_root, tmp_path, name="stale", **{"search.space.rate": "[0.2, 0.4]"})
    live = searcher(cfg, tmp_path, "stale", "slow_good")
    assert live.suggest("t1") is not None
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    live.save_to_dir(str(snapshot), session_str="s")  # Ray's snapshot, taken before t1 ends
    result = {"matching_sparsity": 0.5, "training_iteration": 1}
    live.on_trial_result("t1", result)
    live.on_trial_complete("t1", {**result, "matching_sparsity": 0.6})

    restored = searcher(cfg, tmp_path, "stale", "slow_good")
    restored.restore_from_dir(str(snapshot))
    # the lineage run again (every stage from the store), its results naming another MLflow run:
    # Optuna refuses a finished trial's user attributes too
    restored.on_trial_result("t1", {**result, MLFLOW_RUN_ATTR: "a-run-the-study-never-saw"})
    restored.on_trial_complete("t1", {**result, "matching_sparsity": 0.6})
    assert restored.suggest("t2") is not None  # and the search goes on

    study = optuna.load_study(study_name="stale", storage=journal_storage(str(tmp_path / "stale.journal")))
    first = study.trials[0]
    assert first.state.is_finished() and first.intermediate_values == {1: 0.5}
    assert sum(t.state.is_finished() for t in study.trials) == 1


class _Trials:
    """What Tune hands a scheduler (its controller, wrapped): every trial in creation order, and the live ones."""

    def __init__(self, trials: list) -> None:
        self.trials = trials

    def get_trials(self) -> list:
        return self.trials

    def get_live_trials(self) -> set:
        return {trial for trial in self.trials if trial.status != "TERMINATED"}


@pytest.mark.parametrize("asha", [False, True])
def test_the_scheduler_chooses_as_fifo_does_from_the_live_trials_alone(asha: bool, tmp_path: Path) -> None:
    # Tune asks the scheduler at every step; FIFO's scan of every trial ever made is quadratic in a
    # search's trials (issue 24). Choosing among the live ones must give FIFO's answer whatever the
    # trials' statuses: the first pending trial in creation order, else the first paused one.
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    cfg = tiny_config(tmp_path, tmp_path, prune__rounds=3, search__asha__enabled=str(asha).lower())
    scheduler = make_scheduler(cfg)
    # Tune's tag begins with its counter: 10 sorts after 9, not between 1 and 2 as text would
    trials = [Trial("__fake", experiment_tag=f"{n}_rate=0.{n}", stub=True) for n in (1, 2, 9, 10, 11)]
    cases = [
        ("TERMINATED", "RUNNING", "PENDING", "PENDING", "PENDING"),  # the 9th, not the 10th
        ("TERMINATED", "PAUSED", "RUNNING", "PAUSED", "TERMINATED"),  # no pending trial: the first paused
        ("PENDING", "TERMINATED", "PAUSED", "PENDING", "RUNNING"),  # pending before paused
        ("TERMINATED", "RUNNING", "TERMINATED", "RUNNING", "ERROR"),  # none waits
    ]
    for statuses in cases:
        for trial, status in zip(trials, statuses):
            trial.set_status(status)
        expected = FIFOScheduler().choose_trial_to_run(_Trials(trials))
        assert scheduler.choose_trial_to_run(_Trials(trials)) is expected, statuses
    assert expected is None
