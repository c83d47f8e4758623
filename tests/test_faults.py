"""Fault drills (issue 12): what a user types or a machine does never gives a traceback,
a hang or a lost result.

Bad input runs in-process through `cli.main` as a table: one line naming the key, file
or name, exit 2, nothing written. Machine faults are real: a tmpfs that fills up
(ENOSPC from the kernel), a sqlite file that is not a database, a SIGKILLed process
holding a lease, damaged records; the store's own drills are test_faults_store.py.
bench/drills.py runs the same tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LTH_SEARCH, tiny_config, wait_for
from fault_cases import COMMAND_CASES, FILE_CASES, INPUT_CASES, QUICKSTART, lineage_args, write_damaged_states
from fault_helpers import MountRefused, fill, one_line_error, run_cli, snapshot, tmpfs
from lth_search.config import load_config
from lth_search.errors import DataError, RuntimeFailure, StoreError, TrackingError
from lth_search.store.records import check_record_name
from lth_search.store.stage_store import StageStore

@pytest.mark.parametrize(("case", "sets", "needle"), INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_input(case: str, sets: list[str], needle: str, data_root: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    code, out, err = run_cli(lineage_args(data_root, tmp_path / "out", sets))
    assert one_line_error(code, err, 2, needle) is None, one_line_error(code, err, 2, needle)
    assert out == "" and snapshot(tmp_path) == before  # nothing trained, nothing written


@pytest.mark.parametrize(("case", "text", "needle"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case: str, text: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(text.encode("latin1") if case.endswith("not text") else text.encode())
    before = snapshot(tmp_path)
    code, _, err = run_cli(["lineage", str(tmp_path / "bad.yaml"), "--set", f"output_dir={tmp_path / 'out'}"])
    assert one_line_error(code, err, 2, needle) is None, one_line_error(code, err, 2, needle)
    assert len(err) < 1000 and snapshot(tmp_path) == before


@pytest.mark.parametrize(("case", "args", "needle", "exit_code"), COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_bad_command(case: str, args: list[str], needle: str, exit_code: int, tmp_path: Path) -> None:
    write_damaged_states(tmp_path / "out")
    before = snapshot(tmp_path)
    code, _, err = run_cli([a.format(out=tmp_path / "out") for a in args])
    if case.startswith("usage"):
        assert code == 2 and "Traceback" not in err
    else:
        assert one_line_error(code, err, exit_code, needle) is None, one_line_error(code, err, exit_code, needle)
    assert snapshot(tmp_path) == before


def test_resource_hint_is_itself_valid(tmp_path: Path) -> None:
    """13: the hint for too many CPUs names a value `resources.cpu` accepts (not 0)."""
    code, _, err = run_cli(["run", QUICKSTART, "--set", "resources.cpu=512", "--set", f"output_dir={tmp_path}"])
    hint = f"resources.cpu={os.cpu_count()}"
    assert one_line_error(code, err, 2, hint) is None, err
    assert load_config(None, [hint]).resources.cpu == os.cpu_count()  # the hint validates


def test_record_names_refuse_a_trailing_newline() -> None:
    """13: `$` matched before a final newline; names are checked with fullmatch now."""
    assert check_record_name("t_00001", "name") == "t_00001"
    for bad in ("t_00001\n", "../x", ".hidden", "", "a/b", "x" * 200):
        with pytest.raises(StoreError):
            check_record_name(bad, "name")


# Data files ---------------------------------------------------------------------------------
def test_idx_header_whose_size_overflows(tmp_path: Path) -> None:
    """10: four 32-bit dims overflowed numpy's product; the message states the real size."""
    from lth_search.engine.data_files import read_idx

    path = tmp_path / "huge-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 3 + b"\0" * 10)
    with pytest.raises(DataError, match=str((2**32 - 1) ** 3)) as error:
        read_idx(path, 3)
    assert str(path) in str(error.value)


def test_cifar_label_out_of_range_and_dtype_refusal_name_the_file(tmp_path: Path) -> None:
    """10: a label of 2**70 overflowed int64 (traceback); a refused dtype did not say which file."""
    import pickle

    from lth_search.engine.data_files import read_cifar_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [2**70]}, protocol=2))
    with pytest.raises(DataError, match="labels") as error:
        read_cifar_batch(path)
    assert str(path) in str(error.value)
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), dtype=object), b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match="refusing") as error:
        read_cifar_batch(path)
    assert str(path) in str(error.value)


