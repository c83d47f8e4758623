"""Stages are reused across runs and processes of `lth-search lineage` (real subprocesses).

The installed `lth-search lineage ... --json` runs in real subprocesses against a real
local store (and the same folder through fsspec's `local://`, the non-local code path);
a changed search choice, and the rerun after a SIGKILL, run the same command in this process
(cli.main) against a store another process wrote.
Nothing the product uses is replaced: damage is done to the stored bytes, kills are real
SIGKILLs, races are real races. The in-process checks on a memory filesystem are in
test_reuse_in_process.py; the mask-size figure is tests/test_codec.py
`test_size_of_a_million_weight_mask`.

Every subprocess runs with one intra-op thread (OMP_NUM_THREADS=1): two lineage
processes then fit two cores, and a recomputed stage reproduces its earlier numbers
bit for bit (CPU float reductions depend on the thread count, not on the load).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import tiny_config, wait_for
from reuse_helpers import (
    BASE, ENV, RECOMPUTED, T, assert_same_masks, clone, entry_dir, file_digests, flip_bytes, keys_of, lineage_command,
    masks_of, outcome, parse, published, reused_flags, run_lineage, run_lineage_here, stage_steps, store_root,
    truncate,
)

from lth_search.engine.lineage.walk import Lineage
from lth_search.store.leases import FileLeaseService, check_key
from lth_search.store.stage_store import StageStore

@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "reuse.yaml"
    path.write_text("name: reuse\n")
    return path


@pytest.fixture(scope="module")
def baseline(config_file: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One finished tiny lineage (rewind to step 20) and its output folder (never modified)."""
    output_dir = tmp_path_factory.mktemp("baseline") / "out"
    report, _ = run_lineage(config_file, data_root, output_dir, **BASE)
    return report, output_dir


# The same command twice -----------------------------------------------------------------
def test_baseline_lineage_writes_only_its_stages_under_the_store_root(baseline) -> None:
    report, output_dir = baseline
    assert reused_flags(report) == [0, 0, 0, 0]
    assert stage_steps(report) == [T, T - 20, T - 20, T - 20]
    assert report["steps_executed"] == T + 3 * (T - 20) and report["steps_reused"] == 0
    keys = keys_of(report)
    for key in keys:
        check_key(key)  # content hashes, never names taken from input
    root = store_root(output_dir)
    assert published(root) == set(keys)
    for path in output_dir.rglob("*"):
        relative = path.relative_to(root)  # raises if anything was written outside the store root
        if path == root:
            continue
        assert relative.parts[0] in ("stages", "leases", "tmp"), path
        if relative.parts[0] == "stages" and len(relative.parts) >= 3:
            assert relative.parts[1] == relative.parts[2][:2] and relative.parts[2] in keys, path
    assert not list((root / "leases").iterdir())  # every lease released
    assert not list((root / "tmp").iterdir())  # every staging folder moved into place


def test_second_run_executes_nothing_and_finds_identical_results(
    baseline, config_file: Path, data_root: Path, tmp_path: Path
) -> None:
    first, base_dir = baseline
    output_dir = clone(base_dir, tmp_path / "out")
    root = store_root(output_dir)
    before = file_digests(root)
    masks_before = masks_of(StageStore(str(root)), keys_of(first)[1:])

    second, stderr = run_lineage(config_file, data_root, output_dir, **BASE)

    assert second["steps_executed"] == 0
    assert second["steps_reused"] == first["steps_executed"] == T + 3 * (T - 20)
    assert reused_flags(second) == [1, 1, 1, 1]
    assert outcome(second) == outcome(first)  # every metric of every round, bit for bit
    assert stderr.count("(reused)") == 4
    assert file_digests(root) == before  # nothing rewritten
    masks_after = masks_of(StageStore(str(root)), keys_of(second)[1:])
    assert_same_masks(masks_after, masks_before)
    for mask, round_report in zip(masks_after, second["rounds"]):
        kept = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        assert 1 - kept / total == pytest.approx(round_report["sparsity"])


