"""Names of things in MLflow: tags, artifact paths, metrics (writers and readers share them).

search_run.py and trial_run.py write runs with these names; ticket_table.py and tickets.py read them
back with nothing but MLflow, so a name changed here changes both sides at once.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from lth_search.engine.sparsity_gains import METRICS as GAIN_METRICS

if TYPE_CHECKING:
    import torch

    from lth_search.engine.lineage.metric import Metric
    from lth_search.engine.lineage.results import DenseResult, LineageResult, RoundResult

# Tags
ROLE = "lth.role"                 # search | trial | lineage
TRIAL_ID = "lth.trial_id"
SEARCH_NAME = "lth.search_name"
RAY_RESULTS = "lth.ray_results_path"
TOLERANCE = "lth.tolerance"       # the trial config's search.tolerance (repr of a float)
METRIC = "lth.metric"             # the metric the verdict judged: accuracy | loss | perplexity (absent: accuracy)
REWIND_STEP = "lth.rewind_step"
INPUT_SHAPE = "lth.input_shape"   # JSON list, e.g. [40] or [3, 32, 32]
NUM_CLASSES = "lth.num_classes"
STATUS = "lth.status"             # the trial record's status when the run was ended
COMPLETE = "lth.complete"         # "1": the run was ended with nothing its trial logged missing (sync skips it)
FAILED = "lth.failed"             # why the lineage's dense network did not train (a failed run has no ticket)
SEARCH_ID = "lth.search_id"       # the search (Optuna study) a trial belongs to
OPTUNA_TRIAL = "lth.optuna_trial" # the trial's number in that Optuna study
PARENT = "mlflow.parentRunId"
LINEAGE_KEY = "lth.lineage_key"   # an `lth-search lineage` run: hash of what its stages depend on (a rerun finds the run)

# Artifacts
CONFIG = "config.json"
TICKETS = "tickets.parquet"
TICKETS_CSV = "tickets.csv"       # the same table, which the MLflow UI previews (it does not preview Parquet)
CONFIRMATION = "confirmation.json"
"""The parent run's confirmation table (runs/confirmation.py `Confirmation.to_json()` plus
`trial_id`, the search trial of the chosen recipe)."""
LINEAGE_PLOT = "plots/accuracy_vs_sparsity.png"
SEARCH_PLOT = "plots/search_summary.png"
MODEL_DIR = "best_ticket"


def mask_artifact(round_index: int) -> str:
    return f"masks/round_{round_index:02d}.parquet"


def mask_layers_artifact(round_index: int) -> str:
    """Beside the round's Parquet mask, its per-layer sparsity as CSV: the MLflow UI previews CSV,
    not Parquet, so the mask can be looked at where it is listed."""
    return f"masks/round_{round_index:02d}_layers.csv"


def mask_layers_csv(mask: "dict[str, torch.Tensor]") -> bytes:
    """One line per pruned layer: name, shape, weights, kept, sparsity (the fraction pruned)."""
    lines = ["layer,shape,weights,kept,sparsity"]
    for name, kept in mask.items():
        total, alive = kept.numel(), int(kept.sum())
        shape = "x".join(str(d) for d in kept.shape)
        lines.append(f"{name},{shape},{total},{alive},{1 - alive / total if total else 0.0:.6f}")
    return ("\n".join(lines) + "\n").encode()


def rewind_artifact(step: int) -> str:
    """θk, the weights a ticket rewinds to (the half to retrain), logged once per trial."""
    return f"weights/rewind_{step}.safetensors"


def trained_artifact(round_index: int) -> str:
    """A round's trained end weights (the half for inference; pruned entries are zero)."""
    return f"weights/trained_round_{round_index:02d}.safetensors"


TRAINED_RE = re.compile(r"trained_round_(\d+)\.safetensors$")
MASK_RE = re.compile(r"round_(\d+)\.parquet$")


# Metrics
ROUND_METRICS = ("val_accuracy", "test_accuracy", "sparsity", "reused", "train_loss", "train_steps_per_s", "matches",
                 "margin", "failed")
"""Logged at step = round for every round."""
INFERENCE_METRICS = tuple(f"inference/{name}" for name in GAIN_METRICS)
"""What the round's sparsity buys at inference (engine/sparsity_gains.py), at step = round when measured."""
DENSE_VAL, DENSE_TEST = "dense_val_accuracy", "dense_test_accuracy"


