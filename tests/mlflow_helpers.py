"""Test helpers for MLflow: a real `mlflow server` on loopback, REST checks, tiny tracked lineages.

The server is a subprocess in its own session, started with a sqlite backend and
proxied artifacts (`--artifacts-destination`), and stopped (or killed, to simulate a
crash) by its pid. `search_layout` checks a search through MLflow's REST API alone,
as a user's browser sees it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from conftest import wait_for

from lth_search.config import ExperimentConfig
from lth_search.engine.lineage.results import LineageResult
from lth_search.runs.record import TrialRecord
from lth_search.runs.state import new_state
from lth_search.runs.trial import run_trial
from lth_search.store.stage_store import StageStore
from lth_search.tracking.trial_run import TrialTracker

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.db = root / "server.db"
        self.artifacts = root / "artifacts"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
                str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def start(self, deadline_s: float = 240.0) -> "MlflowServer":
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # No GenAI job runner (seven huey consumers): runs and artifacts are all we need.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        self._wait_healthy(deadline_s)
        return self

    def _wait_healthy(self, deadline_s: float) -> None:
        """Wait for /health (a generous start-up deadline, not a timing assertion)."""

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        try:
            wait_for(healthy, deadline_s, "mlflow server /health", poll=0.5)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"mlflow server did not answer /health within {deadline_s} s:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the server and its workers: the session we started
        except ProcessLookupError:
            return

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @contextmanager
    def restarted(self) -> Iterator["MlflowServer"]:
        """The block may kill the server; it is running again (same port and backend) after it."""
        try:
            yield self
        finally:
            if not self.running:
                self.start()

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash; wait until it is gone."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.process is None:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class MlflowUi(MlflowServer):
    """A command line `lth-search` printed (`mlflow ui --backend-store-uri URI --port 5000`), run
    as printed but on a free loopback port: what a user runs to look at a search."""

    def __init__(self, root: Path, printed: str) -> None:
        super().__init__(root)
        words = printed.split()
        assert words[:2] == ["mlflow", "ui"] and "--port" in words, printed
        at = words.index("--port")
        self.words = [MLFLOW, *words[1:at], "--port", str(self.port), *words[at + 2:], "--host", "127.0.0.1"]

    def command(self) -> list[str]:
        return self.words


# REST ------------------------------------------------------------------------------------------
def rest(url: str, endpoint: str, payload: dict | None = None, query: dict | None = None) -> dict:
    """One MLflow REST call (GET with a query, or POST with a JSON body)."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def run_tags(run: dict) -> dict[str, str]:
    return {item["key"]: item["value"] for item in run["data"].get("tags", [])}


def search_layout(url: str, experiment: str, children: int) -> tuple[dict, list[dict]]:
    """Assert through the REST API that `experiment` holds one parent run with `children` child runs.

    Returns (parent, children) as the REST API gives them.
    """
    found = rest(url, "experiments/get-by-name", query={"experiment_name": experiment})["experiment"]
    runs = rest(url, "runs/search", {"experiment_ids": [found["experiment_id"]], "max_results": 1000}).get("runs", [])
    parents = [run for run in runs if "mlflow.parentRunId" not in run_tags(run)]
    assert len(parents) == 1, f"expected one parent run, found {len(parents)}"
    parent = parents[0]
    kids = [run for run in runs if run_tags(run).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert len(kids) == children == len(runs) - 1, f"expected {children} child runs, found {len(kids)} of {len(runs) - 1}"
    return parent, kids


# Tracked trials ---------------------------------------------------------------------------------
def tracked_trial(
    cfg: ExperimentConfig, parent_run_id: str | None, trial_id: str, choices: dict[str, Any], store: StageStore,
    dataset: Any, search_id: str | None = None, after_round: Callable[[int], None] | None = None,
) -> tuple[TrialTracker, TrialRecord, LineageResult]:
    """One search trial as the Ray trainable runs it (runs/trial.py with the MLflow observer), minus Ray."""
    trial_cfg = cfg.with_choices(choices)
    tracker = TrialTracker.start(trial_cfg, parent_run_id, trial_id, choices)
    record = TrialRecord.open(store, cfg.name, trial_id, search_id, None, choices, trial_cfg.model_dump(mode="json"))

    def report(round_index: int, _: str, __: dict[str, Any]) -> None:
        if after_round is not None:
            after_round(round_index)

    result = run_trial(trial_cfg, store, report, record, tracker, dataset=dataset)
    return tracker, record, result


def save_search_state(cfg: ExperimentConfig, search_id: str, parent_run_id: str | None, status: str = "finished") -> None:
    """The search.json the driver saves, for a search run here without Ray."""
    state = new_state(cfg)
    state.search_id, state.results_path = search_id, f"{cfg.output_path()}/ray/{search_id}"
    state.parent_run_id, state.status = parent_run_id, status
    state.save()