# Two processes at once ------------------------------------------------------------------
STORES = {
    "local": lambda root: {},
    # the same folder through fsspec, wrapped as pyarrow.fs.PyFileSystem: the non-local code
    # path (data first, manifest moved in last; lease objects), shared by real processes
    "fsspec": lambda root: {"store__uri": f"local://{root}"},
}
def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_idle(processes: list[subprocess.Popen], quiet_s: float = 1.0, timeout_s: float = 300) -> None:
    """Until every process has used (almost) no CPU for `quiet_s`: started up and now waiting.

    Only decides when the test lets the race begin; no assertion depends on its timing.
    """
    seen = {"ticks": {p.pid: cpu_ticks(p.pid) for p in processes}, "since": time.monotonic()}

    def idle() -> bool:
        for process in processes:
            assert process.poll() is None, process.communicate()[1]
        now = {p.pid: cpu_ticks(p.pid) for p in processes}
        if any(now[pid] - seen["ticks"][pid] > 2 for pid in now):
            seen.update(ticks=now, since=time.monotonic())
        return time.monotonic() - seen["since"] >= quiet_s

    wait_for(idle, timeout_s, "both processes to wait for the gated stage", poll=0.1)


@pytest.mark.parametrize("store", sorted(STORES))
def test_two_processes_started_together_compute_each_stage_once(
    config_file: Path, data_root: Path, tmp_path: Path, store: str
) -> None:
    output_dir = tmp_path / "out"
    settings = {**BASE, **STORES[store](store_root(output_dir))}
    dense_key = Lineage(tiny_config(data_root, output_dir, **settings)).stage_keys()[0]
    # Hold the missing dense stage's lease like a third worker would, so both processes are
    # certainly waiting for it when it is released and the race for it starts.
    leases = FileLeaseService(store_root(output_dir))
    assert leases.acquire(dense_key, "test-gate", 600)
    processes = [
        subprocess.Popen(lineage_command(config_file, data_root, output_dir, **settings), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    try:
        wait_until_idle(processes)
        assert not published(store_root(output_dir))
    finally:
        leases.release(dense_key, "test-gate")
    (a, _), (b, _) = parse(processes[0]), parse(processes[1])

    one_lineage = T + 3 * (T - 20)
    assert a["steps_executed"] + b["steps_executed"] == one_lineage
    assert a["steps_executed"] + a["steps_reused"] == b["steps_executed"] + b["steps_reused"] == one_lineage
    for flag_a, flag_b in zip(reused_flags(a), reused_flags(b)):
        assert {flag_a, flag_b} == {0, 1}  # each stage computed by exactly one of them
    assert a["dense"]["key"] == dense_key
    assert outcome(a) == outcome(b)
    assert published(store_root(output_dir)) == set(keys_of(a))


# Search choices reuse the dense stage ---------------------------------------------------
@pytest.mark.parametrize("change", [{"prune__rate": 0.4}, {"prune__rewind_step": 0}], ids=["rate", "rewind_step"])
def test_changing_a_search_choice_reuses_the_dense_stage(
    baseline, config_file: Path, data_root: Path, tmp_path: Path, change: dict, one_torch_thread
) -> None:
    """The second command runs in this process (cli.main): another process already wrote the store."""
    first, base_dir = baseline
    output_dir = clone(base_dir, tmp_path / "out")
    report, stderr = run_lineage_here(config_file, data_root, output_dir, **{**BASE, **change})

    rewind = change.get("prune__rewind_step", 20)
    assert report["dense"]["reused"] == 1 and report["dense"]["key"] == first["dense"]["key"]
    assert report["dense"]["val_accuracy"] == first["dense"]["val_accuracy"]
    assert report["steps_reused"] == T  # the dense stage's steps, and nothing else
    assert [r["reused"] for r in report["rounds"]] == [0, 0, 0]
    assert report["steps_executed"] == 3 * (T - rewind)
    assert not set(keys_of(report)[1:]) & set(keys_of(first))  # the rounds are new stages
    dense_line = [line for line in stderr.splitlines() if line.startswith("dense ")]
    assert len(dense_line) == 1 and dense_line[0].endswith("(reused)")  # the progress line says so
    if "prune__rate" in change:
        assert report["rounds"][0]["sparsity"] == pytest.approx(0.4, abs=0.005)


# Corrupt entries are detected and recomputed ---------------------------------------------
# Two stages damaged per run, never neighbours in the chain's order of work, so each run
# shows both a damaged stage recomputed and the undamaged ones around it reused.
@pytest.mark.parametrize(
    "damages",
    [
        [(0, "weights_rewind_20.safetensors", truncate), (2, "mask_mask.parquet", truncate)],
        [(1, "weights_end.safetensors", flip_bytes), (3, "mask_mask.parquet", flip_bytes)],
    ],
    ids=["dense-weights-truncated+round2-mask-truncated", "round1-weights-flipped+round3-mask-flipped"],
)
def test_a_corrupt_stage_is_reported_recomputed_and_replaced(
    baseline, config_file: Path, data_root: Path, tmp_path: Path, damages: list[tuple[int, str, Callable]]
) -> None:
    first, base_dir = baseline
    output_dir = clone(base_dir, tmp_path / "out")
    root = store_root(output_dir)
    good = {}
    for stage, filename, damage in damages:
        path = entry_dir(root, keys_of(first)[stage]) / filename
        good[path] = path.read_bytes()
        path.write_bytes(damage(good[path]))

    report, stderr = run_lineage(config_file, data_root, output_dir, **BASE)

    expected_flags = [1, 1, 1, 1]
    for stage, filename, _ in damages:
        key = keys_of(first)[stage]
        warning = [line for line in stderr.splitlines() if key in line]
        assert warning and "corrupt" in warning[0] and filename in warning[0], stderr
        expected_flags[stage] = 0
    assert reused_flags(report) == expected_flags
    recomputed = sum(stage_steps(first)[stage] for stage, _, _ in damages)
    assert report["steps_executed"] == recomputed
    assert report["steps_reused"] == sum(stage_steps(first)) - recomputed
    assert outcome(report, RECOMPUTED) == outcome(first, RECOMPUTED)  # finishes correctly
    for path, data in good.items():
        assert path.read_bytes() == data  # recomputed bit for bit and republished
    store = StageStore(str(root))
    assert_same_masks(masks_of(store, keys_of(report)[1:]), masks_of(StageStore(str(store_root(base_dir))),
                                                                     keys_of(first)[1:]))
    assert published(root) == set(keys_of(first))


# SIGKILL mid-round, then rerun ---------------------------------------------------------
@pytest.mark.parametrize("store", sorted(STORES))
def test_a_lineage_killed_mid_round_resumes_after_its_last_stored_stage(
    config_file: Path, data_root: Path, tmp_path: Path, store: str, one_torch_thread
) -> None:
    # 1000 steps per stage, so that a round lasts long enough (over a second) to be killed in;
    # a short lease so that the rerun takes over the dead process's lease quickly.
    steps = 1000
    output_dir = tmp_path / "out"
    root = store_root(output_dir)
    settings = {"train__steps": steps, "prune__rounds": 2, "store__lease_timeout_s": 3, "store__heartbeat_s": 0.5,
                **STORES[store](root)}
    keys = Lineage(tiny_config(data_root, output_dir, **settings)).stage_keys()
    process = subprocess.Popen(lineage_command(config_file, data_root, output_dir, **settings),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lease = root / "leases" / f"{keys[2]}.lease"
    def round_2_begun() -> bool:  # dense and round 1 stored, round 2's lease taken
        assert process.poll() is None, process.communicate()[1]
        return published(root) >= set(keys[:2]) and lease.exists()

    wait_for(round_2_begun, 300, "round 2 to begin")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    stored = published(root)
    assert stored == set(keys[:2]), "round 2 finished before the kill; nothing was tested"
    assert lease.exists()  # the dead process's lease is left behind
    report, _ = run_lineage_here(config_file, data_root, output_dir, **settings)  # the rerun: this process

    assert keys_of(report) == keys
    assert reused_flags(report) == [int(k in stored) for k in keys] == [1, 1, 0]
    assert report["steps_executed"] == sum(s for s, k in zip(stage_steps(report), keys) if k not in stored) == steps
    assert report["steps_reused"] == steps + steps
    assert published(root) == set(keys)
    assert not lease.exists()
