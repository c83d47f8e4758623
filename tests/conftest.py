"""Shared fixtures: one MNIST-1D build per session, tiny configs, environment for Ray."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lth_search.config import DataConfig, ExperimentConfig, load_config
from lth_search.engine.data import load_dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]

LONGEST_FILES = (
    "test_ray_cluster.py", "test_search_distributed.py", "test_panel_workers.py", "test_search.py",
    "test_search_tracking.py", "test_served.py", "test_science.py", "test_faults_workers.py",
    "test_s3_resume.py", "test_reuse.py", "test_faults.py", "test_handover.py",
)
"""The test files that take longest, longest first (`--durations=0` on 2 cores, 2026-12-05:
about 154, 130, 100, 84, 71, 58, 52, 50, 48, 44, 40, 39 s of the suite's ~1,400 s). The two
pytest workers take whole files in collection order (scripts/test.sh: `--dist loadfile
--no-loadscope-reorder`), so these go first and the many short files fill in behind them;
xdist's own order (files with the most tests first) left one worker alone on the longest
file at the end for about a minute. A file missing here is only dealt later."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put LONGEST_FILES first, in their order; every other file keeps its place after them."""
    rank = {name: place for place, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


def wait_for(predicate, timeout: float = 60.0, what: str = "a condition", poll: float = 0.02):
    """Wait until `predicate()` returns something truthy, and return it.

    The one place tests wait: on a condition (a file, a record, a process state), polled
    every `poll` seconds, with a generous deadline that is never an assertion on speed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
LTH_SEARCH = str(Path(sys.executable).with_name("lth-search"))
"""The installed console script of the venv running the tests."""


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small ops: one intra-op thread is as fast alone and 5-10x faster on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quick_mlflow_retries(monkeypatch):
    """MLflow calls that fail are retried as in production (MlflowIO: 4 attempts, doubling
    backoff) but from 20 ms instead of 0.5 s: a test of what failed calls leave behind need
    not wait 3.5 s for each. Only this process's calls (not a subprocess's or a Ray worker's)."""
    from lth_search.tracking.client import ATTEMPTS, MlflowIO

    monkeypatch.setattr(MlflowIO.__init__, "__defaults__", (ATTEMPTS, 0.02, False))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the MNIST-1D cache, built once for the whole session."""
    root = tmp_path_factory.mktemp("data_root")
    load_dataset(DataConfig(root=str(root)), seed=0)
    return root


def tiny_overrides(data_root: Path, output_dir: Path, **extra: object) -> list[str]:
    """`--set` overrides of a lineage that trains in about a second on one core."""
    values: dict[str, object] = {
        "data.root": str(data_root),
        "model.widths": "[32]",
        "train.steps": 200,
        "prune.rounds": 3,
        "prune.rewind_steps": "[0, 20]",
        # One dense network and no early stop: these lineages test stages, reuse and the
        # search machinery, which a lineage that stops after two misses would cut short.
        # The verdict and stopping rule have their own tests (test_objective.py).
        "prune.dense_replicates": 1,
        "prune.patience": 99,
        "output_dir": str(output_dir),
        "tracking.enabled": "false",
        "tracking.measure_inference": "false",  # tracked_search measures it; the rest need not pay for it
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(data_root: Path, output_dir: Path, **extra: object) -> ExperimentConfig:
    """The tiny lineage config (see `tiny_overrides`), paths absolute."""
    return load_config(None, tiny_overrides(data_root, output_dir, **extra)).absolute()


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session, on loopback (ray.init takes 10-20 s here).

    Its workers import from tests/ too: plug-in models and data sets defined there
    (custom_parts.py) are importable on every node, as a user's installed module is.
    """
    import ray

    if not ray.is_initialized():
        tests = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
        # log_to_driver off, as lth-search's own Ray has it: a worker's output arrives later and
        # asynchronously, so one test's trial shutting down ("Exception ignored ... SystemExit")
        # would land in a later test's captured stderr and fail its no-traceback check.
        ray.init(
            address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
            _node_ip_address="127.0.0.1", log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracked_search(ray_local, data_root, tmp_path_factory) -> SimpleNamespace:
    """One finished tiny search, tracked in MLflow at its default place, read by several modules.

    4 lineages of 3 rounds (rate 0.2 or 0.4, rewind 0 or 20: each recipe once), 2 at a time
    on the session's Ray, no ASHA, tolerance 0.02, no confirmation; MLflow on the default
    sqlite database beside the outputs, the best ticket registered as models:/tracked@best.
    test_search.py judges its reports and reuse, test_search_tracking.py what `mlflow ui`
    shows of it, test_served.py the tickets a user takes from it. Nobody writes to it.
    """
    from search_helpers import search_config

    from lth_search.api import run_search

    tmp = tmp_path_factory.mktemp("tracked_search")
    cfg = search_config(data_root, tmp, {
        "name": "tracked", "search.space.rate": "[0.2, 0.4]", "search.asha.enabled": "false",
        "search.tolerance": 0.02, "tracking.enabled": "true", "tracking.measure_inference": "true",
        "tracking.inference_budget_s": 0.05,
    })
    lines: list[str] = []
    summary = run_search(cfg, progress=lines.append)
    return SimpleNamespace(cfg=cfg, summary=summary, lines=lines, tmp=tmp)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` for the session (sqlite backend, proxied artifacts; see mlflow_helpers).

    Each test keeps to experiments of its own. A test that kills the server starts it again
    (same port, database and artifacts) before it ends: `restarted` does that even on failure.
    """
    from mlflow_helpers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield server
    finally:
        server.stop()
