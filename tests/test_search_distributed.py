"""Searches across processes: a killed driver, a killed worker.

Real signals to real processes; the search is judged by Ray's result files, the store's
manifests and the trial records (which keep every attempt's pid, node and trained keys).
Two nodes sharing one store, and Ctrl-C (exit 130, resumable), are in test_ray_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import LTH_SEARCH, wait_for
from fault_helpers import kill_with_its_ray
from search_helpers import manifests, search_config, search_overrides, trial_records, trial_results

from lth_search.api import run_search
from lth_search.search.ray_leases import RayLeaseService

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


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
            # the driver dies, and its Ray's processes with it: the stages stored at the kill are
            # counted once no process of the dead driver's Ray is left
            kill_with_its_ray(driver, marker)
        finally:
            if driver.poll() is None:
                driver.kill()
    at_kill = trial_records(store, "killme")
    stored_at_kill = _stage_keys(store)
    # the driver trained the search's dense stage while its Ray started (driver._dense_ahead):
    # it is stored, and no trial trained it
    dense_keys = {record["dense_key"] for record in at_kill.values()}
    assert len(dense_keys) == 1 and dense_keys <= stored_at_kill
    assert not [a for r in at_kill.values() for a in r["attempts"] if dense_keys & set(a["executed_keys"])]
    state = json.loads((tmp_path / "searches" / "killme" / "search.json").read_text())
    assert state["status"] == "running"

    # the killed driver's folder is copied and the copy resumed: only the copy changes, and the
    # dead driver's lease (copied with it) is taken over (issue 22 items 2, 3)
    original = tmp_path
    tmp_path = original.parent / f"{original.name}-copy"
    shutil.copytree(original, tmp_path, symlinks=True)
    untouched = {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()}
    assert list((tmp_path / "store" / "leases").glob("*.lease"))
    store = tmp_path / "store"
    resumed = subprocess.run(
        [LTH_SEARCH, "resume", "killme", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "best ticket:" in resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()} == untouched
    assert json.loads((original / "searches" / "killme" / "search.json").read_text())["status"] == "running"

    after = trial_records(store, "killme")
    state = json.loads((tmp_path / "searches" / "killme" / "search.json").read_text())
    assert state["status"] == "finished"
    histories = trial_results(str(tmp_path / state["results_path"]))
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


def _trial_folders(output_dir: Path, name: str) -> list[Path]:
    """The trials' folders in Ray's results of search `name`: one appears as its trial starts."""
    saved = output_dir / "searches" / name / "search.json"
    if not saved.exists():
        return []
    results = output_dir / json.loads(saved.read_text())["results_path"]
    return [path for path in results.glob("*") if path.is_dir()]


def test_killed_worker_is_retried_and_resumes_from_the_store(ray_local, data_root, tmp_path):
    steps = 1500
    cfg = search_config(data_root, tmp_path, {
        "search.num_trials": 1, "search.max_failures": 2, "train.steps": steps, "search.space.rewind_step": "null",
    })
    store = tmp_path / "store"
    killed: dict[str, int] = {}

    def kill_mid_round() -> None:
        def after_round_one():
            records = trial_records(store, cfg.name) if (store / "records").exists() else {}
            record = next(iter(records.values()), None)
            assert record is None or len(record["rounds"]) <= 1, "round 2 ended before it could be killed"
            return record if record is not None and len(record["rounds"]) == 1 else None

        wait_for(after_round_one, 300, "round 1")
        leases = RayLeaseService(cfg.name)  # the search's lease actor (the driver, this process, made it)

        def round_two_training():
            # Round 2 holds its stage's lease while it trains. It only begins once `tune.report` of
            # round 1 returned, which Ray allows after the driver registered round 1's checkpoint.
            record = after_round_one()
            return record if set(leases.held()) - {record["dense_key"], *record["round_keys"]} else None

        record = wait_for(round_two_training, 300, "round 2 to train")
        # Storage's copy of result.json lags the driver's by Ray's sync clock; make it lag for
        # certain by emptying it. The restarted trial must keep the driver's copy
        # (search/result_file.py), where Ray's own writer copied this one back.
        (trial_folder,) = wait_for(lambda: _trial_folders(tmp_path, cfg.name), 60, "the trial's folder in storage")
        (trial_folder / "result.json").write_text("")
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
    assert second["steps_executed"] == 2 * steps
    assert summary["finished"] == 1 and record["status"] == "finished"
    (rows,) = trial_results(summary["results_path"]).values()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["attempt"] for r in rows] == [1, 2, 2]


def test_one_driver_per_search_and_sigterm_stops_it_resumably(data_root, tmp_path):
    """A second `run` of a running name and a `resume` of it are refused in one line naming the
    driver; SIGTERM is Ctrl-C: exit 130, "interrupted", resumable (issue 22 items 3, 4, 5)."""
    settings = {"search.num_trials": 2, "search.asha.enabled": "false", "train.steps": 40000,
                "search.space.rewind_step": "null", "prune.rewind_steps": "[0]"}
    (tmp_path / "busy.yaml").write_text("name: busy\n")
    command = [LTH_SEARCH, "run", str(tmp_path / "busy.yaml")]
    for item in search_overrides(data_root, tmp_path, settings):
        command += ["--set", item]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=_env(), start_new_session=True)
    try:
        wait_for(lambda: driver.poll() is not None or _trial_folders(tmp_path, "busy"),
                 300, "a trial to start (its dense stage then trains for many seconds)")
        assert driver.poll() is None, "the search ended before a second driver could try"
        others = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                   env=_env())
                  for args in (command, [LTH_SEARCH, "resume", "busy", "--output-dir", str(tmp_path)])]
        outs = [other.communicate(timeout=120)[1] for other in others]
        for other, err in zip(others, outs):
            lines = err.strip().splitlines()
            assert other.returncode == 1 and len(lines) == 1, err
            assert f"driven by pid {driver.pid} on host" in lines[0] and "Traceback" not in err
        assert driver.poll() is None
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 130, err[-2000:]
    assert "interrupted" in err and "SIGTERM received" not in err and "Aborted" not in err
    state = json.loads((tmp_path / "searches" / "busy" / "search.json").read_text())
    assert state["status"] == "interrupted"
