"""MLflow as a real search leaves it: Ray trials log to MLflow, a user looks with `mlflow ui`.

test_tracking.py checks the layout in detail with the trackers driven in-process; here
the whole product runs (run_search on the session's real Ray, trials in Ray workers; the
first test reads the session's shared tracked search, conftest.py) and MLflow is read back
the way a user reaches it: through the `mlflow ui` command the search printed (REST API),
and after a tracking server died mid-search, through `lth-search sync` (cli.main, in this
process). The truth to compare with is what the trials reported to Ray Tune (each trial's
result.json) and what the store holds.
"""

from __future__ import annotations

import io
import threading

import pyarrow.parquet as pq
import pytest
import torch
from conftest import wait_for
from fault_helpers import run_cli
from mlflow import MlflowClient
from mlflow_helpers import MlflowUi, rest, run_tags, search_layout
from search_helpers import search_config, trial_records, trial_results

from lth_search.store.codec import decode_mask
from lth_search.tracking.client import read_artifact
from lth_search.api import run_search
from lth_search.store.stage_store import StageStore

pytestmark = pytest.mark.slow
PER_ROUND = ("val_accuracy", "test_accuracy", "sparsity")


def _rest_history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = rest(url, "metrics/get-history", query={"run_id": run_id, "metric_key": key}).get("metrics", [])
    return sorted((int(m["step"]), float(m["value"])) for m in metrics)


def _reported(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["round"], float(row[key])) for row in rows]


def _assert_logged_masks_are_stored(client: MlflowClient, run_id: str, record: dict, store: StageStore) -> None:
    """Each round's mask artifact decodes to exactly the mask of that round's stage in the store."""
    for item in record["rounds"]:
        logged = decode_mask(read_artifact(client, run_id, f"masks/round_{item['round']:02d}.parquet"))
        stored = store.get(item["key"]).masks["mask"]
        assert list(logged) == list(stored) and all(torch.equal(logged[n], stored[n]) for n in stored)