def metric_name(name: str) -> str:
    """A layer name as MLflow accepts it in a metric key."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def named_metric(metric: "Metric | None", result: "DenseResult | RoundResult", prefix: str = "") -> dict[str, float]:
    """The judged metric by its name (`val_loss`, `test_perplexity`; with `prefix`, e.g. `dense_`)
    when it is not accuracy, which every run logs as `val_accuracy` already."""
    if metric is None or metric.name == "accuracy":
        return {}
    values = {metric.val_key: metric.val(result), metric.test_key: metric.test(result)}
    return {prefix + key: float(value) for key, value in values.items() if value is not None}


def round_metrics(round_result: "RoundResult", metric: "Metric | None" = None) -> dict[str, float]:
    metrics = {
        "val_accuracy": round_result.val_accuracy,
        "test_accuracy": round_result.test_accuracy,
        "sparsity": round_result.sparsity,
        "train_loss": round_result.train_loss,
        "train_steps_per_s": round_result.train_steps_per_s,
        "reused": float(round_result.reused),
        "failed": float(round_result.failed is not None),
        **named_metric(metric, round_result),
    }
    if round_result.matches is not None:  # the paired verdict against the dense replicates
        metrics["matches"] = float(round_result.matches)
        if round_result.margin is not None and math.isfinite(round_result.margin):
            # a failed round's verdict has margin -inf: MLflow stores it as -1.8e308, which flattens
            # every trial's margin chart and reads as a number in tickets.csv; `failed` says why
            metrics["margin"] = float(round_result.margin)
    metrics.update({f"layer_sparsity/{metric_name(k)}": v for k, v in round_result.layer_sparsity.items()})
    metrics.update({rescale_metric(k): v for k, v in round_result.rescale.items()})
    if round_result.diagnostics is not None:
        metrics.update({f"diagnostics/{k}": v for k, v in round_result.diagnostics.metrics().items()})
    return metrics


SERIES_METRICS = ("val_accuracy", "test_accuracy")


def sparsity_series(result: "DenseResult | RoundResult") -> dict[str, float]:
    """Accuracies to log at step = `sparsity_step`: MLflow charts metrics against the step,
    so this series shows accuracy against sparsity, the dense network at step 0."""
    return {f"by_sparsity/{key}": float(getattr(result, key)) for key in SERIES_METRICS}


def sparsity_step(sparsity: float) -> int:
    """A sparsity as the step of the `by_sparsity/*` series: permille (0 dense, 900 = 90 %)."""
    return round(1000 * sparsity)


def rescale_metric(layer: str) -> str:
    """The metric holding a layer's rewind rescale factor: a ticket is rebuilt from these
    exactly, even for the data-dependent `calibrated` mode."""
    return f"rescale/{metric_name(layer)}"


def dense_metrics(dense: "DenseResult", metric: "Metric | None" = None) -> dict[str, float]:
    return {
        "dense_val_accuracy": dense.val_accuracy,
        "dense_test_accuracy": dense.test_accuracy,
        "dense_train_loss": dense.train_loss,
        "dense_train_steps_per_s": dense.train_steps_per_s,
        "dense_reused": float(dense.reused),
        **named_metric(metric, dense, "dense_"),
    }


SUMMARY_PREFIX = "matching_"
SUMMARY_NAMES = frozenset({"rounds_completed", "lineage_failed", "best_val_accuracy", "best_val_sparsity",
                           "final_sparsity"})
"""The names `summary_metrics` writes: these and every `matching_*` (`is_summary_metric` tells them)."""


def is_summary_metric(name: str) -> bool:
    """Whether `name` is one of the final numbers `summary_metrics` writes (what the finish compares of a
    run it may skip, so it keeps only these of each run's metrics: sync.py `_complete_runs`)."""
    return name in SUMMARY_NAMES or name.startswith(SUMMARY_PREFIX)


def summary_metrics(result: "LineageResult") -> dict[str, float]:
    """The run's final numbers: MLflow filters and sorts runs on a metric's latest value. Every name
    passes `is_summary_metric`."""
    best = result.best
    metrics = {
        "matching_sparsity": best.sparsity,
        "matching_round": float(best.round),
        "matching_val_accuracy": best.val_accuracy,
        "matching_test_accuracy": result.matching_test_accuracy,
        "rounds_completed": float(len(result.rounds)),
        "lineage_failed": float(result.failed is not None),
    }
    metrics.update({f"matching_{key}": value for key, value in result.metric_values(result.matching_stage).items()})
    if result.rounds:
        top = max(result.rounds, key=lambda r: (r.val_accuracy, r.sparsity))
        metrics.update(best_val_accuracy=top.val_accuracy, best_val_sparsity=top.sparsity,
                       final_sparsity=result.rounds[-1].sparsity)
    return metrics
