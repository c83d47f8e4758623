"""Tickets read back from MLflow alone (no store, no Ray): `best_ticket`, `list_tickets`.

The rows come from the child runs (ticket_table.py), the choice among them from the
pure `lth_search.tickets.select_ticket`, and the ticket's files from the chosen run's
artifacts: config, mask, θk, the round's trained weights and its rescale factors.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lth_search.config import validate_config
from lth_search.engine.pruning import layer_sparsity
from lth_search.errors import LthError, TrackingError
from lth_search.store.codec import Mask, decode_mask, decode_weights
from lth_search.tickets import Ticket, check_fraction, criterion_text, select_ticket
from lth_search.tracking.client import first_line, metric_history, read_artifact
from lth_search.tracking.registry import input_normalization, registered_uri
from lth_search.tracking.layout import (
    CONFIG,
    INPUT_SHAPE,
    NUM_CLASSES,
    mask_artifact,
    metric_name,
    rescale_metric,
    rewind_artifact,
    trained_artifact,
)
from lth_search.tracking.ticket_table import SearchRef, read_confirmation, read_rows

log = logging.getLogger(__name__)


def load_ticket(client: Any, ref: SearchRef, row: dict[str, Any], criterion: str = "") -> Ticket:
    """The full ticket of a row: config, mask, θk and trained weights downloaded from the run's artifacts."""
    from mlflow.exceptions import MlflowException

    run_id, round_index = row["run_id"], int(row["round"])
    try:
        run = client.get_run(run_id)
        config = validate_config(json.loads(read_artifact(client, run_id, CONFIG)), source=f"run {run_id} config.json")
        mask = decode_mask(read_artifact(client, run_id, mask_artifact(round_index)))
        weights = decode_weights(read_artifact(client, run_id, rewind_artifact(config.prune.rewind_step)))
        logged = {item.path for item in client.list_artifacts(run_id, "weights")}
        trained_path = trained_artifact(round_index)
        trained = decode_weights(read_artifact(client, run_id, trained_path)) if trained_path in logged else None
        rescale = _rescale_at(client, run_id, mask, round_index)
    except (MlflowException, OSError) as error:
        raise TrackingError(
            f"run {run_id} round {round_index}: cannot read its artifacts ({first_line(error)}); "
            f"if MLflow was down during the search, run `lth-search sync NAME` first"
        ) from None
    tags = run.data.tags
    metrics = {key: row[key] for key in ("val_accuracy", "test_accuracy", "sparsity", "dense_val_accuracy",
                                         "dense_test_accuracy", "train_loss", "reused", "tolerance")}
    metrics.update({key: row[key] for key in row if key in ("metric", "direction")
                    or key.startswith(("val_", "test_", "dense_val_", "dense_test_")) and key not in metrics})
    metrics.update({f"layer_sparsity/{metric_name(k)}": v for k, v in layer_sparsity(mask).items()})
    metrics.update({k: v for k, v in row.items() if k.startswith("inference_") and v is not None})
    return Ticket(
        run_id=run_id, round=round_index, sparsity=float(row["sparsity"]), metrics=metrics,
        params=dict(row["params"]), config=config, mask=mask, rewind_weights=weights, trained_weights=trained,
        rescale=rescale, input_shape=tuple(json.loads(tags[INPUT_SHAPE])), num_classes=int(tags[NUM_CLASSES]),
        trial_id=str(row["trial_id"]), experiment=ref.experiment_name, search_run_id=ref.search_run_id,
        criterion=criterion,
    )


def _rescale_at(client: Any, run_id: str, mask: Mask, round_index: int) -> dict[str, float]:
    """The rescale factors a trial logged for a round ({} if it logged none)."""
    factors = {}
    for layer in mask:
        history = metric_history(client, run_id, rescale_metric(layer))
        if round_index in history:
            factors[layer] = history[round_index]
    return factors


def best_ticket(experiment: str | None = None, search_run_id: str | None = None, max_accuracy_drop: float | None = None,
                min_sparsity: float | None = None, tracking_uri: str | None = None) -> Ticket:
    """The best ticket of a search, read from MLflow alone (no store, no Ray).

    `experiment` None: the most recently created experiment holding an lth-search
    search; `search_run_id` picks one search of an experiment (default: the latest).
    Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else mlflow.db in the default output_dir.
    """
    check_fraction(max_accuracy_drop, "max_accuracy_drop", "0.01 = 1 pp")
    check_fraction(min_sparsity, "min_sparsity", "0.9 = 90%")
    ref, rows, client = read_rows(experiment, search_run_id, tracking_uri)
    confirmation = read_confirmation(client, ref)
    confirmed_trial = confirmation.get("trial_id") if confirmation else None
    try:
        row = select_ticket(rows, max_accuracy_drop, min_sparsity, confirmed_trial)
    except TrackingError as error:
        raise TrackingError(f"experiment {ref.experiment_name}: {error}") from None
    ticket = load_ticket(client, ref, row, criterion_text(max_accuracy_drop, min_sparsity))
    if confirmation:
        ticket.extra["confirmation"] = confirmation
    model_uri = registered_uri(client, ticket)
    if model_uri is not None:
        ticket.extra["model_uri"] = model_uri
    try:
        ticket.normalization = input_normalization(ticket.config)
    except LthError as error:  # the data set is not on this machine: the ticket says so, without it
        log.warning("ticket %s: the input normalisation is left out of ticket.json (%s)", ticket.run_id, error)
    return ticket


def list_tickets(experiment: str | None = None, tracking_uri: str | None = None,
                 search_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every ticket (trial-round) of a search: one dict per row, as in tickets.parquet."""
    return read_rows(experiment, search_run_id, tracking_uri)[1]
