"""Single flight: a missing stage is computed once, by threads, by processes, after a dead holder.

Real threads, real OS processes and real lease files (no mocks).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest
from conftest import wait_for
from store_helpers import KINDS, assert_same, key_of, make_entry, make_store

from lth_search.errors import StoreError
from lth_search.store.leases import FileLeaseService, FilesystemLeaseService, new_holder
from lth_search.store.entry import StageEntry
from lth_search.store.stage_store import StageStore


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StageStore:
    return make_store(request.param, tmp_path)


# Single flight within a process ------------------------------------------------------------
def test_get_or_compute_computes_once_then_reuses(store: StageStore) -> None:
    key = key_of("once")
    calls = []

    def compute() -> StageEntry:
        calls.append(1)
        return make_entry(key)

    first, reused_first = store.get_or_compute(key, compute)
    second, reused_second = store.get_or_compute(key, compute)
    assert (reused_first, reused_second) == (False, True) and len(calls) == 1
    assert_same(first, second)


def test_compute_errors_release_the_lease(store: StageStore) -> None:
    key = key_of("fails")

    def broken() -> StageEntry:
        raise RuntimeError("training diverged")

    store.lease_timeout_s = 60.0  # a leaked lease would block the next call for a minute
    with pytest.raises(RuntimeError, match="diverged"):
        store.get_or_compute(key, broken)
    assert store.leases.acquire(key, "someone else", 1.0)  # released: anyone may take it at once
    store.leases.release(key, "someone else")
    _, reused = store.get_or_compute(key, lambda: make_entry(key))
    assert not reused


def test_compute_returning_another_key_is_an_error(store: StageStore) -> None:
    with pytest.raises(ValueError, match="another key"):
        store.get_or_compute(key_of("x"), lambda: make_entry(key_of("y")))
    assert not store.contains(key_of("y"))


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_threads_compute_once(kind: str, tmp_path: Path) -> None:
    # A lease shorter than the computation: only the heartbeat keeps waiters from taking over.
    # It renews 20 times per time-out, so a loaded machine cannot starve it into a takeover.
    store = make_store(kind, tmp_path, lease_timeout_s=2.0, heartbeat_s=0.1)
    key = key_of("threads")
    calls = []
    barrier = threading.Barrier(3)
    results: list[tuple[StageEntry, bool]] = []

    def compute() -> StageEntry:
        calls.append(threading.get_ident())
        time.sleep(3.0)  # the work: longer than the lease time-out
        return make_entry(key, seed=len(calls))

    def worker() -> None:
        barrier.wait()
        results.append(store.get_or_compute(key, compute))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1 and len(results) == 3
    assert sorted(reused for _, reused in results) == [False, True, True]
    for entry, _ in results[1:]:
        assert_same(entry, results[0][0])


# Single flight across OS processes ---------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from lth_search.store.entry import StageEntry
    from lth_search.store.stage_store import StageStore

    root, key, counter, out, sleep_s, timeout_s, go = sys.argv[1:]
    store = StageStore(root, lease_timeout_s=float(timeout_s), heartbeat_s=float(timeout_s) / 4)
    open(out + ".ready", "w").close()
    while go != "-" and not os.path.exists(go):
        time.sleep(0.01)

    def compute():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(float(sleep_s))
        return StageEntry(key, "dense", {"x": 1}, {"pid": os.getpid()},
                          weights={"end": {"w": torch.randn(50)}}, masks={"m": {"w": torch.rand(50) > 0.5}})

    started = time.monotonic()
    entry, reused = store.get_or_compute(key, compute)
    with open(out, "w") as f:
        json.dump({"reused": reused, "created_at": entry.created_at, "metrics": entry.metrics,
                   "w": entry.weights["end"]["w"].tolist(), "m": entry.masks["m"]["w"].tolist(),
                   "seconds": time.monotonic() - started}, f)
    """
)


