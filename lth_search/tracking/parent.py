"""The parent run's view of a search: tickets table, summary plot and metrics, best model.

Built from the child runs' metric histories (ticket_table.py), the same source
`lth-search tickets` and `best_ticket()` read, so the three can never disagree. The
trial records (the store's truth) only tell how many tickets MLflow should hold, so a
gap is reported with the command that fills it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lth_search.errors import TrackingError
from lth_search.tickets import criterion_text, select_ticket
from lth_search.tracking.layout import CONFIRMATION, SEARCH_PLOT, TICKETS, TICKETS_CSV
from lth_search.tracking.plots import search_plot
from lth_search.tracking.ticket_reader import load_ticket
from lth_search.tracking.search_run import SearchTracker
from lth_search.tracking.ticket_table import SearchRef, rows_csv, rows_parquet, ticket_rows

log = logging.getLogger(__name__)


def search_metrics(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, float]:
    """Numbers to sort searches by in the MLflow runs table."""
    metrics = {
        "trials": float(len({r["trial_id"] for r in rows})),
        "tickets": float(len(rows)),
        "matching_tickets": float(sum(bool(r["matching"]) for r in rows)),
        "best_matching_sparsity": best["sparsity"] if best else 0.0,
    }
    if best:
        metrics.update(
            best_matching_val_accuracy=best["val_accuracy"], best_matching_test_accuracy=best["test_accuracy"],
            best_matching_round=float(best["round"]),
        )
        if best["dense_val_accuracy"] is not None:
            metrics.update(dense_val_accuracy=best["dense_val_accuracy"], dense_test_accuracy=best["dense_test_accuracy"])
        if best.get("metric"):  # judged on loss or perplexity: best_matching_val_loss, dense_val_loss, ...
            for key, value in best.items():
                if value is not None and key.startswith(("val_", "test_", "dense_val_", "dense_test_")) \
                        and key.removeprefix("dense_").split("_", 1)[1] == best["metric"]:
                    metrics[key if key.startswith("dense_") else f"best_matching_{key}"] = float(value)
    return metrics


def _best(rows: list[dict[str, Any]], confirmed_trial: str | None) -> dict[str, Any] | None:
    try:
        return select_ticket(rows, confirmed_trial=confirmed_trial)
    except TrackingError:
        return None


def log_confirmation(search: SearchTracker, confirmation: dict[str, Any]) -> None:
    """The confirmation table (confirmation.json) and its numbers as metrics to sort by."""
    io, parent = search.io, search.parent_run_id
    io.call("upload confirmation.json", lambda: io.log_bytes(parent, json.dumps(confirmation, indent=1).encode(), CONFIRMATION))
    chosen, default = confirmation["chosen"], confirmation["default"]
    metrics = {
        "confirmed_compression": chosen["compression"], "confirmed_test_drop": chosen["mean_test_drop"],
        "default_confirmed_compression": default["compression"], "default_confirmed_test_drop": default["mean_test_drop"],
        "confirmed_gain": confirmation["gain"],
    }
    io.call("log the confirmation", lambda: io.log_values(parent, metrics, step=0))
    io.call("tag the confirmed trial", lambda: io.client.set_tag(parent, "lth.confirmed_trial_id", confirmation["trial_id"]))


def log_search_summary(search: SearchTracker, expected_tickets: int, confirmed_trial: str | None = None,
                       rows: list[dict[str, Any]] | None = None) -> None:
    """Rewrite the parent's tickets table (Parquet and CSV), summary plot, metrics and registered model.

    `expected_tickets` is how many trial-rounds the store holds: fewer in MLflow is a gap
    that `lth-search sync` fills, and is said so. `rows`: the search's tickets as just read
    (child_runs.py), else they are read here.
    """
    io, parent = search.io, search.parent_run_id
    ref = SearchRef(search.cfg.experiment_name(), search.experiment, parent)
    if rows is None:
        ok, rows = io.call("read the search's tickets", lambda: ticket_rows(io.client, ref))
        if not ok:
            return
    if len(rows) < expected_tickets:
        log.warning("MLflow holds %d of the %d tickets in the store; run `lth-search sync %s`",
                    len(rows), expected_tickets, search.cfg.name)
    best = _best(rows, confirmed_trial)
    io.call("upload tickets.parquet", lambda: io.log_bytes(parent, rows_parquet(rows), TICKETS))
    io.call("upload tickets.csv", lambda: io.log_bytes(parent, rows_csv(rows), TICKETS_CSV))
    title = f"{search.cfg.name}: {len({r['trial_id'] for r in rows})} lineages, {len(rows)} tickets"
    io.call("upload the search plot", lambda: io.log_bytes(parent, search_plot(rows, title, best), SEARCH_PLOT))
    io.call("log the search summary", lambda: _log_summary(search, rows, best))
    if best is not None:
        io.call("register the best ticket", lambda: _register(search, ref, best))


def _log_summary(search: SearchTracker, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    client, parent = search.io.client, search.parent_run_id
    current = client.get_run(parent).data.metrics
    changed = {k: v for k, v in search_metrics(rows, best).items() if current.get(k) != v}
    search.io.log_values(parent, changed, step=0)
    if best is not None:
        for key in ("run_id", "trial_id", "round"):
            client.set_tag(parent, f"lth.best_{key}", str(best[key]))


def _register(search: SearchTracker, ref: SearchRef, best: dict[str, Any]) -> None:
    from lth_search.tracking.registry import register_ticket

    if search.cfg.model.is_pretrained:
        return  # the served model is lth-search's own network code; a pretrained one is served by transformers
    ticket = load_ticket(search.io.client, ref, best, criterion_text())
    uri = register_ticket(search.io.client, ticket, search.cfg.name, search.parent_run_id, search.io.uri)
    search.io.client.set_tag(search.parent_run_id, "lth.best_model_uri", uri)
