"""A ticket as text: what `lth-search best` and `lth-search tickets` print.

Apart from tickets.py (what a ticket is and how one is picked) because the console's
wording changes for readers, not for the ticket: one file to read for either.
"""

from __future__ import annotations

from typing import Any

from lth_search.engine.lineage.metric import metric_named
from lth_search.tickets import Ticket, row_metric


def _choices(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def describe_ticket(ticket: Ticket) -> str:
    """A few readable lines about a ticket (what `lth-search best` prints)."""
    m = ticket.metrics
    dense_val, dense_test = m.get("dense_val_accuracy"), m.get("dense_test_accuracy")
    drop = "" if dense_val is None else f" ({100 * (m['val_accuracy'] - dense_val):+.2f} pp vs dense {100 * dense_val:.2f}%)"
    test = "" if dense_test is None else f" (dense {100 * dense_test:.2f}%)"
    registered = ticket.extra.get("model_uri")
    gains = ticket.summary()["inference"]
    inference = [] if not {"latency_b1", "latency_batch", "export_bytes"} <= set(gains) else [
        f"  inference as CSR (one CPU thread, ratios to dense): time x{gains['latency_b1']:.2f} at batch 1, "
        f"x{gains['latency_batch']:.2f} at batch {ticket.config.tracking.serve_batch}; "
        f"{gains['export_bytes'] / 1024:.1f} kB vs {gains.get('dense_bytes', 0) / 1024:.1f} kB dense"]
    named = ticket.metric_summary()
    if named:  # judged on loss or perplexity: that metric first, by name and direction
        metric = metric_named(named["metric"])
        val, test = metric.val_key, metric.test_key
        lines = [f"  {val} {metric.format(named[val])} (dense {metric.format(named['dense_' + val])}; lower is better)",
                 f"  {test} {metric.format(named[test])} (dense {metric.format(named['dense_' + test])})"]
    else:
        lines = [f"  val  {100 * m['val_accuracy']:.2f}%{drop}", f"  test {100 * m['test_accuracy']:.2f}%{test}"]
    return "\n".join([
        f"best ticket of {ticket.experiment}: trial {ticket.trial_id}, round {ticket.round} [{ticket.criterion}]",
        f"  sparsity {100 * ticket.sparsity:.2f}%  ({100 * (1 - ticket.sparsity):.2f}% of prunable weights remain)",
        *lines,
        f"  choices: {_choices(ticket.params) or '(none searched)'}; rewind to step {ticket.rewind_step}",
        *inference,
        f"  MLflow run {ticket.run_id}",
        f"  in Python: t = best_ticket(experiment={ticket.experiment!r}); t.trained_model() (inference), "
        f"t.rewound_model() (to retrain)",
        *([f"  registered: mlflow.pyfunc.load_model({registered!r})"] if registered else []),
    ])


def format_tickets(table: list[dict[str, Any]]) -> str:
    """Every ticket as a fixed-width table, by trial then round."""
    if not table:
        return "no tickets"
    if table[0].get("metric"):
        return _format_named(table)
    header = (f"{'trial':<22} {'round':>5} {'sparsity':>9} {'val':>7} {'test':>7} {'dense val':>9} {'margin':>8} "
              f"{'match':>5} {'reused':>6}  choices")
    lines = [header]
    for row in table:
        dense, margin = row.get("dense_val_accuracy"), row.get("margin")
        if margin is None and dense is not None:  # runs logged before the paired verdict: against their own dense
            margin = row["val_accuracy"] - dense
        delta = "" if margin is None else f"{100 * margin:+.2f}pp"
        match = {True: "yes", False: "no", None: "?"}[row.get("matching")]
        lines.append(
            f"{str(row['trial_id'])[:22]:<22} {row['round']:>5} {100 * row['sparsity']:>8.2f}% "
            f"{100 * row['val_accuracy']:>6.2f}% {100 * row['test_accuracy']:>6.2f}% "
            f"{'' if dense is None else f'{100 * dense:.2f}%':>9} {delta:>8} {match:>5} {row.get('reused', 0):>6}  "
            f"{_choices(row.get('params') or {})}"
        )
    return "\n".join(lines)


def _format_named(table: list[dict[str, Any]]) -> str:
    """The tickets of a search judged on loss or perplexity: the metric's columns, by name."""
    metric = row_metric(table[0])
    val, test = metric.val_key, metric.test_key
    lines = [f"judged on {metric.name} ({metric.direction}; margin in nats of mean loss per target, positive is better)",
             f"{'trial':<22} {'round':>5} {'sparsity':>9} {val:>15} {test:>15} {'dense ' + val:>21} {'margin':>8} "
             f"{'match':>5} {'reused':>6}  choices"]
    for row in table:
        match = {True: "yes", False: "no", None: "?"}[row.get("matching")]
        lines.append(
            f"{str(row['trial_id'])[:22]:<22} {row['round']:>5} {100 * row['sparsity']:>8.2f}% "
            f"{metric.format(row.get(val)):>15} {metric.format(row.get(test)):>15} "
            f"{metric.format(row.get('dense_' + val)):>21} {metric.format_margin(row.get('margin')):>8} {match:>5} "
            f"{row.get('reused', 0):>6}  {_choices(row.get('params') or {})}"
        )
    return "\n".join(lines)
