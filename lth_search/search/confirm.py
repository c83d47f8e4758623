"""Confirmation runs on Ray: the candidates x fresh seeds, as a second Tune run.

Each run is a whole lineage of a candidate recipe with the search config's seed replaced
by a fresh one (new data split, init and batch order), walked by the same Ray-free trial
runner as search trials, its stages through the same store. Its record goes to the
search's `confirm-<name>` records, not MLflow's child runs: the parent run shows the
confirmation table (runs/confirmation.py scores it). A driver killed during
confirmation reruns it on resume, and every stored stage is reused.
"""

from __future__ import annotations

from typing import Any, Callable

import ray
from ray import tune

from lth_search.config import ExperimentConfig, validate_config
from lth_search.runs.confirmation import (
    Confirmation,
    candidates,
    confirm_seeds,
    confirmation_of,
    recipe_text,
)
from lth_search.runs.record import TrialRecord
from lth_search.runs.trial import run_trial
from lth_search.search.ray_leases import RayLeaseService
from lth_search.store.stages import StageStore

ROLE = "confirm"


def confirm_config(base: dict[str, Any], recipe: dict[str, Any], seed: int) -> ExperimentConfig:
    """The search config with a candidate's choices and a fresh seed."""
    cfg = validate_config(base, source="search config").with_choices(recipe)
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    return validate_config(data, source="confirmation config")


def confirm_trial(config: dict[str, Any], base: dict[str, Any], recipes: list[dict[str, Any]], search_id: str) -> None:
    """The function trainable of one confirmation run: (recipe index, seed) -> a lineage."""
    index, seed = int(config["recipe"]), int(config["seed"])
    cfg = confirm_config(base, recipes[index], seed)
    trial_id = tune.get_context().get_trial_id()
    store = StageStore(
        cfg.store_uri(), lease_timeout_s=cfg.store.lease_timeout_s, heartbeat_s=cfg.store.heartbeat_s,
        lease_service=RayLeaseService(cfg.name, owner=f"confirm:{trial_id}"),
    )
    record = TrialRecord.open(
        store, cfg.name, f"{search_id}-r{index}-s{seed}", search_id, None, recipes[index],
        cfg.model_dump(mode="json"), role=ROLE,
    )

    def report(round_index: int, _: str, metrics: dict[str, Any]) -> None:
        tune.report({"recipe": index, "seed": seed, **metrics})

    run_trial(cfg, store, report, record, node_id=ray.get_runtime_context().get_node_id())


def run_confirmation(
    cfg: ExperimentConfig, search_id: str, results_path: str, records: list[TrialRecord],
    progress: Callable[[str], None],
) -> Confirmation | None:
    """Re-run the default and the top recipes on fresh seeds; None when confirmation is off."""
    seeds = confirm_seeds(cfg)
    if not seeds:
        return None
    recipes = candidates(records, cfg.default_recipe(), cfg.search.confirm_top_k)
    progress(f"confirming {len(recipes)} recipe(s) on {len(seeds)} fresh seeds {seeds}:")
    for index, recipe in enumerate(recipes):
        progress(f"  {'default' if index == 0 else f'top {index}'}: {recipe_text(recipe)}")
    storage, name = results_path.rsplit("/", 1)
    trainable = tune.with_resources(
        tune.with_parameters(confirm_trial, base=cfg.model_dump(mode="json"), recipes=recipes, search_id=search_id),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"recipe": tune.grid_search(list(range(len(recipes)))), "seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.search.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{name}-confirm", storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures), verbose=0,
        ),
    )
    tuner.fit()
    store = StageStore.from_config(cfg)
    runs = []
    for record in TrialRecord.load_all(store, cfg.name, search_id, role=ROLE):
        index = next((i for i, r in enumerate(recipes) if r == record.choices), None)
        if index is not None and record.status.final:
            runs.append((index, int(record.config["seed"]), record))
    return confirmation_of(cfg, recipes, runs)