def test_best_out_to_a_file_or_an_unwritable_place(tmp_path: Path) -> None:
    """10: `best --out` onto an existing file or an unwritable path was a traceback."""
    from lth_search.tickets import Ticket

    ticket = Ticket(run_id="r", round=1, sparsity=0.5, metrics={"val_accuracy": 0.5, "test_accuracy": 0.5},
                    params={}, config=load_config(None, []), mask={"w": torch.ones(2, 2, dtype=torch.bool)},
                    rewind_weights={"w": torch.zeros(2, 2)}, input_shape=(2,), num_classes=2)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(TrackingError, match="not a ticket folder"):
        ticket.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(RuntimeFailure, match="cannot write the ticket"):
        ticket.save("/proc/lth-ticket")
    saved = ticket.save(tmp_path / "ticket")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "mask.safetensors", "rewind.safetensors", "ticket.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ticket"]  # no staging left


# Tracking ----------------------------------------------------------------------------------------
def test_lineage_result_survives_a_broken_tracking_database(data_root: Path, tmp_path: Path,
                                                             quick_mlflow_retries) -> None:
    """1: a non-database sqlite file crashed `lineage` after all its training; the result was printed nowhere."""
    (tmp_path / "not.db").write_text("this is not a database")
    sets = ["tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'not.db'}"]
    code, out, err = run_cli(lineage_args(data_root, tmp_path / "out", sets) + ["--json"])
    assert code == 0, err
    result = json.loads(out)
    assert len(result["rounds"]) == 1 and "Traceback" not in err
    assert "logging failed" in err and "run the same `lth-search lineage` command again" in err


def test_sqlite_first_use_race_and_quotes_in_tag_values(tmp_path: Path) -> None:
    """1: two first runs racing to create the sqlite schema ("table ... already exists") crashed one of them;
    5: a quote in output_dir broke the MLflow filter string (values were not escaped)."""
    from lth_search.tracking.client import MlflowIO

    uri = f"sqlite:///{tmp_path / 'race.db'}"
    results: list = []
    barrier = threading.Barrier(2)

    def first_use() -> None:
        io = MlflowIO(uri, "race", base_delay_s=0.05)
        barrier.wait()
        results.append(io.call("create the experiment", lambda: io.experiment_id("race")))

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [ok for ok, _ in results] == [True, True] and results[0][1] == results[1][1]

    io = MlflowIO(uri, "q")
    experiment = results[0][1]
    for value in ("it's", 'say "hi"', "both ' and \""):
        run = io.client.create_run(experiment, tags={"lth.path": value, "lth.role": "search"})
        found = io.find_run(experiment, {"lth.path": value, "lth.role": "search"})
        assert found is not None and found.info.run_id == run.info.run_id


