"""Issue 22, item 7: a killed trial worker and a store that turns read-only mid-search.

Both printed tracebacks: Ray's 20-line ActorDiedError for the killed worker (the search
itself went on), and six StoreFailure tracebacks for the read-only store, after which the
search "finished" with 0 trials and search.json said so. Now the first is one line and a
retry; the second stops the search at once with one line, search.json says `failed` and
why, and `resume` finishes it once the store is writable again.

The worker is killed for real (SIGKILL to a `ray::ImplicitFunc` process of this test's own
Ray, a descendant of this process); the store is made read-only for real (a read-only bind
mount, which needs root: skipped where mounting is refused).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from fault_helpers import one_line_error, run_cli
from search_helpers import search_overrides
from test_faults import QUICKSTART


def _trial_workers() -> list[psutil.Process]:
    """The trial processes of the Ray this test process started (its descendants only)."""
    return [p for p in psutil.Process().children(recursive=True)
            if any("ray::ImplicitFunc" in part for part in _cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _when(condition, stop: threading.Event, then) -> threading.Thread:
    """Run `then()` once `condition()` holds (checked every 0.2 s) unless `stop` is set first."""
    def watch() -> None:
        while not stop.wait(0.2):
            if condition():
                then()
                return
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _args(data_root: Path, out: Path, name: str, **extra: object) -> list[str]:
    settings = {"name": name, "search.num_trials": 2, "prune.rounds": 2, "search.asha.enabled": "false",
                "search.space.rate": "[0.2, 0.4]", "search.space.rewind_step": "null", **extra}
    return ["run", QUICKSTART] + [a for s in search_overrides(data_root, out, settings) for a in ("--set", s)]


def test_killed_trial_worker_is_one_line_and_retried(ray_local, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    leases = out / "store" / "leases"
    stop = threading.Event()

    killed: list[int] = []

    def killed_a_training_worker() -> bool:
        """While a lease file says a worker is computing a stage, SIGKILL a trial worker; a worker
        that ended between being listed and the signal is skipped, and the watch goes on."""
        try:
            if not (leases.is_dir() and any(leases.iterdir())):
                return False
        except FileNotFoundError:
            return False
        for victim in _trial_workers():
            try:
                victim.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
            killed.append(victim.pid)
            return True
        return False

    watcher = _when(killed_a_training_worker, stop, lambda: None)
    try:
        code, _, err = run_cli(_args(data_root, out, "killed", **{"train.steps": 600}))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no trial worker was seen to kill"
    assert code == 0, err[-2000:]
    assert "Traceback" not in err and "ActorDiedError" not in err, err[-3000:]
    assert "A worker died or was killed" not in err  # the raylet's paragraph
    failed = [line for line in err.splitlines() if " failed (" in line]
    assert failed and "its worker process died" in failed[0], err[-2000:]
    assert "Ray retries it" in failed[0]
    assert "trials: 2 (2 finished" in err


def test_store_turned_read_only_stops_the_search_in_one_line_then_resumes(
    ray_local, data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    store = out / "store"
    store.mkdir(parents=True)
    bound = subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bound.stderr.strip() or bound.returncode})")
    stop = threading.Event()
    made_read_only = threading.Event()

    def trials_started() -> bool:  # the first trial's record: the dense stage is stored, rounds come next
        records = store / "records"
        return records.is_dir() and any(records.rglob("*.json"))

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(store)], check=True)
        made_read_only.set()

    watcher = _when(trials_started, stop, read_only)
    try:
        code, _, err = run_cli(_args(data_root, out, "rostore", **{"train.steps": 400}))
    finally:
        stop.set()
        watcher.join()
        subprocess.run(["umount", "-l", str(store)], capture_output=True)
    assert made_read_only.is_set()
    # the renewal warning of a lease, if one was due, is one line too; the error is the last line
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    why = one_line_error(code, lines[-1], 1, "search rostore stopped: ")
    assert why is None, why
    # whichever write met the mount first (a stage, a record, a lease) names the store
    assert str(store) in lines[-1], lines[-1]
    assert "Read-only file system" in lines[-1] and "make it writable" in lines[-1]
    assert "lth-search resume rostore" in lines[-1]
    assert sum("cannot publish stage" in line for line in lines) <= 2  # no retry after retry
    state = json.loads((out / "searches" / "rostore" / "search.json").read_text())
    assert state["status"] == "failed" and "Read-only file system" in state["failure"]

    code, _, err = run_cli(["resume", "rostore", "--output-dir", str(out)])
    assert code == 0, err[-2000:]
    assert "trials: 2 (2 finished" in err
    state = json.loads((out / "searches" / "rostore" / "search.json").read_text())
    assert state["status"] == "finished" and state["failure"] is None
