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
import re
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
    # no line of a Ray worker ("(lineage_trial pid=N) ..."), no colour codes: stderr here is a file, not a TTY
    assert not [line for line in lines if re.search(r"\(\w+ pid=\d+", line)], done.stderr
    assert "\x1b" not in done.stderr
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
    # one resume hint (not Ray's Tuner.restore beside ours), with counts that include the running trial
    assert output.count("continue it with") == 1 and "Tuner.restore(" not in output, output[-3000:]
    assert re.search(r"search interrupted with \d of 2 lineages done and [12] cut short", output), output[-3000:]
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
    # saved state holds paths relative to its folder (issue 22): the results under the shared folder's ray/
    assert state["status"] == "finished" and state["results_path"].startswith("ray/moved-")
    after = trial_records(shared / "store", "moved")
    for trial_id, record in after.items():
        old = len(at_interrupt.get(trial_id, {}).get("attempts", []))
        trained = [key for attempt in record["attempts"][old:] for key in attempt["executed_keys"]]
        assert not set(trained) & stored, f"trial {trial_id} retrained a stored stage after the resume"
    assert not list(second.iterdir())  # the second folder only ran the command


def _job(head: RayHead, entrypoint: list[str], working_dir: Path, env_vars: dict[str, str] | None = None,
         wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir` of `entrypoint` (waits for its end unless `wait` is False)."""
    command = [RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(working_dir)]
    if env_vars:
        command += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    command += [] if wait else ["--no-wait"]
    return subprocess.run([*command, "--", *entrypoint], env=head.env, capture_output=True, text=True, timeout=300)


def test_a_ray_job_refuses_results_in_its_own_folder_and_keeps_them_where_told(
        head: RayHead, data_root: Path, tmp_path: Path) -> None:
    """`ray job submit --working-dir`: with the default relative output_dir the search's results would land
    in Ray's copy of the working folder; it refuses in one line (exit 2) before anything starts. Told where
    (store.uri, MLFLOW_TRACKING_URI), its results land there, and a resume from another folder finishes."""
    job_folder, other, durable = tmp_path / "job", tmp_path / "other", tmp_path / "durable"
    for folder in (job_folder, other, durable):
        folder.mkdir()
    command = _search(job_folder, "durable", data_root, "lth_runs", tracking__enabled="true", search__num_trials=2,
                      search__max_concurrent=1, prune__rounds=1)
    command[2] = "durable.yaml"  # the config as a user names it: relative to the job's working folder

    refused = _job(head, command, job_folder)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "failed with exit code 2" in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("lth-search: error:")]
    assert len(set(errors)) == 1, output  # Ray repeats the job's log in its status message
    assert errors[0].startswith("lth-search: error: output_dir: the search's stages would go to ")
    assert "/runtime_resources/working_dir_files/" in errors[0] and "a Ray job's working folder" in errors[0]
    assert "store.uri" in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]
    assert "Traceback" not in output and " started: " not in output
    assert not list(Path(head.temp_dir).glob("**/lth_runs"))  # nothing written in Ray's copy of the folder

    store, database = durable / "store", durable / "mlflow.db"
    submitted = _job(head, command + ["--set", f"store.uri={store}"], job_folder,
                     {"MLFLOW_TRACKING_URI": f"sqlite:///{database}"}, wait=False)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    job_id = next(word.strip("'") for line in (submitted.stdout + submitted.stderr).splitlines()
                  if "submitted successfully" in line for word in line.split() if word.strip("'").startswith("raysubmit_"))
    wait_for(lambda: (store / "records").exists() and any(r["rounds"] for r in trial_records(store, "durable").values()),
             300, "a first round of the job's search in the durable store", poll=0.5)
    stopped = subprocess.run([RAY, "job", "stop", "--address", head.dashboard_url, job_id], env=head.env,
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    logs = subprocess.run([RAY, "job", "logs", "--address", head.dashboard_url, job_id], env=head.env,
                          capture_output=True, text=True, timeout=60).stdout
    # the header says where every result goes: the places given, none in the job's folder
    (places,) = [line for line in logs.splitlines() if line.startswith("  results: ")]
    assert f"stages {store}; MLflow sqlite:///{database}; resume state {durable}/searches/durable;" in places, places
    assert database.exists() and (durable / "searches" / "durable" / "search.json").exists()

    # resumed from another folder (on the head, joined through RAY_ADDRESS), it finishes where it was told
    resume = [LTH_SEARCH, "resume", "durable", "--store-uri", str(store), "--json"]
    done = subprocess.run(resume, env={**head.env, "RAY_ADDRESS": head.gcs_address}, cwd=other,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "finished" and summary["finished"] == 2
    assert summary["tracking_uri"] == f"sqlite:///{database}"
    assert json.loads((durable / "searches" / "durable" / "search.json").read_text())["status"] == "finished"
    assert {r["status"] for r in trial_records(store, "durable").values()} <= {"finished", "stopped"}
    assert not list(other.iterdir())  # the other folder only ran the command
