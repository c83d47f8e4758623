"""Pack steps and packed trials: single flight through a real store, records as lone trials."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import StageJob
from lth_search.runs.confirmation import pack_runs
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.trial import run_trial, run_trials
from lth_search.store.stage_store import StageStore

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _counted(job: StageJob, counts: Counter, lock: threading.Lock) -> StageJob:
    """The job, counting how often its stage is finished (trained and evaluated)."""
    finish = job.finish

    def counting(result):
        with lock:
            counts[job.key] += 1
        return finish(result)

    return StageJob(job.key, job.store, job.member, counting, job.check)


def test_overlapping_pack_steps_in_two_workers_train_every_stage_once(data_root: Path, tmp_path: Path) -> None:
    """Two workers pack dense stages {0,1,2} and {1,2,3} at once: 4 stages trained, none twice,
    and both get the same stored stage for a shared key (the leases are held while training)."""
    store = StageStore(str(tmp_path / "store"), lease_timeout_s=60, heartbeat_s=1)
    counts: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(2)
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(number: int, seeds: list[int]) -> None:
        try:
            lineage = Lineage(tiny_config(data_root, tmp_path, train__device="cpu"), store)
            jobs = [_counted(lineage.dense_job(seed), counts, lock) for seed in seeds]
            start.wait()
            got[number] = lineage.fetch_or_train(jobs)
        except BaseException as error:  # surfaced below: a thread's assertion would be lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(0, [0, 1, 2])), threading.Thread(target=worker, args=(1, [1, 2, 3]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(counts) == 4 and set(counts.values()) == {1}, counts
    shared = {entry.key: entry for entry, _ in got[0]}
    for entry, _ in got[1][:2]:  # seeds 1 and 2: the one stage both asked for
        assert entry.metrics["val_accuracy"] == shared[entry.key].metrics["val_accuracy"]
    trained = [not reused for _, reused in got[0] + got[1]]
    assert sum(trained) == 4  # each stage is `reused` for the worker that did not train it


def test_a_pack_step_fetches_stored_stages_and_shares_repeated_keys(data_root: Path, tmp_path: Path) -> None:
    store = StageStore(str(tmp_path / "store"))
    lineage = Lineage(tiny_config(data_root, tmp_path, train__device="cpu"), store)
    stored, _ = lineage.dense_stage(1)
    counts: Counter = Counter()
    lock = threading.Lock()
    jobs = [_counted(lineage.dense_job(seed), counts, lock) for seed in (0, 1, 0)]
    (first, first_reused), (one, one_reused), (again, again_reused) = lineage.fetch_or_train(jobs)
    assert (first_reused, one_reused, again_reused) == (False, True, True)
    assert one.key == stored.key and again.key == first.key
    assert counts == Counter({first.key: 1})


def test_confirmation_runs_are_dealt_into_packs_that_fill_every_worker() -> None:
    runs = [(recipe, seed) for recipe in range(4) for seed in (7, 8, 9)]
    for slots, size, count in [(2, 8, 2), (2, 1, 12), (4, 2, 6), (1, 8, 2), (16, 8, 12)]:
        packs = pack_runs(runs, slots, size)
        assert len(packs) == count, (slots, size)
        assert max(len(p) for p in packs) <= size
        assert sorted(run for pack in packs for run in pack) == sorted(runs)
    assert pack_runs([], 2, 8) == []
    two = pack_runs(runs, 2, 8)
    assert {recipe for recipe, _ in two[0]} == {recipe for recipe, _ in two[1]} == {0, 1, 2, 3}


def test_a_packed_trial_records_and_reports_like_lone_trials(data_root: Path, tmp_path: Path) -> None:
    """run_trials finishes every member's record and reports every round; a lone trial of
    the same config afterwards trains nothing (same stage keys)."""
    store = StageStore(str(tmp_path / "store"))
    cfgs = [tiny_config(data_root, tmp_path, seed=seed, train__device="cpu", prune__dense_replicates=2)
            for seed in (3, 4)]
    records = [TrialRecord.open(store, "packed", f"t{i}", "s1", None, {}, cfg.model_dump(mode="json"), role="confirm")
               for i, cfg in enumerate(cfgs)]
    reports: list[tuple[int, int]] = []
    results = run_trials(cfgs, store, [lambda r, key, metrics, i=i: reports.append((i, r)) for i in range(len(cfgs))],
                         records)
    for i, (cfg, result) in enumerate(zip(cfgs, results)):
        loaded = TrialRecord.load(store, "packed", f"t{i}", role="confirm")
        assert loaded.status == TrialStatus.FINISHED
        assert [r.key for r in loaded.rounds] == [r.key for r in result.rounds]
        assert sorted(r for member, r in reports if member == i) == list(range(1, cfg.prune.rounds + 1))
        assert result.dense.replicates == 2 and result.steps_executed > 0
        alone = run_trial(cfg, store, lambda *_: None)
        assert alone.steps_executed == 0 and [r.key for r in alone.rounds] == [r.key for r in result.rounds]
