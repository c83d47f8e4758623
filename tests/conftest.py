"""Shared fixtures: one MNIST-1D build per session, tiny configs, environment for Ray."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from lth_search.config import DataConfig, ExperimentConfig, load_config
from lth_search.engine.data import load_dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]


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
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(data_root: Path, output_dir: Path, **extra: object) -> ExperimentConfig:
    """The tiny lineage config (see `tiny_overrides`), paths absolute."""
    return load_config(None, tiny_overrides(data_root, output_dir, **extra)).absolute()


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session, on loopback (ray.init takes 10-20 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()
