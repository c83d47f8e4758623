"""What the stage-reuse tests share: the tiny lineage, its command line, and readers of its report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from conftest import LTH_SEARCH, tiny_overrides
from fault_helpers import run_cli

from lth_search.store.stage_store import StageStore

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
T = 200
"""train.steps of the tiny config; it keeps rewind steps 0 and 20."""
BASE = {"prune__rewind_step": 20}
"""The baseline lineage: dense (200 steps) + 3 rounds of 180 steps = 740 steps."""


def lineage_command(config_file: Path, data_root: Path, output_dir: Path, **extra: object) -> list[str]:
    command = [LTH_SEARCH, "lineage", str(config_file), "--json"]
    for assignment in tiny_overrides(data_root, output_dir, **extra):
        command += ["--set", assignment]
    return command


def run_lineage(config_file: Path, data_root: Path, output_dir: Path, **extra: object) -> tuple[dict, str]:
    """(the --json report, stderr) of one `lth-search lineage` process."""
    done = subprocess.run(
        lineage_command(config_file, data_root, output_dir, **extra), check=False, capture_output=True, text=True,
        env=ENV, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def run_lineage_here(config_file: Path, data_root: Path, output_dir: Path, **extra: object) -> tuple[dict, str]:
    """(the --json report, stderr) of the same `lth-search lineage` command run in this process (cli.main)."""
    code, stdout, stderr = run_cli(lineage_command(config_file, data_root, output_dir, **extra)[1:])
    assert code == 0, stderr
    return json.loads(stdout), stderr


def parse(process: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return json.loads(stdout), stderr


def stage_steps(report: dict) -> list[int]:
    """Steps of the dense stage and of each round, in order."""
    return [report["dense"]["steps"]] + [r["steps"] for r in report["rounds"]]


def reused_flags(report: dict) -> list[int]:
    return [report["dense"]["reused"]] + [r["reused"] for r in report["rounds"]]


def keys_of(report: dict) -> list[str]:
    return [report["dense"]["key"]] + [r["key"] for r in report["rounds"]]


def outcome(report: dict, also_drop: tuple[str, ...] = ()) -> dict:
    """What a lineage found, without how it got there (`reused`, and `also_drop`)."""
    drop = ("reused",) + also_drop
    return {
        "dense": {k: v for k, v in report["dense"].items() if k not in drop},
        "rounds": [{k: v for k, v in r.items() if k not in drop} for r in report["rounds"]],
        "matching": [report["matching_sparsity"], report["matching_round"], report["matching_val_accuracy"]],
    }


RECOMPUTED = ("train_steps_per_s",)
"""The one metric a recomputed stage may not reproduce (it is a wall-clock speed)."""


def store_root(output_dir: Path) -> Path:
    return output_dir / "store"


def entry_dir(root: Path, key: str) -> Path:
    return root / "stages" / key[:2] / key


def published(root: Path) -> set[str]:
    """Keys of the entries with a manifest (what makes an entry exist)."""
    return {path.parent.name for path in (root / "stages").glob("*/*/manifest.json")}


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "stages").rglob("*")) if p.is_file()}


def masks_of(store: StageStore, keys: list[str]) -> list[dict[str, torch.Tensor]]:
    masks = []
    for key in keys:
        entry = store.get(key)
        assert entry is not None, key
        masks.append(entry.masks["mask"])
    return masks


def assert_same_masks(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b):
        assert left.keys() == right.keys()
        for name in left:
            assert left[name].dtype == torch.bool and torch.equal(left[name], right[name]), name


def flip_bytes(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4]) + data[middle + 4 :]


def truncate(data: bytes) -> bytes:
    return data[: len(data) - 7]


def clone(output_dir: Path, destination: Path) -> Path:
    shutil.copytree(output_dir, destination)
    return destination
