"""The tickets of a search as MLflow holds them: one row per (trial run, round).

Reading needs MLflow alone (no store, no Ray), so `lth-search best` works on any
machine that can reach the tracking server. A ticket row is read from the child run's
metric histories (step = round), its params (the trial's choices) and its tags (the
tolerance, written when the run was created). The same rows become the parent run's
`tickets.parquet`, so the file and `lth-search tickets` always agree.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from lth_search.config import ExperimentConfig
from lth_search.engine.lineage.metric import metric_named
from lth_search.engine.lineage.objective import is_matching
from lth_search.errors import TrackingError, UnknownTrackingName
from lth_search.tracking.client import (
    RUN_PAGE,
    first_line,
    iter_runs,
    metric_histories,
    metric_history,
    new_client,
    read_artifact,
)
from lth_search.tracking.layout import (
    CONFIRMATION,
    DENSE_TEST,
    DENSE_VAL,
    FAILED,
    METRIC,
    PARENT,
    ROLE,
    INFERENCE_METRICS,
    ROUND_METRICS,
    TOLERANCE,
    TRIAL_ID,
)


@dataclass(frozen=True)
class SearchRef:
    """Where a search's tickets live. `search_run_id` None: the experiment's `lineage` runs."""

    experiment_name: str
    experiment_id: str
    search_run_id: str | None


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else the schema's default ($MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db)."""
    uri = uri or ExperimentConfig().tracking_uri()
    if uri.startswith("sqlite:///"):  # reading must not create an empty database (and wait for its schema)
        database = Path(uri[len("sqlite:///"):])
        if not database.exists():
            raise TrackingError(
                f"no MLflow database at {database}: run a search first, or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )
    return uri


def parse_param(text: str) -> Any:
    """A param back to its value: "0.3" -> 0.3, "[1, 2]" -> [1, 2], "global" stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def search_all(client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run matching the filter (all pages)."""
    return list(iter_runs(client, experiment_ids, filter_string, order_by))


def _latest_run(client: Any, experiment_id: str, role: str) -> Any:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE}` = '{role}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def _ref_in(client: Any, experiment: Any) -> SearchRef | None:
    search = _latest_run(client, experiment.experiment_id, "search")
    if search is not None:
        return SearchRef(experiment.name, experiment.experiment_id, search.info.run_id)
    if _latest_run(client, experiment.experiment_id, "lineage") is not None:
        return SearchRef(experiment.name, experiment.experiment_id, None)
    return None


def find_search(client: Any, experiment: str | None = None, search_run_id: str | None = None) -> SearchRef:
    """The search to read: by run id, else the latest in `experiment`, else the latest anywhere.

    An experiment without a search falls back to its `lth-search lineage` runs.
    """
    if search_run_id is not None:
        run = _run_or_none(client, search_run_id)
        if run is None:
            raise UnknownTrackingName(f"--search-run-id {search_run_id!r}: no such run in this MLflow; "
                                      "`lth-search tickets --json` shows the search's run id")
        name = client.get_experiment(run.info.experiment_id).name
        return SearchRef(name, run.info.experiment_id, search_run_id)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UnknownTrackingName(
                f"--experiment: no MLflow experiment {experiment!r}; experiments with lth-search runs: {_names(client)}"
            )
        ref = _ref_in(client, found)
        if ref is None:
            raise TrackingError(f"MLflow experiment {experiment!r} holds no lth-search search or lineage run")
        return ref
    experiments = client.search_experiments(order_by=["creation_time DESC"])
    refs = [ref for ref in (_ref_in(client, e) for e in experiments) if ref is not None]
    with_search = [ref for ref in refs if ref.search_run_id is not None]
    if with_search or refs:
        return (with_search or refs)[0]
    names = ", ".join(e.name for e in experiments) or "none"
    raise TrackingError(f"no lth-search runs in MLflow (experiments: {names}); run a search first")


def _run_or_none(client: Any, run_id: str) -> Any:
    """The run `run_id`, or None when MLflow has no such run (MLflow raises for an unknown id)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _names(client: Any) -> str:
    names = [e.name for e in client.search_experiments(order_by=["creation_time DESC"]) if _ref_in(client, e)]
    return ", ".join(names) or "none"


PAGE = RUN_PAGE
"""Trial runs read together (their metric histories in one query per metric): a page of whole runs is
held while its histories are read (client.RUN_PAGE says what a page costs)."""


def candidate_runs(client: Any, ref: SearchRef) -> Iterator[Any]:
    """The trial runs of a search (or the lineage runs of an experiment), a page at a time: a run
    holds all its params, metrics and tags, and only its ticket rows are kept."""
    if ref.search_run_id is not None:
        query = f"tags.`{PARENT}` = '{ref.search_run_id}'"
    else:
        query = f"tags.`{ROLE}` = 'lineage'"
    return iter_runs(client, [ref.experiment_id], query, order_by=["attributes.start_time ASC"])


def _named_keys(metric: Any) -> tuple[str, ...]:
    """The val/test series of a run's named metric, when it is not accuracy (whose series every row reads)."""
    return () if metric.name == "accuracy" else (metric.val_key, metric.test_key)


def history_keys(run: Any) -> tuple[str, ...]:
    """The metric histories a trial run's rows read: the round metrics, `inference/*`, and the val/test
    series of its named metric (the `lth.metric` tag)."""
    return (*ROUND_METRICS, *INFERENCE_METRICS, *_named_keys(metric_named(run.data.tags.get(METRIC))))


def run_rows(client: Any, run: Any, history: dict[str, dict[int, float]] | None = None) -> list[dict[str, Any]]:
    """The ticket rows of one trial run: every round that has val, test and sparsity.

    `history` (metric -> step -> value of `history_keys(run)`) when already read with other runs'."""
    if history is None:
        history = {key: metric_history(client, run.info.run_id, key) for key in history_keys(run)}
    metrics, tags = run.data.metrics, run.data.tags
    metric = metric_named(tags.get(METRIC))
    named = _named_keys(metric)
    dense_val, dense_test = metrics.get(DENSE_VAL), metrics.get(DENSE_TEST)
    tolerance = float(tags[TOLERANCE]) if TOLERANCE in tags else None
    params = {key: parse_param(value) for key, value in sorted(run.data.params.items())}
    rounds = sorted(set(history["val_accuracy"]) & set(history["test_accuracy"]) & set(history["sparsity"]))
    matching_round = int(metrics.get("matching_round", -1))
    lineage_failed = bool(metrics.get("lineage_failed", 0.0)) or FAILED in tags
    rows = []
    for step in rounds:
        val = history["val_accuracy"][step]
        judged = dense_val is not None and tolerance is not None
        paired = history["matches"].get(step)  # the verdict the lineage used; the unpaired rule for older runs
        rows.append({
            "trial_id": tags.get(TRIAL_ID, run.info.run_name),
            "run_id": run.info.run_id,
            "round": step,
            "sparsity": history["sparsity"][step],
            "val_accuracy": val,
            "test_accuracy": history["test_accuracy"][step],
            "dense_val_accuracy": dense_val,
            "dense_test_accuracy": dense_test,
            "reused": int(history["reused"].get(step, 0)),
            "train_loss": history["train_loss"].get(step),
            "train_steps_per_s": history["train_steps_per_s"].get(step),
            "tolerance": tolerance,
            "matching": bool(paired) if paired is not None else (is_matching(val, dense_val, tolerance) if judged else None),
            "margin": history["margin"].get(step),
            "failed": bool(history["failed"].get(step, 0.0)) or lineage_failed,
            "matching_round": matching_round,
            **{inference_column(key): history[key].get(step) for key in INFERENCE_METRICS},
            "params": params,
        })
        if named:  # judged on loss or perplexity: the metric by name and direction (accuracy rows stay as they were)
            rows[-1].update({"metric": metric.name, "direction": metric.direction,
                             **{key: history[key].get(step) for key in named},
                             **{f"dense_{key}": metrics.get(f"dense_{key}") for key in named}})
    return rows


def inference_column(metric: str) -> str:
    """`inference/latency_b1` -> `inference_latency_b1` (a column name without a slash)."""
    return metric.replace("/", "_")


def runs_with_rows(client: Any, ref: SearchRef) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Every trial run of a search with its ticket rows, oldest first: a page of runs at a time, their
    metric histories read together."""
    runs = candidate_runs(client, ref)
    while True:
        page = list(itertools.islice(runs, PAGE))
        if not page:
            return
        ids = [run.info.run_id for run in page]
        keys = {run.info.run_id: history_keys(run) for run in page}
        wanted = dict.fromkeys(key for run_keys in keys.values() for key in run_keys)
        histories = {key: metric_histories(client, ids, key) for key in wanted}
        for run in page:
            yield run, run_rows(client, run, {key: histories[key][run.info.run_id] for key in keys[run.info.run_id]})


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ticket rows by trial then round: the order of every tickets table."""
    return sorted(rows, key=lambda r: (str(r["trial_id"]), r["round"]))


def ticket_rows(client: Any, ref: SearchRef) -> list[dict[str, Any]]:
    """Every ticket of a search, by trial then round."""
    return sort_rows([row for _, rows in runs_with_rows(client, ref) for row in rows])


def read_rows(
    experiment: str | None = None, search_run_id: str | None = None, tracking_uri: str | None = None
) -> tuple[SearchRef, list[dict[str, Any]], Any]:
    """(search, rows, client) for the CLI and the API; MLflow errors become one-line TrackingErrors."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    try:
        client = new_client(uri)
        # MLflow's own variable names the experiment when the command line does not
        ref = find_search(client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME"), search_run_id)
        return ref, ticket_rows(client, ref), client
    except MlflowException as error:
        raise TrackingError(f"MLflow at {uri}: {first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - sqlalchemy's errors: the file is not an MLflow database
        if not type(error).__module__.startswith("sqlalchemy"):
            raise
        raise UnknownTrackingName(f"MLflow at {uri} cannot be read: not an MLflow database? ({first_line(error)})") from None


def read_confirmation(client: Any, ref: SearchRef) -> dict[str, Any] | None:
    """The search's confirmation (chosen recipe, confirmed scores), None when it has none."""
    if ref.search_run_id is None:
        return None
    if CONFIRMATION not in {item.path for item in client.list_artifacts(ref.search_run_id)}:
        return None
    return json.loads(read_artifact(client, ref.search_run_id, CONFIRMATION))


# tickets.parquet ---------------------------------------------------------------------------
FIXED_COLUMNS = ("trial_id", "run_id", "round")
METRIC_COLUMNS = (
    "sparsity", "val_accuracy", "test_accuracy", "dense_val_accuracy", "dense_test_accuracy", "reused",
    "train_loss", "train_steps_per_s", "tolerance", "matching", "margin", "failed", "matching_round",
    *(inference_column(metric) for metric in INFERENCE_METRICS),
)
NAMED_METRIC_COLUMNS = ("metric", "direction")
"""Columns of a search judged on loss or perplexity (then also `val_loss`, `dense_val_loss`, ...)."""


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # mixed types, e.g. 0.5 and "measured"
        return pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v for v in values])


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One row per trial-round: ids, round, one column per choice, metrics."""
    if not rows:
        return pa.table({name: pa.array([], pa.string()) for name in (*FIXED_COLUMNS, *METRIC_COLUMNS)})
    columns = {name: _column([row[name] for row in rows]) for name in FIXED_COLUMNS}
    for name in sorted({key for row in rows for key in row["params"]}):
        column = name if name not in columns and name not in METRIC_COLUMNS else f"param.{name}"
        columns[column] = _column([row["params"].get(name) for row in rows])
    columns.update({name: _column([row[name] for row in rows]) for name in METRIC_COLUMNS})
    named = [key for key in NAMED_METRIC_COLUMNS if any(key in row for row in rows)]
    named += sorted({key for row in rows for key in row if key.startswith(("val_", "test_", "dense_val_", "dense_test_"))
                     and key not in columns and key not in named})
    columns.update({name: _column([row.get(name) for row in rows]) for name in named})
    return pa.table(columns)


CSV_TRIAL_PREFIX = "trial "
"""How tickets.csv writes a trial id: Ray's ids are 8 hex digits, often all decimal (`01092534`),
and the MLflow UI's table (as most CSV readers) types such text as a number (`1092534`), quoted or
not. `trial 01092534` reads as the console prints it; tickets.parquet holds the bare id."""


def rows_csv(rows: list[dict[str, Any]]) -> bytes:
    """The tickets table as CSV (lists and dicts as JSON, missing values empty, trial ids as text)."""
    table = rows_table(rows)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        row["trial_id"] = f"{CSV_TRIAL_PREFIX}{row['trial_id']}"
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v for v in row.values()])
    return text.getvalue().encode()


def rows_parquet(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(rows_table(rows), sink, compression="zstd")
    return sink.getvalue()
