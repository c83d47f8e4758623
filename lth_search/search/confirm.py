"""Confirmation runs on Ray: the candidates x fresh seeds, as a second Tune run.

Each run is a whole lineage of a candidate recipe with the search config's seed replaced
by a fresh one (new data split, init and batch order), its stages through the same store.
The runs are dealt into packs (runs/confirmation.py `pack_runs`: at least one per
concurrent worker, at most `resources.pack` lineages each); a Ray trial walks one pack
with the Ray-free `run_trials`, as one batched network per step. Its record goes to the
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
    add_report,
    candidates,
    confirm_seeds,
    confirmation_of,
    pack_runs,
    recipe_text,
)
from lth_search.runs.record import TrialRecord
from lth_search.runs.trial import run_trials
from lth_search.search.console import result_files
from lth_search.search.ray_leases import RayLeaseService
from lth_search.search.ray_storage import ray_storage
from lth_search.store.stage_store import StageStore

ROLE = "confirm"


def confirm_config(base: dict[str, Any], recipe: dict[str, Any], seed: int) -> ExperimentConfig:
    """The search config with a candidate's choices and a fresh seed."""
    cfg = validate_config(base, source="search config").with_choices(recipe)
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    return validate_config(data, source="confirmation config")


def confirm_trial(
    config: dict[str, Any], base: dict[str, Any], recipes: list[dict[str, Any]], packs: list[list[list[int]]],
    search_id: str,
) -> None:
    """The function trainable of one pack of confirmation runs: [(recipe index, seed), ...] -> lineages."""
    runs = [(int(index), int(seed)) for index, seed in packs[int(config["pack"])]]
    cfgs = [confirm_config(base, recipes[index], seed) for index, seed in runs]
    trial_id = tune.get_context().get_trial_id()
    store = StageStore(
        cfgs[0].store_uri(), lease_timeout_s=cfgs[0].store.lease_timeout_s, heartbeat_s=cfgs[0].store.heartbeat_s,
        lease_service=RayLeaseService(cfgs[0].name, owner=f"confirm:{trial_id}"),
    )
    records = [
        TrialRecord.open(store, cfg.name, f"{search_id}-r{index}-s{seed}", search_id, None, recipes[index],
                         cfg.model_dump(mode="json"), role=ROLE)
        for cfg, (index, seed) in zip(cfgs, runs)
    ]

    def reporter(index: int, seed: int) -> Callable[[int, str, dict[str, Any]], None]:
        return lambda _round, _key, metrics: tune.report({"recipe": index, "seed": seed, **metrics})

    run_trials(cfgs, store, [reporter(index, seed) for index, seed in runs], records,
               node_id=ray.get_runtime_context().get_node_id())


def run_confirmation(
    cfg: ExperimentConfig, search_id: str, results_path: str, records: list[TrialRecord],
    progress: Callable[[str], None],
) -> Confirmation | None:
    """Select on fresh seeds (the default and the top recipes), then, when a searched recipe
    won, measure its gain on reporting seeds; None when confirmation is off."""
    seeds = confirm_seeds(cfg)
    if not seeds:
        return None
    recipes = candidates(records, cfg.default_recipe(), cfg.search.confirm_top_k)
    progress(f"confirming {len(recipes)} recipe(s) on {len(seeds)} fresh selection seeds {seeds}:")
    for index, recipe in enumerate(recipes):
        progress(f"  {'default' if index == 0 else f'top {index}'}: {recipe_text(recipe)}")
    confirmation = confirmation_of(cfg, recipes, _run_panel(cfg, search_id, results_path, recipes, seeds, "confirm"))
    chosen = confirmation.chosen
    if chosen.is_default or not confirmation.report_seeds:
        return confirmation
    pair = [confirmation.default.recipe, chosen.recipe]
    progress(f"measuring the chosen recipe against the default on {len(confirmation.report_seeds)} reporting seeds "
             f"{confirmation.report_seeds} (they take part in no choice)")
    add_report(confirmation, _run_panel(cfg, search_id, results_path, pair, confirmation.report_seeds, "report"))
    return confirmation


def _run_panel(cfg: ExperimentConfig, search_id: str, results_path: str, recipes: list[dict[str, Any]],
               seeds: list[int], phase: str) -> list[tuple[int, int, TrialRecord]]:
    """Every recipe on every seed as one Tune run of packs; (recipe index, seed, final record) per run."""
    runs = [(index, seed) for index in range(len(recipes)) for seed in seeds]
    packs = pack_runs(runs, cfg.search.max_concurrent, cfg.resources.pack)
    storage, name = results_path.rsplit("/", 1)
    storage_path, filesystem = ray_storage(storage)
    trainable = tune.with_resources(
        tune.with_parameters(confirm_trial, base=cfg.model_dump(mode="json"), recipes=recipes,
                             packs=[[list(run) for run in pack] for pack in packs], search_id=search_id),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"pack": tune.grid_search(list(range(len(packs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.search.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{name}-{phase}", storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures), verbose=0,
            callbacks=result_files(),
        ),
    )
    tuner.fit()
    store = StageStore.from_config(cfg)
    done = []
    for record in TrialRecord.load_all(store, cfg.name, search_id, role=ROLE):
        index = next((i for i, r in enumerate(recipes) if r == record.choices), None)
        seed = int(record.config["seed"])
        if index is not None and seed in seeds and record.status.final:
            done.append((index, seed, record))
    return done
