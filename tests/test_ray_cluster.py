"""The Ray conventions on a real cluster: RAY_ADDRESS, the console, two nodes sharing one store,
Ctrl-C, and `ray job submit` resuming the search from elsewhere.

One two-node cluster serves the module: `ray start --head` (with its dashboard, as `ray job
submit` needs) and a second node joined with `ray start --address`, one CPU each, so two
lineages at a time run on both nodes. Each search is a tiny one (2 lineages of 2 rounds, a
32-unit MLP) and is judged by what it left behind: Ray's result files (which node ran each
round), the store's manifests and trial records, search.json, and what it printed where.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import LTH_SEARCH, wait_for
from ray_head import RAY, RayHead, start_head
from search_helpers import manifests, search_overrides, trial_records, trial_results

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    cluster = start_head(num_cpus=1, worker_nodes=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def _search(tmp_path: Path, name: str, data_root: Path, output_dir: str, **settings: object) -> list[str]:
    """`lth-search run` of a tiny search named `name` (config file in tmp_path)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"name: {name}\n")
    base = {"search.num_trials": 2, "prune.rounds": 2, "search.asha.enabled": "false",
            "search.confirm_seeds": 0}  # no confirmation runs: these tests are about where things run and print
    base.update({k.replace("__", "."): v for k, v in settings.items()})
    sets = search_overrides(data_root, Path(output_dir), base)
    return [LTH_SEARCH, "run", str(config)] + [arg for item in sets for arg in ("--set", item)]


def _nodes_of(results_path: str) -> set[str]:
    return {row["node_id"] for rows in trial_results(results_path).values() for row in rows}


def test_ray_address_alone_joins_and_the_console_is_short(head: RayHead, data_root: Path, tmp_path: Path) -> None:
    # 1500 steps a stage: long enough that both lineages train at once, one on each node, even
    # when a loaded machine is slow to launch the second (with 400, the first was done by then)
    command = _search(tmp_path, "envsearch", data_root, str(tmp_path), tracking__enabled="true",
                      train__steps=1500) + ["--json"]
    database = tmp_path / "elsewhere" / "mlflow.db"  # MLflow's own variable, honoured by `run` (no tracking.uri)
    database.parent.mkdir()
    env = {**head.env, "RAY_ADDRESS": head.gcs_address, "MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout: one JSON object and nothing else
    assert done.stdout.endswith("\n") and done.stdout.count("\n") == 1
    summary = json.loads(done.stdout)
    assert summary["finished"] == 2
    # two nodes, one store: the lineages ran on both nodes, and the dense stage they share was
    # trained once, by one of them (the other waited for its lease and read it from the store)
    assert len(head.node_ids()) == 2 and _nodes_of(summary["results_path"]) == head.node_ids()
    histories = trial_results(summary["results_path"])
    assert len(histories) == 2 and all([r["round"] for r in rows] == [1, 2] for rows in histories.values())
    dense = [m["key"] for m in manifests(tmp_path / "store") if m["kind"] == "dense"]
    records = trial_records(tmp_path / "store", "envsearch")
    assert len(dense) == 1 and sum(dense[0] in r["attempts"][0]["executed_keys"] for r in records.values()) == 1
    # stderr: header, a start and an end line per lineage, status lines, the summary; nothing of Ray's or MLflow's
    lines = done.stderr.splitlines()
    assert len(lines) <= 60, done.stderr
    assert lines[0].startswith("search envsearch-")
    assert sum(" started: " in line for line in lines) == 2
    assert sum(" finished: matching sparsity " in line for line in lines) == 2
    assert not [line for line in lines if "INFO" in line or "╭" in line or "tensorboard" in line.lower()], done.stderr
    summary_at = next(i for i, line in enumerate(lines) if line.startswith("best ticket:"))
    assert lines[-1].startswith("  then open http://127.0.0.1:5000/#/experiments/")
    assert summary["tracking_uri"] == f"sqlite:///{database}" and database.exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert all(not line.startswith("trial ") for line in lines[summary_at:])


def test_interrupted_search_resumes_from_another_folder_as_a_ray_job(head: RayHead, data_root: Path,
                                                                     tmp_path: Path) -> None:
    """Ctrl-C ends a search (joined through RAY_ADDRESS) resumably; `ray job submit` then resumes it
    on the cluster, from another folder, through the store URI alone."""
    shared = tmp_path / "shared"
    store_uri = f"local://{shared / 'store'}"  # an fsspec store: the search state goes through the store's filesystem
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    command = _search(tmp_path, "moved", data_root, "lth_runs", store__uri=store_uri, search__num_trials=2,
                      search__max_concurrent=1, train__steps=400)
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    driver = subprocess.Popen(command, env=env, cwd=first, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in driver.stdout:  # the console says when a lineage starts; its first round follows
            if " started: " in line:
                break
        records_dir = shared / "store" / "records"

        def first_round() -> bool:
            assert driver.poll() is None, "the search ended before it could be interrupted"
            records = trial_records(shared / "store", "moved") if records_dir.exists() else {}
            return any(r["rounds"] for r in records.values())

        wait_for(first_round, 300, "a first round in the trial records", poll=0.2)
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output = line + driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]
    # no traceback from lth-search (a Ray worker stopped mid-step may print one of its own,
    # forwarded with its "(lineage_trial pid=N)" prefix)
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line], output[-3000:]
    assert f"continue it with `lth-search resume moved --store-uri {store_uri}`" in output
    assert not (first / "lth_runs" / "searches").exists()  # the state lives beside the store, not in the folder
    state = json.loads((shared / "searches" / "moved" / "search.json").read_text())
    assert state["status"] == "interrupted"
    at_interrupt = trial_records(shared / "store", "moved")
    stored = {m["key"] for m in manifests(shared / "store")}

    # The resume is a Ray job (its entrypoint changes to the second folder first), verbose
    resume = [LTH_SEARCH, "resume", "moved", "--store-uri", store_uri, "--json", "-v"]
    entrypoint = ["sh", "-c", f"cd {shlex.quote(str(second))} && exec {shlex.join(resume)}"]
    done = subprocess.run([RAY, "job", "submit", "--address", head.dashboard_url, "--", *entrypoint],
                          env=head.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith('{"search_id"')]
    assert len(summaries) == 1, done.stdout[-3000:]
    summary = json.loads(summaries[0])
    assert summary["status"] == "finished" and summary["finished"] == 2
    # every round ran on the cluster's nodes: the entrypoint joined it (RAY_ADDRESS), no local Ray of its own
    assert _nodes_of(summary["results_path"]) and _nodes_of(summary["results_path"]) <= head.node_ids()
    # -v brings Ray's own tables back (the job's log holds the entrypoint's stdout and stderr)
    assert "Configuration for experiment" in done.stdout and "Trial status" in done.stdout
    state = json.loads((shared / "searches" / "moved" / "search.json").read_text())
    assert state["status"] == "finished" and state["results_path"].startswith(f"local://{shared / 'ray'}")
    after = trial_records(shared / "store", "moved")
    for trial_id, record in after.items():
        old = len(at_interrupt.get(trial_id, {}).get("attempts", []))
        trained = [key for attempt in record["attempts"][old:] for key in attempt["executed_keys"]]
        assert not set(trained) & stored, f"trial {trial_id} retrained a stored stage after the resume"
    assert not list(second.iterdir())  # the second folder only ran the command
