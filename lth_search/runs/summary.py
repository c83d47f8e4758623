"""What a finished search says: the best ticket, trial counts, compute executed vs reused.

Built from the trial records in the store (the truth, written by the trials themselves)
and each trial's final status from Ray; no Ray or MLflow import here.
"""

from __future__ import annotations

from typing import Any, Callable

from lth_search.engine.lineage.metric import metric_named
from lth_search.runs.best import TrialTicket, best_trial_ticket, ranked_trial_tickets
from lth_search.runs.confirmation import Confirmation, confirmation_lines
from lth_search.runs.record import TrialRecord, TrialStatus


def trial_ticket(record: TrialRecord) -> TrialTicket | None:
    """A trial record's ticket (None before its dense stage)."""
    if record.matching is None:
        return None
    failed = record.dense is not None and record.dense.failed is not None
    match = record.matching
    return TrialTicket(record.trial_id, match.round, match.sparsity, match.val_accuracy, record.choices, failed,
                       match.val_metric, metric_named(match.metric).higher_is_better)


def chosen_record(records: list[TrialRecord], confirmation: Confirmation | None) -> TrialRecord | None:
    """The search trial that holds the best ticket (runs/best.py): the best trial of the
    confirmed recipe (without confirmation, the best trial)."""
    tickets = [t for t in map(trial_ticket, records) if t is not None]
    best = best_trial_ticket(tickets, recipe=confirmation.chosen.recipe if confirmation is not None else None)
    return next((r for r in records if best is not None and r.trial_id == best.trial_id), None)


def best_records(records: list[TrialRecord], count: int) -> list[TrialRecord]:
    """The records of the `count` trials with the best tickets, best first (runs/best.py's order)."""
    by_id = {r.trial_id: r for r in records}
    tickets = [t for t in map(trial_ticket, records) if t is not None]
    return [by_id[t.trial_id] for t in ranked_trial_tickets(tickets, count)]


def summarize(
    records: list[TrialRecord], search_id: str, rounds: int, extra: dict[str, Any] | None = None,
    confirmation: Confirmation | None = None,
) -> dict[str, Any]:
    """The summary `run_search` returns (best ticket, counts, steps, confirmation) as JSON-ready values."""
    statuses = [r.status for r in records]
    best = chosen_record(records, confirmation)
    summary: dict[str, Any] = {
        "search_id": search_id,
        "trials": sum(s is not TrialStatus.ABANDONED for s in statuses),
        "finished": statuses.count(TrialStatus.FINISHED),
        "stopped_by_asha": statuses.count(TrialStatus.STOPPED),
        "errored": statuses.count(TrialStatus.ERROR),
        "abandoned": statuses.count(TrialStatus.ABANDONED),
        "unfinished": statuses.count(TrialStatus.RUNNING),
        "rounds": rounds,
        "steps_executed": sum(r.steps_executed for r in records),
        "steps_reused": sum(r.steps_reused for r in records),
        "failed": sum(r.dense is not None and r.dense.failed is not None for r in records),
        "best": None,
    }
    if best is not None and best.matching is not None and best.dense is not None:
        match = best.matching
        summary["best"] = {
            "trial_id": best.trial_id,
            "choices": best.choices,
            "matching_sparsity": match.sparsity,
            "round": match.round,
            "val_accuracy": match.val_accuracy,
            "test_accuracy": match.test_accuracy,
            "dense_val_accuracy": best.dense.val_accuracy,
            "dense_test_accuracy": best.dense.test_accuracy,
        }
        metric = metric_named(match.metric)
        if metric.name != "accuracy":  # the metric the search judged, by name, beside accuracy
            summary["best"].update({"metric": metric.name, "direction": metric.direction,
                                    metric.val_key: match.val_metric, metric.test_key: match.test_metric,
                                    f"dense_{metric.val_key}": metric.val(best.dense),
                                    f"dense_{metric.test_key}": metric.test(best.dense)})
    summary["confirmation"] = confirmation.to_json() if confirmation is not None else None
    summary.update(extra or {})
    return summary


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _choices(choices: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(choices.items())) or "(the config's prune values)"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Human lines: the best ticket first, then counts, compute, and where to look."""
    lines = []
    best = summary.get("best")
    if best is None:
        failed = summary.get("failed", 0)
        lines.append("best ticket: none (" + (f"every lineage failed to train: {failed} of {summary['trials']}; see the "
                     "warnings above" if failed else "no trial reported a round") + ")")
    elif best["round"] == 0:
        lines.append(
            f"best ticket: none matched dense within tolerance; dense val {_pct(best['dense_val_accuracy'])}, "
            f"test {_pct(best['dense_test_accuracy'])}"
        )
    elif best.get("metric"):  # judged on loss or perplexity: that metric, by name
        metric = metric_named(best["metric"])
        val, test = metric.val_key, metric.test_key
        lines.append(
            f"best ticket: trial {best['trial_id']} round {best['round']}: sparsity {_pct(best['matching_sparsity'])}, "
            f"{val} {metric.format(best[val])} / {test} {metric.format(best[test])} "
            f"(dense {metric.format(best['dense_' + val])} / {metric.format(best['dense_' + test])}; lower is better)"
        )
    else:
        lines.append(
            f"best ticket: trial {best['trial_id']} round {best['round']}: sparsity {_pct(best['matching_sparsity'])}, "
            f"val {_pct(best['val_accuracy'])} / test {_pct(best['test_accuracy'])} "
            f"(dense val {_pct(best['dense_val_accuracy'])} / test {_pct(best['dense_test_accuracy'])})"
        )
        lines.append(f"  choices: {_choices(best['choices'])}")
    if summary.get("confirmation"):
        lines.extend(confirmation_lines(summary["confirmation"]))
    lines.append(
        f"trials: {summary['trials']} ({summary['finished']} finished, {summary['stopped_by_asha']} stopped by ASHA, "
        f"{summary['errored']} errored" + (f", {summary['unfinished']} unfinished" if summary["unfinished"] else "") + ")"
        + (f"; {summary['abandoned']} abandoned by a killed driver (their stages were reused)" if summary["abandoned"] else "")
    )
    executed, reused = summary["steps_executed"], summary["steps_reused"]
    share = reused / (executed + reused) if executed + reused else 0.0
    lines.append(f"training steps: {executed} executed, {reused} reused from the store ({100 * share:.0f}% reused)")
    if summary.get("wall_s") is not None:
        lines.append(f"wall time: {summary['wall_s']:.1f} s")
    if summary.get("mlflow_command"):
        lines.append(f"MLflow: {summary['mlflow_command']}")
        if summary.get("mlflow_link"):
            lines.append(f"  then open {summary['mlflow_link']}")
    return lines


def emit(lines: list[str], progress: Callable[[str], None]) -> None:
    for line in lines:
        progress(line)