def test_lineage_run_left_incomplete_is_repaired_by_a_rerun(data_root: Path, tmp_path: Path,
                                                            quick_mlflow_retries) -> None:
    """3: a lineage whose MLflow logging failed was still FINISHED, and a rerun made a second run."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    blocker = db.parent / "mlartifacts" / "repair"
    blocker.parent.mkdir()
    blocker.write_text("a file where the artifact folder belongs: every upload fails")
    sets = ["tracking.enabled=true", f"tracking.uri={uri}", "name=repair"]
    code, _, err = run_cli(lineage_args(data_root, tmp_path / "out", sets))
    assert code == 0 and "logging failed" in err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("repair").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.status == "RUNNING"  # not FINISHED with its masks missing

    blocker.unlink()
    code, _, err = run_cli(lineage_args(data_root, tmp_path / "out", sets))
    assert code == 0 and "logging failed" not in err
    [again] = client.search_runs([experiment])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "masks")] == [
        "masks/round_01.parquet", "masks/round_01_layers.csv"]


def test_sync_reports_unreadable_records_and_keeps_its_parent_run(data_root: Path, tmp_path: Path,
                                                                  quick_mlflow_retries) -> None:
    """4: sync skipped unreadable records and said "up to date"; 5: it never saved the parent run id."""
    from mlflow import MlflowClient

    from lth_search.engine.data import load_dataset
    from lth_search.runs.record import TrialRecord
    from lth_search.runs.trial import run_trial
    from mlflow_helpers import save_search_state

    out = tmp_path / "it's here"  # a quote in output_dir: in the parent run's tags
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(data_root, out, name="syncme", tracking__enabled="true", tracking__uri=uri, prune__rounds=1)
    store = StageStore.from_config(cfg)
    record = TrialRecord.open(store, cfg.name, "t0", "syncme-1", None, {}, cfg.model_dump(mode="json"))
    run_trial(cfg, store, lambda *_: None, record, dataset=load_dataset(cfg.data, cfg.seed))  # MLflow down meanwhile
    save_search_state(cfg, "syncme-1", None)
    state = out / "searches" / "syncme" / "search.json"

    code, out_text, err = run_cli(["sync", "syncme", "--output-dir", str(out)])
    assert code == 0, err
    parent = json.loads(state.read_text())["parent_run_id"]
    assert parent is not None
    (Path(store.root) / "records" / "search-syncme" / "t1.json").write_text('{"trial_id": "t1", "sta')
    code, _, err = run_cli(["sync", "syncme", "--output-dir", str(out)])
    last = err.strip().splitlines()[-1]  # after sync's progress lines
    assert code == 1 and last.startswith("lth-search: error:") and "(t1)" in last and "Traceback" not in err
    assert json.loads(state.read_text())["parent_run_id"] == parent
    experiment = MlflowClient(uri).get_experiment_by_name("syncme").experiment_id
    parents = [r for r in MlflowClient(uri).search_runs([experiment]) if r.data.tags.get("lth.role") == "search"]
    assert [r.info.run_id for r in parents] == [parent]  # two syncs, one parent run


# Driver ------------------------------------------------------------------------------------------
def test_driver_status_write_on_a_full_disk_does_not_crash(tmp_path: Path) -> None:
    """2: a write failure in the driver's Tune callback (disk full in put_record) crashed the driver."""
    from lth_search.runs.record import TrialRecord, TrialStatus
    from lth_search.search.console import SearchConsole
    from lth_search.search.trial_status import TrialEvents

    try:
        with tmpfs(tmp_path / "disk", 128) as disk:
            cfg = tiny_config(Path("/unused"), tmp_path, name="x", store__uri=str(disk / "store"))
            events = TrialEvents(cfg, SearchConsole(1, (lines := []).append))
            TrialRecord(search="x", trial_id="t0", choices={"pad": "x" * 2000}).save(events.store)
            ballast = fill(disk, leave_kb=0)
            events._set_status("t0", TrialStatus.STOPPED)  # ENOSPC inside a Tune callback: reported, not raised
            assert "cannot record status stopped now" in lines[0] and "No space left" in lines[0]
            assert TrialRecord.load(events.store, "x", "t0").status is TrialStatus.RUNNING
            ballast.unlink()
            events._set_status("t0", TrialStatus.STOPPED)
            assert TrialRecord.load(events.store, "x", "t0").status is TrialStatus.STOPPED
    except MountRefused as refused:
        pytest.skip(str(refused))


# Kills -------------------------------------------------------------------------------------------
def test_sigkilled_lineage_lease_is_taken_over_at_once_and_sigterm_is_an_interrupt(data_root: Path, tmp_path: Path) -> None:
    """8 (acceptance 3): after a SIGKILL the rerun hung silently for the 120 s lease time-out; SIGTERM was not SIGINT."""
    args = [LTH_SEARCH, *lineage_args(data_root, tmp_path / "out", ["train.steps=200000", "store.lease_timeout_s=120"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    leases = tmp_path / "out" / "store" / "leases"
    def lease_taken() -> bool:
        assert first.poll() is None, "the first lineage ended before it took its lease"
        return leases.exists() and any(leases.glob("*.lease"))

    wait_for(lease_taken, 60, "the first lineage's lease")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    first.stderr.close()

    started = time.monotonic()
    rerun = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in rerun.stderr:
        lines.append(line)
        if "taking it over" in line:
            break
    took = time.monotonic() - started
    assert any(f"pid {first.pid} on this host) is dead; taking it over" in line for line in lines), lines
    assert took < 30, took  # seconds (imports, data), not the 120 s time-out
    rerun.send_signal(signal.SIGTERM)  # like Ctrl-C: exit 130, one line, no traceback
    rest = rerun.stderr.read()
    assert rerun.wait(timeout=30) == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "lth-search: interrupted"


FIRST_USE = """
import os, sys, time
from lth_search.tracking.client import MlflowIO
io = MlflowIO(sys.argv[1], "race", attempts=1)
open(sys.argv[3], "w").close()  # imported: ready for the start
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
ok, experiment = io.call("create the experiment", lambda: io.experiment_id("race"))
sys.exit(0 if ok else 3)
"""


def test_two_processes_creating_one_sqlite_database_both_succeed_at_once(tmp_path: Path) -> None:
    """11 (issue 22): two processes' first use of one new mlflow.db, with no retry: both succeed, no warning."""
    import sys

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, uri, str(go), str(flag)], stderr=subprocess.PIPE,
                              text=True) for flag in ready]
    wait_for(lambda: all(flag.exists() for flag in ready), timeout=120, what="both processes' imports")
    go.touch()  # both imported and wait for this file: it starts their first use together
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("failed" in err for err in errs), errs
