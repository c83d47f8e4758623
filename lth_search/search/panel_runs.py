"""What a confirmation worker runs (panel_workers.py): a pack of runs, or dense stages ahead.

A run is a whole lineage of a candidate recipe with the search config's seed replaced by a
fresh one (new data split, init and batch order), its stages through the search's store
and its leases through the search's lease actor. Its record (role `confirm`) is its
result: the driver reads the records when the panel has ended (confirm.py).
"""

from __future__ import annotations

from typing import Any

import ray

from lth_search.config import ExperimentConfig, validate_config
from lth_search.engine.lineage.keys import recipe_identity
from lth_search.engine.lineage.walk import lineages_for, walk
from lth_search.runs.record import TrialRecord
from lth_search.runs.trial import limit_resources, run_trials
from lth_search.search.panel_board import PackHandover, given_runs
from lth_search.search.ray_leases import RayLeaseService
from lth_search.store.stage_store import StageStore

ROLE = "confirm"
"""The records' role: a search's confirmation runs, apart from its trials."""


def confirm_config(base: dict[str, Any], recipe: dict[str, Any], seed: int) -> ExperimentConfig:
    """The search config with a candidate's choices and a fresh seed."""
    cfg = validate_config(base, source="search config").with_choices(recipe)
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    return validate_config(data, source="confirmation config")


def recipe_tag(recipe: dict[str, Any]) -> str:
    """A short name of a recipe that does not depend on its place among the candidates: the
    runs started in the search's tail (panel_workers.py) and the panel name the same run alike."""
    return recipe_identity(recipe)[:10]


def run_id(search_id: str, recipe: dict[str, Any], seed: int) -> str:
    """A confirmation run's record id: the search, the recipe, the seed."""
    return f"{search_id}-{recipe_tag(recipe)}-s{seed}"


def run_pack(base: dict[str, Any], recipes: list[dict[str, Any]], pack: list[list[int]], search_id: str,
             owner: str, board: Any | None = None) -> None:
    """One pack of confirmation runs, [(recipe index, seed), ...], walked as lineages on a worker
    (panel_workers.py); each run's record in the store is its result. With a `board`
    (panel_board.py), the pack hands runs to an idle worker between rounds when asked; a
    retried pack leaves out those it gave away before."""
    given = given_runs(board, owner)
    runs = [run for run in ((int(index), int(seed)) for index, seed in pack) if run not in given]
    if not runs:
        return
    cfgs = [confirm_config(base, recipes[index], seed) for index, seed in runs]
    store = StageStore.from_config(cfgs[0], RayLeaseService(cfgs[0].name, owner=owner))
    records = [
        TrialRecord.open(store, cfg.name, run_id(search_id, recipes[index], seed), search_id, None, recipes[index],
                         cfg.model_dump(mode="json"), role=ROLE)
        for cfg, (index, seed) in zip(cfgs, runs)
    ]
    run_trials(cfgs, store, [_no_report] * len(runs), records, node_id=ray.get_runtime_context().get_node_id(),
               handover=PackHandover(board, owner, runs) if board is not None else None)


def train_dense(base: dict[str, Any], seeds: list[int], owner: str | None) -> None:
    """The dense stages (each seed's own and its replicates) that every recipe's run on `seeds`
    starts from: a dense stage's key holds no recipe, so a worker with nothing else to do
    trains them before the panel that needs them is chosen. `owner` None: no Ray yet, on the
    store's own leases (search/driver.py, while a local Ray starts)."""
    cfgs = [confirm_config(base, {}, seed) for seed in seeds]
    cfgs = [cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"rounds": 0})}) for cfg in cfgs]
    leases = RayLeaseService(cfgs[0].name, owner=owner) if owner is not None else None
    store = StageStore.from_config(cfgs[0], leases)
    limit_resources(cfgs[0])
    walk(lineages_for(cfgs, store))


def _no_report(_round: int, _key: str, _metrics: dict[str, Any]) -> None:
    """A confirmation run's rounds go to its record only (the parent run shows the panel's table)."""

