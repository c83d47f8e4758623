"""The run of one `lth-search lineage`: a trial's run without a search around it.

It has no parent run, so it is found again by what its stages depend on (the tag
``lth.lineage_key``): rerunning the same command after an MLflow outage completes the
same run, taking every stage from the store, instead of leaving a half-logged one.
"""

from __future__ import annotations

from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.engine.lineage.keys import lineage_identity as stages_identity
from lth_search.tracking.client import MlflowIO
from lth_search.tracking.layout import LINEAGE_KEY
from lth_search.tracking.links import experiment_id, sync_hint, ui_hint
from lth_search.tracking.trial_run import TrialTracker


def lineage_choices(cfg: ExperimentConfig) -> dict[str, Any]:
    """The pruning choices of a config, named as the search names them (layer_ratios/<group>)."""
    choices = cfg.prune.choices()
    ratios = choices.pop("layer_ratios")
    choices.update({f"layer_ratios/{group}": ratio for group, ratio in sorted(ratios.items())})
    return choices


def lineage_tracker(cfg: ExperimentConfig) -> TrialTracker:
    """The run of one `lth-search lineage` (no parent), logged as it goes with a trial's layout."""
    io = MlflowIO(cfg.tracking_uri(), sync_hint(cfg))
    identity = {LINEAGE_KEY: lineage_identity(cfg)}
    return TrialTracker(cfg, None, "lineage", lineage_choices(cfg), io, role="lineage", identity=identity)


def lineage_identity(cfg: ExperimentConfig) -> str:
    """A hash of everything a lineage's stages depend on (not where outputs go): equal for a rerun."""
    return stages_identity(cfg.data.identity(), cfg.model.model_dump(), cfg.train.recipe(), cfg.prune.model_dump(),
                           cfg.seed)


def lineage_run_line(tracker: TrialTracker) -> str:
    """What to tell the user about a finished lineage's run: where to look, or that logging failed."""
    io, cfg = tracker.io, tracker.cfg
    if tracker.run_id is None or io.missed:
        return (
            f"MLflow at {io.uri}: logging failed ({len(io.missed)} call(s), first: {io.missed[0] if io.missed else '?'}); "
            "the stages are in the store: run the same `lth-search lineage` command again once MLflow answers "
            "(it reuses every stage and completes the run)"
        )
    return f"MLflow run {tracker.run_id} in experiment {cfg.experiment_name()}: {ui_hint(io.uri, experiment_id(cfg))}"