def start_worker(tmp_path: Path, name: str, root: Path, key: str, sleep_s: float, timeout_s: float, go: str = "-"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{name}.json"
    args = [sys.executable, str(script), str(root), key, str(tmp_path / "counter"), str(out), str(sleep_s), str(timeout_s), go]
    return subprocess.Popen(args), out


def test_two_processes_compute_once(tmp_path: Path) -> None:
    key = key_of("processes")
    go = tmp_path / "go"
    workers = [start_worker(tmp_path, f"w{i}", tmp_path / "store", key, 1.0, 30.0, str(go)) for i in range(2)]
    wait_for(lambda: all(Path(f"{out}.ready").exists() for _, out in workers))
    go.touch()  # both processes ask for the missing stage at the same moment
    for process, _ in workers:
        assert process.wait(timeout=60) == 0
    assert len((tmp_path / "counter").read_text().splitlines()) == 1
    results = [json.loads(out.read_text()) for _, out in workers]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert {k: v for k, v in results[0].items() if k not in ("reused", "seconds")} == {
        k: v for k, v in results[1].items() if k not in ("reused", "seconds")
    }


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = key_of("killed")
    root = tmp_path / "store"
    holder, _ = start_worker(tmp_path, "holder", root, key, 60.0, 2.0)
    counter = tmp_path / "counter"
    wait_for(lambda: counter.exists() and counter.read_text().strip() != "")
    lease = root / "leases" / f"{key}.lease"
    assert lease.exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert lease.exists()  # the dead holder's lease is still there

    store = StageStore(str(root), lease_timeout_s=60.0, heartbeat_s=0.5)
    with caplog.at_level(logging.WARNING):
        entry, reused = store.get_or_compute(key, lambda: StageEntry(key, "dense", {"x": 1}, {"by": "taker"}))
    assert not reused and entry.metrics == {"by": "taker"}  # without waiting out the 60 s time-out
    assert f"pid {holder.pid} on this host) is dead; taking it over" in caplog.text
    assert store.get(key).metrics == {"by": "taker"}
    assert not lease.exists()
    assert len(counter.read_text().splitlines()) == 1  # the killed holder never published


def test_holder_on_another_host_is_taken_over_after_the_lease_times_out(tmp_path: Path) -> None:
    key = key_of("elsewhere")
    store = StageStore(str(tmp_path / "store"), lease_timeout_s=1.0, heartbeat_s=0.2)
    assert store.leases.acquire(key, "some-other-host:1:abc", 1.0)  # pid 1 elsewhere: judged by its time-out
    started = time.monotonic()
    entry, reused = store.get_or_compute(key, lambda: StageEntry(key, "dense", {"x": 1}, {"by": "taker"}))
    assert not reused and time.monotonic() - started > 0.5


# Lease services ---------------------------------------------------------------------------
def lease_services(tmp_path: Path) -> list:
    memory = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    return [FileLeaseService(tmp_path), FilesystemLeaseService(memory, f"/lth-leases-{uuid.uuid4().hex}", settle_s=0.05)]


def test_lease_semantics(tmp_path: Path) -> None:
    for service in lease_services(tmp_path):
        key = key_of(type(service).__name__)
        assert service.acquire(key, "a", 30)
        assert service.acquire(key, "a", 30)  # already held by the same holder
        assert not service.acquire(key, "b", 30)
        assert service.renew(key, "a", 30) and not service.renew(key, "b", 30)
        service.release(key, "b")  # not the holder: no effect
        assert not service.acquire(key, "b", 30)
        service.release(key, "a")
        assert service.acquire(key, "b", 30)
        assert not service.renew(key, "a", 30)
        with pytest.raises(StoreError):
            service.acquire("../" + key[3:], "a", 30)


def test_a_lease_being_taken_by_a_thread_here_is_never_judged_dead_by_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moment a lease exists but its acquire has not returned, another thread of this
    process reads a holder with this pid. It must see a live holder, not a dead one to take
    over (CI trained a stage twice that way, two threads packing overlapping stages)."""
    file_service, object_service = lease_services(tmp_path)
    peers: list[bool] = []

    def with_peer(service, write_name: str) -> None:
        write = getattr(service, write_name)

        def write_then_peer(path, holder, ttl_s):
            done = write(path, holder, ttl_s)
            if not peers:  # once: the peer's own write must not call a peer again
                peers.append(None)
                peers[0] = service.acquire(key_of(type(service).__name__ + "race"), new_holder(), 30)
            return done

        monkeypatch.setattr(service, write_name, write_then_peer)

    with_peer(file_service, "_create")
    with_peer(object_service, "_write")
    for service in (file_service, object_service):
        holder = new_holder()
        peers.clear()
        assert service.acquire(key_of(type(service).__name__ + "race"), holder, 30)
        assert peers and not any(peers), (type(service).__name__, peers)
        service.release(key_of(type(service).__name__ + "race"), holder)


def test_an_expired_lease_has_exactly_one_taker(tmp_path: Path) -> None:
    service = FileLeaseService(tmp_path)
    for attempt in range(20):
        key = key_of(f"expired{attempt}")
        assert service.acquire(key, "dead", -1.0)  # a lease that expired a second ago
        barrier = threading.Barrier(4)
        won: list[str] = []

        def take(holder: str) -> None:
            barrier.wait()
            if service.acquire(key, holder, 30):
                won.append(holder)

        threads = [threading.Thread(target=take, args=(f"taker{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(won) == 1, won
        assert not service.renew(key, "dead", 30)


