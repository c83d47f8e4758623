"""MLflow tracking of a search, against sqlite and against a real `mlflow server` (no mocks).

The driver/trial flow runs in-process without Ray: the MLflow observers, tiny lineages
run by the production trial runner with TrialTrackers, the search observer's finish; the
server is the session's (conftest.mlflow_server). Every check reads MLflow back: run
structure, metric histories, mask artifacts against the store's masks, the tickets table,
the registered best ticket.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from lth_search.api import run_lineage_command
from lth_search.store.codec import decode_mask, decode_weights
from lth_search.engine.data import load_dataset, read_raw
from lth_search.tracking.client import read_artifact
from lth_search.store.stage_store import StageStore
from lth_search.tracking.ticket_reader import best_ticket
from lth_search.tracking.ticket_table import read_rows, rows_csv
from lth_search.tracking.mlflow_observers import MlflowTracking
from mlflow_helpers import search_layout, tracked_trial

TRIALS = {"t0": {"rate": 0.3}, "t1": {"rate": 0.5, "rewind_step": 20, "init_scale": "measured"}}


@pytest.fixture(scope="module")
def dataset(data_root: Path):
    return load_dataset(tiny_config(data_root, data_root).data, seed=0)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def children_of(client: MlflowClient, parent) -> list:
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def check_child(client: MlflowClient, child, result, choices: dict, store: StageStore, rewind_step: int) -> None:
    run_id = child.info.run_id
    history = sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r.round, r.val_accuracy) for r in result.rounds]
    test = sorted(client.get_metric_history(run_id, "test_accuracy"), key=lambda m: m.step)
    assert [m.value for m in test] == [r.test_accuracy for r in result.rounds]
    assert child.data.params == {key: value if isinstance(value, str) else str(value) for key, value in choices.items()}
    last = result.rounds[-1]
    assert child.data.metrics["sparsity"] == last.sparsity
    assert child.data.metrics["layer_sparsity/hidden.0.weight"] == last.layer_sparsity["hidden.0.weight"]
    assert child.data.metrics["dense_val_accuracy"] == result.dense.val_accuracy
    assert child.data.metrics["matching_sparsity"] == result.best.sparsity
    for round_result in result.rounds:
        logged = decode_mask(read_artifact(client, run_id, f"masks/round_{round_result.round:02d}.parquet"))
        stored = store.get(round_result.key).masks["mask"]
        assert list(logged) == list(stored)
        assert all(torch.equal(logged[name], stored[name]) for name in stored)
    rewind = decode_weights(read_artifact(client, run_id, f"weights/rewind_{rewind_step}.safetensors"))
    dense = store.get(result.dense.key).weights[f"rewind_{rewind_step}"]
    assert all(torch.equal(rewind[name], dense[name]) for name in dense)
    assert read_artifact(client, run_id, "plots/accuracy_vs_sparsity.png")[:4] == b"\x89PNG"


def test_a_run_that_missed_an_upload_ends_unmarked_as_complete(data_root: Path, tmp_path: Path, dataset,
                                                               quick_mlflow_retries) -> None:
    """A run's status tags go with its last values (tracking/pending.py); `lth.complete` only when nothing
    of the run was missed before them, so `lth-search sync` still fills in what the failed upload lacked."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(data_root, tmp_path / "out", name="missed", tracking__enabled="true", tracking__uri=uri,
                      search__tolerance=0.02)
    not_a_folder = tmp_path / "artifacts"
    not_a_folder.write_text("a file where the experiment's artifacts would go: every upload fails")
    MlflowClient(uri).create_experiment(cfg.experiment_name(), artifact_location=str(not_a_folder))
    observer = MlflowTracking().start(cfg, str(tmp_path / "ray" / "missed-1"), None)
    tracker, _, result = tracked_trial(cfg, observer.tracker.parent_run_id, "t0", TRIALS["t0"],
                                       StageStore.from_config(cfg), dataset, "missed-1")
    assert tracker.io.missed and all("upload" in what for what in tracker.io.missed)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lth.status"] == "finished"
    assert "lth.complete" not in run.data.tags and run.data.metrics["matching_sparsity"] == result.best.sparsity


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_search_layout(backend: str, request: pytest.FixtureRequest, data_root: Path, tmp_path: Path, dataset,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    uri = request.getfixturevalue("sqlite_uri") if backend == "sqlite" else request.getfixturevalue("mlflow_server").url
    name = f"layout-{backend}"
    cfg = tiny_config(data_root, tmp_path / "out", name=name, tracking__enabled="true", tracking__uri=uri,
                      search__tolerance=0.02)
    store = StageStore.from_config(cfg)
    observer = MlflowTracking().start(cfg, str(tmp_path / "ray" / f"{name}-1"), None)
    search = observer.tracker
    assert search.parent_run_id is not None

    results, trackers, records = {}, {}, {}
    for trial_id, choices in TRIALS.items():
        trackers[trial_id], records[trial_id], results[trial_id] = tracked_trial(
            cfg, search.parent_run_id, trial_id, choices, store, dataset, f"{name}-1")
    # A Ray retry of t0 walks its lineage again (all from the store): same run, nothing logged twice.
    again, _, rerun = tracked_trial(cfg, search.parent_run_id, "t0", TRIALS["t0"], store, dataset, f"{name}-1")
    assert all(r.reused for r in rerun.rounds)
    assert again.run_id == trackers["t0"].run_id and again.logged == []

    observer.finish(list(records.values()))
    assert search.missed == [] and all(not t.io.missed for t in trackers.values())

    client = MlflowClient(uri)
    parent = client.get_run(search.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lth.role"] == "search" and parent.data.tags["lth.store_uri"] == cfg.store_uri()
    assert parent.data.params["prune.rounds"] == "3" and parent.data.params["model.widths"] == "[32]"
    children = children_of(client, parent)
    assert sorted(c.data.tags["lth.trial_id"] for c in children) == sorted(TRIALS)
    for child in children:
        trial_id = child.data.tags["lth.trial_id"]
        assert child.info.status == "FINISHED"
        assert child.data.tags["lth.status"] == "finished" and child.data.tags["lth.complete"] == "1"
        rewind_step = cfg.with_choices(TRIALS[trial_id]).prune.rewind_step
        check_child(client, child, results[trial_id], TRIALS[trial_id], store, rewind_step)

    table = pq.read_table(io.BytesIO(read_artifact(client, parent.info.run_id, "tickets.parquet"))).to_pylist()
    expected = {(t, r.round): r for t, result in results.items() for r in result.rounds}
    assert {(row["trial_id"], row["round"]) for row in table} == set(expected) and len(table) == 6
    for row in table:
        assert row["val_accuracy"] == expected[row["trial_id"], row["round"]].val_accuracy
        assert row["rate"] == TRIALS[row["trial_id"]]["rate"]
        assert row["run_id"] == trackers[row["trial_id"]].run_id
    # the search's best ticket: the end of a trial's unbroken matching run (runs/best.py)
    assert parent.data.metrics["best_matching_sparsity"] == max(result.best.sparsity for result in results.values())
    assert read_artifact(client, parent.info.run_id, "plots/search_summary.png")[:4] == b"\x89PNG"
    # The finish's table, from its one read of the child runs (tracking/child_runs.py), is the table
    # `lth-search tickets` reads: the same rows, values and types.
    _, rows, _ = read_rows(name, search.parent_run_id, uri)
    assert read_artifact(client, parent.info.run_id, "tickets.csv") == rows_csv(rows)

    if backend == "server":
        rest_parent, rest_children = search_layout(uri, name, children=2)
        assert rest_parent["info"]["run_id"] == parent.info.run_id

    # The registered best ticket loads through models:/NAME@best as the very trained network best_ticket builds,
    # and takes raw inputs (it standardises them as training did).
    ticket = best_ticket(experiment=name, tracking_uri=uri)
    assert parent.data.tags["lth.best_run_id"] == ticket.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    registered = mlflow.pyfunc.load_model(f"models:/{name}@best")
    model = ticket.trained_model()
    loaded = registered.get_raw_model().state_dict()
    assert loaded.keys() == model.state_dict().keys()
    # the served form is the one that timed fastest here (a CSR layer's weight is sparse): equal as values
    strided = {name: t.to_dense() if t.layout != torch.strided else t for name, t in loaded.items()}
    assert all(torch.equal(strided[name], tensor) for name, tensor in model.state_dict().items())
    raw = read_raw(cfg.data)[0][2][:64]
    with torch.no_grad():
        assert (registered.predict(raw) == model(dataset.test.x[:64]).argmax(1).numpy()).all()


def test_lineage_command_logs_one_run(data_root: Path, tmp_path: Path, sqlite_uri: str) -> None:
    cfg = tiny_config(data_root, tmp_path / "out", name="lineage-run", tracking__enabled="true", tracking__uri=sqlite_uri)
    lines: list[str] = []
    result = run_lineage_command(cfg, progress=lines.append)

    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("lineage-run")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["lth.role"] == "lineage" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.params["rate"] == "0.2" and run.data.params["scope"] == "global"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]
    masks = {item.path for item in client.list_artifacts(run.info.run_id, "masks")}
    assert masks == {f"masks/round_0{r}{suffix}" for r in (1, 2, 3) for suffix in (".parquet", "_layers.csv")}
    assert any(run.info.run_id in line for line in lines)
    # An experiment of lineage runs only still answers best_ticket.
    ticket = best_ticket(experiment="lineage-run", min_sparsity=0.0, tracking_uri=sqlite_uri)
    assert ticket.run_id == run.info.run_id
    assert ticket.val_accuracy == max(r.val_accuracy for r in result.rounds)


def test_mlflow_sends_no_telemetry_unless_the_user_opts_in() -> None:
    """No network but the tracking URI: MLflow 3's usage telemetry is off once tracking is imported,
    before mlflow itself; a user's own setting stands."""
    code = ("import os; import lth_search.tracking.trial_run; from mlflow.telemetry.client import get_telemetry_client; "
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], get_telemetry_client())")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "CI", "DO_NOT_TRACK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["true", "None"]
    opted = subprocess.run([sys.executable, "-c", code], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"},
                           capture_output=True, text=True, check=True).stdout
    assert opted.split()[0] == "false"


def test_a_local_mlflow_database_commits_through_its_write_ahead_log(tmp_path: Path) -> None:
    """Every MLflow request is a commit: in WAL mode with synchronous=NORMAL it does not wait for
    the disk (tracking/sqlite_wal.py); a finished search folds the log back, so mlflow.db alone
    holds every run again."""
    import shutil
    import sqlite3
    from contextlib import closing

    from lth_search.tracking.client import new_client
    from lth_search.tracking.sqlite_wal import checkpoint

    database = tmp_path / "mlflow.db"
    client = new_client(f"sqlite:///{database}")
    run = client.create_run(client.create_experiment("wal"))
    client.log_metric(run.info.run_id, "m", 1.0)
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with client._tracking_client.store.engine.connect() as connection:  # MLflow's own connections
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL, not FULL (2)
    log = tmp_path / "mlflow.db-wal"
    assert log.stat().st_size > 0  # the run is in the log, not yet in the file

    checkpoint(database)
    assert log.stat().st_size == 0
    shutil.copy(database, tmp_path / "copy.db")  # the file alone
    copy = MlflowClient(f"sqlite:///{tmp_path / 'copy.db'}")
    assert copy.get_run(run.info.run_id).data.metrics == {"m": 1.0}
