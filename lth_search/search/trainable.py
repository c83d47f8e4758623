"""The Ray Tune trainable: a thin shell over the Ray-free trial runner (runs/trial.py).

It adds what only Ray has: the trial id, the cluster-wide lease service, the node id,
and `tune.report` with a tiny checkpoint (the last reported round and its stage key).
The store holds the real state, so a retried or resumed trial walks its lineage again,
fetching every finished stage, and reports only rounds it has not reported yet.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from lth_search.config import validate_config
from lth_search.runs.observers import TrialObserverFactory
from lth_search.runs.record import TrialRecord
from lth_search.runs.trial import DEFAULT_RECIPE, run_trial
from lth_search.search.ray_leases import RayLeaseService
from lth_search.search.scheduler import MLFLOW_RUN_ATTR
from lth_search.search.shared_data import SharedDataset
from lth_search.search.space import OPTUNA_TRIAL_KEY, choices_of
from lth_search.store.stage_store import StageStore

CHECKPOINT_FILE = "lineage.json"
PROGRESS_METRICS = ["round", "sparsity", "val_accuracy", "test_accuracy", "matching_sparsity", "reused", "attempt"]
"""What Ray's console shows of each result (everything is still in the results files)."""


def lineage_trial(
    config: dict[str, Any], base: dict[str, Any], dataset: SharedDataset, context: dict[str, Any],
    observer_factory: TrialObserverFactory | None = None,
) -> None:
    """The function trainable (Ray passes `config`; `tune.with_parameters` the rest).

    `base` is the search's config as a dict, `context` holds the search id and the
    tracking parent run id; `observer_factory` opens the trial's tracking run.
    """
    quiet_checkpoint_lines()
    cfg = validate_config(base, source="search config")
    choices = choices_of(config)
    trial_cfg = cfg.with_choices(choices)
    trial_id = tune.get_context().get_trial_id()
    done = _checkpointed_round(tune.get_checkpoint())
    if done >= trial_cfg.prune.rounds:
        return  # restored after its last report (a driver killed before Ray saw the trial end)
    store = StageStore.from_config(trial_cfg, RayLeaseService(cfg.name, owner=f"trial:{trial_id}"))
    record = TrialRecord.open(
        store, cfg.name, trial_id, context.get("search_id"), config.get(OPTUNA_TRIAL_KEY), choices,
        trial_cfg.model_dump(mode="json"),
    )
    observer = None
    if observer_factory is not None:
        # a record is saved after an attempt's first stage, and a run opened only after that
        first_attempt = not record.attempts
        observer = observer_factory(trial_cfg, context.get("parent_run_id"), trial_id, choices,
                                    context.get("search_id"), config.get(OPTUNA_TRIAL_KEY), first_attempt)

    checkpoints = tempfile.TemporaryDirectory(prefix="lth-ckpt-")
    """One folder for the trial's checkpoints: Ray copies it to storage at each report."""

    def report(round_index: int, key: str, metrics: dict[str, Any]) -> None:
        state = {"round": round_index, "key": key, "trial_id": trial_id}
        (Path(checkpoints.name) / CHECKPOINT_FILE).write_text(json.dumps(state))
        run_id = getattr(observer, "run_id", None)  # the trial's MLflow run: the study links to it
        tune.report({**metrics, MLFLOW_RUN_ATTR: run_id} if run_id else metrics,
                    checkpoint=tune.Checkpoint.from_directory(checkpoints.name))

    node_id = ray.get_runtime_context().get_node_id()
    is_default = int(trial_cfg.prune == cfg.prune)  # the config's own recipe: judged to the end (scheduler.py)

    def report_round(round_index: int, key: str, metrics: dict[str, Any]) -> None:
        report(round_index, key, {**metrics, DEFAULT_RECIPE: is_default})

    try:
        run_trial(trial_cfg, store, report_round, record, observer, done, dataset.get(), node_id)
    finally:  # a trial early stopping ends inside `report`: what its run queued is sent all the same
        if observer is not None:
            observer.flush()
        checkpoints.cleanup()


def quiet_checkpoint_lines() -> None:
    """Ray's one "checkpoint created" line per round is noise. Set once per process: `setLevel`
    clears the level cache of every logger in it (Ray's, MLflow's, torch's), at every trial."""
    train_log = logging.getLogger("ray.train")
    if train_log.level != logging.WARNING:
        train_log.setLevel(logging.WARNING)


def _checkpointed_round(checkpoint: tune.Checkpoint | None) -> int:
    """The last round this trial already reported (-1: none, 0: the dense-only report)."""
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / CHECKPOINT_FILE).read_text())
    return int(state["round"])
