"""The Optuna side of a search: the define-by-run space, the sampler, the objectives.

Each `search.space` key that is not null becomes a categorical choice (discrete values
let lineages share stage prefixes, so the store can reuse them); a null key stays at its
`prune` value. Layer-group ratios are one choice per group, named "layer_ratios/<group>"
as `ExperimentConfig.with_choices` expects.

The space is a plain picklable object, not a closure: Ray saves the searcher (and so
the space) with `pickle` for `Tuner.restore`.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from lth_search.config import ExperimentConfig
from lth_search.search.journal import journal_storage
from lth_search.search.tpe_cache import EndedTrialsTPESampler

OPTUNA_TRIAL_KEY = "optuna_trial"
"""Config key carrying the Optuna trial number, so a Ray trial can be matched to its study trial."""

PRIMARY_METRIC = "matching_sparsity"
SECONDARY_METRIC = "matching_val_accuracy"


class DefineByRunSpace:
    """`space(trial)` suggests every searched key; called by Ray's OptunaSearch once per trial."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.categorical: dict[str, list[Any]] = searched_values(cfg)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        for name, values in self.categorical.items():
            trial.suggest_categorical(name, values)
        return {OPTUNA_TRIAL_KEY: trial.number}


def searched_values(cfg: ExperimentConfig) -> dict[str, list[Any]]:
    """Each searched choice name with its candidate values (in config order)."""
    return cfg.searched_values()


def choices_of(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The flat choices ("rate", "layer_ratios/fc", ...) of a Ray trial config.

    Ray unflattens "a/b" keys into nested dicts; `with_choices` wants them flat.
    """
    choices: dict[str, Any] = {}
    for key, value in trial_config.items():
        if key == OPTUNA_TRIAL_KEY:
            continue
        if isinstance(value, dict):
            for sub, inner in value.items():
                choices[f"{key}/{sub}"] = inner
        else:
            choices[key] = value
    return choices


def objectives(cfg: ExperimentConfig) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) for OptunaSearch: one objective, or (matching sparsity, val accuracy at it)."""
    if cfg.search.objectives == 2:
        return [PRIMARY_METRIC, SECONDARY_METRIC], ["max", "max"]
    return PRIMARY_METRIC, "max"


def space_size(cfg: ExperimentConfig) -> int:
    """How many distinct recipes the space holds (1 when nothing is searched)."""
    return math.prod(len(values) for values in cfg.searched_values().values())


def startup_trials(budget: int) -> int:
    """TPE's random start-up for a budget: Optuna's 10 would leave a 12-trial search random."""
    return max(2, min(10, budget // 3))


def sampler_name(cfg: ExperimentConfig) -> str:
    """The sampler `auto` resolves to: exhaustive when the budget covers the space, else TPE."""
    name = cfg.search.sampler
    if cfg.search.objectives == 2 and name in ("auto", "tpe"):
        return "nsga2"
    if name == "auto":
        return "exhaustive" if cfg.search.num_trials >= space_size(cfg) else "tpe"
    return name


def trial_budget(cfg: ExperimentConfig) -> int:
    """Trials the search runs: an exhaustive search stops when every recipe ran once."""
    if sampler_name(cfg) == "exhaustive":
        return min(cfg.search.num_trials, space_size(cfg))
    return cfg.search.num_trials


class PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """NSGA-II that Ray can pickle into its experiment state: Optuna 5.1's genetic samplers hold
    a `threading.Lock` and define no `__getstate__` (Tuner failed with "cannot pickle
    '_thread.lock' object" for every two-objective search). The lock is made anew on load."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class ExhaustiveSampler(optuna.samplers.BruteForceSampler):
    """Optuna's brute force, without its `Study.stop` once every recipe has run or runs: `stop`
    raises RuntimeError outside `Study.optimize`, and Ray's OptunaSearch tells trials outside it,
    so every trial's end after the last recipe was drawn logged that error as a warning (and a
    drawn copy's tell raised it: scheduler.py). The search ends by its budget (`trial_budget`)."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Any) -> None:
        return None


def make_sampler(cfg: ExperimentConfig) -> optuna.samplers.BaseSampler:
    """The sampler `sampler_name` names, seeded by the config's seed."""
    name = sampler_name(cfg)
    if name == "exhaustive":
        with warnings.catch_warnings():  # "experimental" since Optuna 3.1: not the user's concern
            warnings.simplefilter("ignore", ExperimentalWarning)
            return ExhaustiveSampler(seed=cfg.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if name == "nsga2":
        return PicklableNSGAII(seed=cfg.seed)
    return EndedTrialsTPESampler(seed=cfg.seed, n_startup_trials=startup_trials(cfg.search.num_trials))


def close_orphans(journal: str, study_name: str) -> int:
    """Fail the study's trials still RUNNING once a search has ended; returns how many.

    They belong to trials a killed driver had started after Ray's last snapshot: Ray
    never resumes them, and a RUNNING trial would stay in the study forever.
    """
    study = optuna.load_study(study_name=study_name, storage=journal_storage(journal))
    running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in running:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(running)
