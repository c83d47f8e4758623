"""Searches across nodes and processes: a two-node cluster, a killed driver, a killed worker.

Real signals to real processes; the search is judged by Ray's result files, the store's
manifests and the trial records (which keep every attempt's pid, node and trained keys).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import LTH_SEARCH, wait_for
from search_helpers import manifests, search_config, search_overrides, trial_records, trial_results

from lth_search.api import run_search

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_two_node_cluster_shares_the_store_and_trains_dense_once(data_root, tmp_path):
    done = subprocess.run(
        [sys.executable, str(HERE / "two_node_search.py"), str(data_root), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["cluster_nodes"]) == 2
    used = {node for nodes in report["trial_nodes"].values() for node in nodes}
    assert used == set(report["cluster_nodes"]), "trials did not run on both nodes"
    assert all(rounds == [1, 2, 3] for rounds in report["rounds"].values())
    assert report["finished"] == 4
    assert len(report["dense_stages"]) == 1 and len(report["dense_trainers"]) == 1


def _alive(marker: str) -> bool:
    """Whether a live (not zombie) process carries `marker` in its environment: the driver
    and every Ray process it started (they inherit the driver's environment)."""
    needle = marker.encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes():
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone while we looked, or not ours to read
        if state != "Z":
            return True
    return False


def _stage_keys(store: Path) -> set[str]:
    return {m["key"] for m in manifests(store)}


def test_killed_driver_resumes_without_recomputing_stored_stages(data_root, tmp_path):
    settings = {"search.num_trials": 4, "search.asha.enabled": "false", "train.steps": 1500,
                "search.space.rate": "[0.2, 0.4]"}
    (tmp_path / "killme.yaml").write_text("name: killme\n")
    command = [LTH_SEARCH, "run", str(tmp_path / "killme.yaml")]
    for item in search_overrides(data_root, tmp_path, settings):
        command += ["--set", item]
    store = tmp_path / "store"
    with open(tmp_path / "run.log", "w") as log:
        marker = f"LTH_TEST_DRIVER={tmp_path}"
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                  env={**_env(), "LTH_TEST_DRIVER": str(tmp_path)})  # marks its Ray too
        try:
            def mid_search():
                assert driver.poll() is None, "the search ended before it could be killed mid-way"
                records = trial_records(store, "killme") if (store / "records").exists() else {}
                finished = [r for r in records.values() if r["status"] == "finished"]
                midway = [r for r in records.values() if r["status"] == "running" and 1 <= len(r["rounds"]) < 3]
                return records if finished and midway else None

            wait_for(mid_search, 300, "a finished and a half-way trial")
            driver.send_signal(signal.SIGKILL)  # the driver dies; the Ray it started follows it
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
    # the stages stored at the kill are counted once no process of the dead driver's Ray is left
    wait_for(lambda: not _alive(marker), 120, "the dead driver's Ray processes to exit")
    at_kill = trial_records(store, "killme")
    stored_at_kill = _stage_keys(store)
    state = json.loads((tmp_path / "searches" / "killme" / "search.json").read_text())
    assert state["status"] == "running"

    resumed = subprocess.run(
        [LTH_SEARCH, "resume", "killme", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "best ticket:" in resumed.stderr

    after = trial_records(store, "killme")
    state = json.loads((tmp_path / "searches" / "killme" / "search.json").read_text())
    assert state["status"] == "finished"
    histories = trial_results(state["results_path"])
    assert len(histories) == 4 and {after[t]["status"] for t in histories} == {"finished"}
    # a trial the driver started after Ray's last snapshot is not Ray's to resume: Ray
    # ran a replacement, and the orphan's record says so
    assert {r["status"] for t, r in after.items() if t not in histories} <= {"abandoned"}
    steps_per_round = {k: 1500 - r["config"]["prune"]["rewind_step"] for k, r in after.items()}
    recomputed = 0
    for trial_id, record in after.items():
        before = at_kill.get(trial_id)
        new_attempts = record["attempts"][len(before["attempts"]) if before else 0:]
        trained = [key for attempt in new_attempts for key in attempt["executed_keys"]]
        # nothing that was in the store at the kill is trained again
        assert not set(trained) & stored_at_kill, f"trial {trial_id} retrained a stored stage"
        if before is not None and before["status"] == "finished":
            assert trained == [], f"finished trial {trial_id} trained again"
        elif before is not None:
            # an unfinished trial trains only the rounds it had not finished: the one in flight
            # at the kill (lost) and those after it
            assert len(trained) <= 3 - len(before["rounds"])
            recomputed += 1
        assert sum(a["steps_executed"] for a in new_attempts) == len(trained) * steps_per_round[trial_id]
    assert recomputed >= 1
    # every stage computed after the resume was computed exactly once across trials
    new_keys = _stage_keys(store) - stored_at_kill
    trained_after = [k for t, r in after.items()
                     for a in r["attempts"][len(at_kill.get(t, {}).get("attempts", [])):] for k in a["executed_keys"]]
    assert sorted(trained_after) == sorted(new_keys)
    # Ray recorded each round of each trial once
    assert all(sorted(r["round"] for r in rows) == [1, 2, 3] for rows in histories.values())


def test_ctrl_c_ends_the_search_resumably_with_exit_130(data_root, tmp_path):
    settings = {"search.num_trials": 4, "search.asha.enabled": "false", "train.steps": 1500}
    (tmp_path / "stopme.yaml").write_text("name: stopme\n")
    command = [LTH_SEARCH, "run", str(tmp_path / "stopme.yaml")]
    for item in search_overrides(data_root, tmp_path, settings):
        command += ["--set", item]
    store = tmp_path / "store"
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                              cwd=tmp_path)
    try:
        def first_round():
            assert driver.poll() is None, "the search ended before it could be interrupted"
            records = trial_records(store, "stopme") if (store / "records").exists() else {}
            return any(r["rounds"] for r in records.values())

        wait_for(first_round, 300, "a first round")
        driver.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]
    # no traceback from lth-search (a Ray worker killed mid-step may print one of its own,
    # forwarded with its "(lineage_trial pid=N)" prefix)
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line], output[-3000:]
    assert f"continue it with `lth-search resume stopme --output-dir {tmp_path}`" in output
    state = json.loads((tmp_path / "searches" / "stopme" / "search.json").read_text())
    assert state["status"] == "interrupted"


