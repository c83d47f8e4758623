"""Stage reuse on a non-local pyarrow filesystem, in this process: an fsspec memory filesystem
wrapped as a pyarrow filesystem (memory is per process, so concurrency here is two threads)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import fsspec
import pyarrow.fs as pafs
import pytest
from conftest import tiny_config
from reuse_helpers import (
    BASE, RECOMPUTED, T, assert_same_masks, flip_bytes, keys_of, masks_of, outcome, reused_flags, stage_steps, truncate,
)

from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.results import LineageResult
from lth_search.store.stage_store import ObjectStageStore, StageStore


@pytest.fixture
def memory_store(one_torch_thread) -> StageStore:
    """Like the subprocesses, one intra-op thread (two threads below share two cores)."""
    memory = fsspec.filesystem("memory")
    root = f"/lth-reuse-{uuid.uuid4().hex}"  # the memory filesystem is process-wide
    store = StageStore(root, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(memory)))
    assert isinstance(store, ObjectStageStore)
    yield store
    memory.rm(root, recursive=True)


def as_report(result: LineageResult) -> dict:
    return json.loads(json.dumps(result.to_json()))


def memory_files(store: StageStore, key: str) -> set[str]:
    infos = store.filesystem.get_file_info(pafs.FileSelector(f"{store.root}/stages/{key[:2]}/{key}",
                                                             allow_not_found=True))
    return {Path(info.path).name for info in infos}


def test_memory_filesystem_second_run_executes_nothing(memory_store: StageStore, data_root: Path,
                                                       tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path, **BASE)
    first_lineage = Lineage(cfg, memory_store)
    first = as_report(first_lineage.run())
    assert first["steps_executed"] == T + 3 * (T - 20)
    for key in keys_of(first):
        assert "manifest.json" in memory_files(memory_store, key)
    assert not (tmp_path / "store").exists()  # nothing went to the local disk

    second = as_report(Lineage(cfg, memory_store).run())
    assert second["steps_executed"] == 0 and second["steps_reused"] == first["steps_executed"]
    assert reused_flags(second) == [1, 1, 1, 1]
    assert outcome(second) == outcome(first)
    assert_same_masks(masks_of(memory_store, keys_of(second)[1:]),
                      [entry.masks["mask"] for entry in first_lineage.entries[1:]])

    changed = as_report(Lineage(tiny_config(data_root, tmp_path, prune__rate=0.4, **BASE), memory_store).run())
    assert changed["dense"]["reused"] == 1 and changed["steps_reused"] == T
    assert changed["steps_executed"] == 3 * (T - 20)


def test_memory_filesystem_two_threads_compute_each_stage_once(memory_store: StageStore, data_root: Path,
                                                               tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path, **BASE)
    lineages = [Lineage(cfg, memory_store) for _ in range(2)]
    barrier = threading.Barrier(2)
    reports: dict[int, Any] = {}

    def work(index: int) -> None:
        barrier.wait()
        try:
            reports[index] = as_report(lineages[index].run())
        except Exception as error:  # noqa: BLE001 - reported below, not lost in the thread
            reports[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    a, b = reports[0], reports[1]
    assert isinstance(a, dict) and isinstance(b, dict), (a, b)
    assert a["steps_executed"] + b["steps_executed"] == T + 3 * (T - 20)
    for flag_a, flag_b in zip(reused_flags(a), reused_flags(b)):
        assert {flag_a, flag_b} == {0, 1}
    assert outcome(a) == outcome(b)
    assert_same_masks([e.masks["mask"] for e in lineages[0].entries[1:]],
                      [e.masks["mask"] for e in lineages[1].entries[1:]])


@pytest.mark.parametrize(
    "stage, filename, damage",
    [(0, "weights_end.safetensors", flip_bytes), (2, "mask_mask.parquet", truncate)],
    ids=["dense-weights-flipped", "round2-mask-truncated"],
)
def test_memory_filesystem_corrupt_stage_is_recomputed(
    memory_store: StageStore, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    stage: int, filename: str, damage: Callable,
) -> None:
    cfg = tiny_config(data_root, tmp_path, **BASE)
    first = as_report(Lineage(cfg, memory_store).run())
    key = keys_of(first)[stage]
    path = f"{memory_store.root}/stages/{key[:2]}/{key}/{filename}"
    with memory_store.filesystem.open_input_stream(path) as stream:
        good = stream.read()
    with memory_store.filesystem.open_output_stream(path) as stream:
        stream.write(damage(good))

    with caplog.at_level(logging.WARNING, logger="lth_search.store.stage_store"):
        again = as_report(Lineage(cfg, memory_store).run())

    warnings = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert warnings and "corrupt" in warnings[0] and filename in warnings[0]
    assert again["steps_executed"] == stage_steps(first)[stage]
    assert reused_flags(again) == [int(i != stage) for i in range(4)]
    assert outcome(again, RECOMPUTED) == outcome(first, RECOMPUTED)
    with memory_store.filesystem.open_input_stream(path) as stream:
        assert stream.read() == good  # republished, bit for bit
    assert memory_store.get(key) is not None