def test_mlflow_ui_on_the_default_uri_shows_the_search(tracked_search, tmp_path):
    cfg, summary, out = tracked_search.cfg, tracked_search.summary, tracked_search.tmp  # conftest.py
    assert cfg.tracking_uri() == f"sqlite:///{out / 'mlflow.db'}"  # the default: beside the outputs
    histories = trial_results(summary["results_path"])
    assert summary["finished"] == 4 and len(histories) == 4

    ui = MlflowUi(tmp_path / "ui", summary["mlflow_command"]).start()
    try:
        parent, children = search_layout(ui.url, "tracked", children=4)
        assert parent["info"]["run_id"] == summary["parent_run_id"]
        assert parent["info"]["status"] == "FINISHED"
        experiment_id = parent["info"]["experiment_id"]
        assert summary["mlflow_link"].endswith(f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        by_trial = {run_tags(c)["lth.trial_id"]: c for c in children}
        assert sorted(by_trial) == sorted(histories)
        for trial_id, child in by_trial.items():
            assert child["info"]["status"] == "FINISHED"
            for key in PER_ROUND:  # one point per completed round, the values the trial reported
                assert _rest_history(ui.url, child["info"]["run_id"], key) == _reported(histories[trial_id], key)
    finally:
        ui.stop()

    client = MlflowClient(cfg.tracking_uri())
    store = StageStore.from_config(cfg)
    records = trial_records(out / "store", "tracked")
    for trial_id, child in by_trial.items():
        _assert_logged_masks_are_stored(client, child["info"]["run_id"], records[trial_id], store)
    table = pq.read_table(io.BytesIO(read_artifact(client, summary["parent_run_id"], "tickets.parquet")))
    assert sorted(zip(table["trial_id"].to_pylist(), table["round"].to_pylist())) == sorted(
        (t, r["round"]) for t, rows in histories.items() for r in rows)


def test_tracking_server_killed_mid_search_then_sync(ray_local, data_root, tmp_path, mlflow_server,
                                                     quick_mlflow_retries):
    with mlflow_server.restarted() as server:  # the session's server (conftest.py)
        cfg = search_config(data_root, tmp_path, {
            "name": "serverdown", "search.num_trials": 4, "search.asha.enabled": "false", "train.steps": 500,
            "tracking.enabled": "true", "tracking.uri": server.url,
        })
        store_root = tmp_path / "store"
        killed: dict[str, int] = {}

        def kill_after_the_first_round() -> None:
            def records_with_a_round() -> dict:
                records = trial_records(store_root, "serverdown") if (store_root / "records").exists() else {}
                return records if any(r.get("rounds") for r in records.values()) else {}

            records = wait_for(records_with_a_round, 300, "a first round")
            killed["rounds"] = sum(len(r["rounds"]) for r in records.values())
            server.kill()

        killer = threading.Thread(target=kill_after_the_first_round, daemon=True)
        killer.start()
        summary = run_search(cfg, progress=lambda _: None)
        killer.join(timeout=10)
        assert "rounds" in killed, "the server was never killed"

        # The search finished without MLflow, and the store has every stage of every trial.
        histories = trial_results(summary["results_path"])
        records = trial_records(store_root, "serverdown")
        assert summary["finished"] == 4 and len(histories) == 4
        assert killed["rounds"] < sum(len(rows) for rows in histories.values()), "killed too late to matter"
        store = StageStore.from_config(cfg)
        assert all(store.get(k) is not None for r in records.values() for k in [r["dense_key"], *r["round_keys"]])

        server.start()  # same port, database and artifacts
        code, out, err = run_cli(["sync", "serverdown", "--output-dir", str(tmp_path)])  # `lth-search sync`, in-process
        assert code == 0, err[-3000:]
        assert "MLflow is up to date" in err + out

        parent, children = search_layout(server.url, "serverdown", children=4)
        assert parent["info"]["status"] == "FINISHED"
        client = MlflowClient(server.url)
        for child in children:
            run_id = child["info"]["run_id"]
            trial_id = run_tags(child)["lth.trial_id"]
            assert child["info"]["status"] == "FINISHED"
            for key in PER_ROUND:  # as an uninterrupted trial would have logged them: what it reported
                assert _rest_history(server.url, run_id, key) == _reported(histories[trial_id], key)
            _assert_logged_masks_are_stored(client, run_id, records[trial_id], store)
        table = pq.read_table(io.BytesIO(read_artifact(client, parent["info"]["run_id"], "tickets.parquet")))
        assert table.num_rows == 12


def test_every_reader_names_the_same_best_ticket(tracked_search):
    """One best ticket (runs/best.py): the console, `best --json`, best_ticket(), the @best model
    version, the parent run's metrics and tags, and the tickets table's marks agree."""
    import json

    from lth_search.api import best_ticket, list_tickets

    cfg, summary = tracked_search.cfg, tracked_search.summary
    best = summary["best"]
    assert best is not None and best["round"] > 0
    console = [line for line in tracked_search.lines if line.startswith("best ticket:")]
    assert console == [next(line for line in tracked_search.lines if line.startswith("best ticket:"))]
    assert f"trial {best['trial_id']} round {best['round']}: sparsity {100 * best['matching_sparsity']:.2f}%" in console[0]

    uri = cfg.tracking_uri()
    ticket = best_ticket(experiment=cfg.name, tracking_uri=uri)
    code, out, err = run_cli(["best", "--json", "--experiment", cfg.name, "--tracking-uri", uri])
    assert code == 0, err
    printed = json.loads(out)
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(cfg.name, "best")
    parent = client.get_run(ticket.search_run_id)
    named = {
        "console/search.json": (best["trial_id"], best["round"], round(best["matching_sparsity"], 4)),
        "best_ticket()": (ticket.trial_id, ticket.round, round(ticket.sparsity, 4)),
        "best --json": (printed["trial_id"], printed["round"], round(printed["sparsity"], 4)),
        "@best model": (client.get_run(version.tags["lth.run_id"]).data.tags["lth.trial_id"],
                        int(version.tags["lth.round"]), round(float(version.tags["lth.sparsity"]), 4)),
        "parent run": (parent.data.tags["lth.best_trial_id"], int(parent.data.metrics["best_matching_round"]),
                       round(parent.data.metrics["best_matching_sparsity"], 4)),
    }
    assert len(set(named.values())) == 1, named
    # the tickets table marks each round with the verdict the lineage used, so the best ticket matches there
    rows = {(r["trial_id"], r["round"]): r for r in list_tickets(experiment=cfg.name, tracking_uri=uri)}
    assert rows[(best["trial_id"], best["round"])]["matching"] is True
    assert rows[(best["trial_id"], best["round"])]["matching_round"] == best["round"]
def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_copied_then_moved_search_syncs_as_itself(tracked_search, tmp_path, monkeypatch):
    """`cp -a OUT COPY; lth-search sync NAME --output-dir COPY` writes only COPY, and after
    `mv COPY MOVED` sync works in MOVED: saved state holds relative paths, the copied
    mlflow.db its artifacts beside itself (issue 22 item 2)."""
    import json
    import shutil

    out = tracked_search.tmp
    copy, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(out, copy, symlinks=True)
    before = _snapshot(out)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = (copy / "searches" / "tracked" / "search.json").read_text()
    records = "".join(p.read_text() for p in (copy / "store" / "records").rglob("*.json"))
    assert str(out) not in state and str(out) not in records
    assert json.loads(state)["results_path"].startswith("ray/")
    code, _, err = run_cli(["sync", "tracked", "--output-dir", str(copy)])
    assert code == 0, err
    assert _snapshot(out) == before  # the original is untouched
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    assert experiment.artifact_location.startswith((copy / "mlartifacts").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith((copy / "mlartifacts").as_uri()) for r in runs)
    shutil.move(copy, moved)
    code, _, err = run_cli(["sync", "tracked", "--output-dir", str(moved)])
    assert code == 0, err
    assert not copy.exists() and _snapshot(out) == before
    experiment = MlflowClient(f"sqlite:///{moved / 'mlflow.db'}").get_experiment_by_name("tracked")
    assert experiment.artifact_location.startswith((moved / "mlartifacts").as_uri())