def test_killed_worker_is_retried_and_resumes_from_the_store(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {
        "search.num_trials": 1, "search.max_failures": 2, "train.steps": 3000, "search.space.rewind_step": "null",
    })
    store = tmp_path / "store"
    killed: dict[str, int] = {}

    def kill_mid_round() -> None:
        def after_round_one():
            records = trial_records(store, cfg.name) if (store / "records").exists() else {}
            return next((r for r in records.values() if len(r["rounds"]) == 1), None)

        record = wait_for(after_round_one, 300, "round 1")
        wait_for(lambda: list(tmp_path.glob("ray/*/*/checkpoint_000000")), 60, "round 1's checkpoint")
        # round 2 (3000 steps, more than a second) is training now: its stage is not stored yet
        killed["pid"] = record["attempts"][-1]["pid"]
        killed["stored"] = len(manifests(store))
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_round, daemon=True)
    killer.start()
    summary = run_search(cfg, progress=lambda _: None)
    killer.join(timeout=10)
    assert "pid" in killed, "the worker was never killed"

    (record,) = trial_records(store, cfg.name).values()
    first, second = record["attempts"]
    assert first["pid"] == killed["pid"] and second["pid"] != killed["pid"]
    assert killed["stored"] == 2  # dense + round 1 when the worker died mid round 2
    assert second["restored_round"] == 1
    # the retry trained only rounds 2 and 3; dense and round 1 came from the store
    assert not set(first["executed_keys"]) & set(second["executed_keys"])
    assert second["executed_keys"] == record["round_keys"][1:]
    assert second["steps_executed"] == 2 * 3000
    assert summary["finished"] == 1 and record["status"] == "finished"
    (rows,) = trial_results(summary["results_path"]).values()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["attempt"] for r in rows] == [1, 2, 2]
