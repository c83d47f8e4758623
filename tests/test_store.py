"""The stage store on real filesystems, with real processes for single flight (no mocks)."""

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
from typing import Callable

import fsspec
import pyarrow.fs as pafs
import pytest
from conftest import wait_for
import torch

from lth_search.store.codec import encode_manifest
from lth_search.config import load_config
from lth_search.store.keys import content_key
from lth_search.errors import StoreError
from lth_search.store.leases import FileLeaseService, FilesystemLeaseService
from lth_search.store.stages import StageEntry, StageStore

KINDS = ["local", "file_uri", "memory"]


def make_store(kind: str, tmp_path: Path, **kwargs) -> StageStore:
    if kind == "local":
        return StageStore(str(tmp_path / "store"), **kwargs)
    if kind == "file_uri":
        return StageStore(f"file://{tmp_path}/store", **kwargs)
    memory = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    return StageStore(f"/lth-test-{uuid.uuid4().hex}", filesystem=memory, **kwargs)  # the memory fs is process-wide


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StageStore:
    return make_store(request.param, tmp_path)


def key_of(name: str) -> str:
    return content_key({"stage": name})


def make_entry(key: str, seed: int = 0, kind: str = "round") -> StageEntry:
    generator = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.randn(20, 9, generator=generator), "fc.bias": torch.randn(20, generator=generator).half()}
    return StageEntry(
        key=key,
        kind=kind,
        inputs={"parent": "0" * 64, "rate": 0.2, "seed": seed},
        metrics={"val_accuracy": 0.61 + seed / 100, "sparsity": 0.2, "loss": float("nan")},
        weights={"init": state, "end": {k: v * 2 for k, v in state.items()}},
        masks={"mask": {"fc.weight": torch.rand(20, 9, generator=generator) > 0.2}},
    )


def assert_same(a: StageEntry, b: StageEntry) -> None:
    assert (a.key, a.kind, a.inputs) == (b.key, b.kind, b.inputs)
    assert json.dumps(a.metrics) == json.dumps(b.metrics)  # NaN-safe comparison
    assert a.weights.keys() == b.weights.keys() and a.masks.keys() == b.masks.keys()
    for name in a.weights:
        assert a.weights[name].keys() == b.weights[name].keys()
        for tensor in a.weights[name]:
            assert torch.equal(a.weights[name][tensor], b.weights[name][tensor])
            assert a.weights[name][tensor].dtype == b.weights[name][tensor].dtype
    for name in a.masks:
        for layer in a.masks[name]:
            assert torch.equal(a.masks[name][layer], b.masks[name][layer])


def entry_file(store: StageStore, key: str, filename: str) -> str:
    """The documented layout: stages/<key[:2]>/<key>/<file>."""
    return f"{store.root}/stages/{key[:2]}/{key}/{filename}"


def read_file(store: StageStore, path: str) -> bytes:
    with store.filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_file(store: StageStore, path: str, data: bytes) -> None:
    with store.filesystem.open_output_stream(path) as stream:
        stream.write(data)


# Round trips ------------------------------------------------------------------------------
def test_put_get_round_trip(store: StageStore) -> None:
    key = key_of("a")
    assert store.get(key) is None and not store.contains(key)
    entry = make_entry(key)
    store.put(entry)
    assert store.contains(key)
    loaded = store.get(key)
    assert loaded is not None
    assert_same(loaded, entry)
    assert loaded.created_at == entry.created_at != "" and loaded.code_version == entry.code_version != ""
    files = store.filesystem.get_file_info(pafs.FileSelector(f"{store.root}/stages/{key[:2]}/{key}"))
    assert sorted(Path(f.path).name for f in files) == [
        "manifest.json", "mask_mask.parquet", "weights_end.safetensors", "weights_init.safetensors"
    ]
    manifest = json.loads(read_file(store, entry_file(store, key, "manifest.json")))
    assert manifest["key"] == key and manifest["kind"] == "round" and manifest["format"] == 1
    assert set(manifest["files"]["weights_end.safetensors"]) == {"sha256", "bytes"}


def test_a_second_put_keeps_the_first_entry(store: StageStore) -> None:
    key = key_of("race")
    store.put(make_entry(key, seed=1))
    store.put(make_entry(key, seed=2))
    loaded = store.get(key)
    assert loaded is not None and loaded.metrics["val_accuracy"] == pytest.approx(0.62)


def test_entry_without_weights_or_masks(store: StageStore) -> None:
    key = key_of("bare")
    store.put(StageEntry(key=key, kind="dense", inputs={}, metrics={"x": 1}))
    loaded = store.get(key)
    assert loaded is not None and loaded.weights == {} and loaded.masks == {} and loaded.metrics == {"x": 1}


# Corruption -------------------------------------------------------------------------------
def flip_bytes(store: StageStore, path: str) -> None:
    data = bytearray(read_file(store, path))
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    write_file(store, path, bytes(data))


def truncate(store: StageStore, path: str) -> None:
    data = read_file(store, path)
    write_file(store, path, data[: len(data) - 7])


def tamper_metric(store: StageStore, path: str) -> None:
    data = read_file(store, path)
    assert b"0.61" in data
    write_file(store, path, data.replace(b"0.61", b"0.91"))


@pytest.mark.parametrize(
    "filename, damage",
    [
        ("weights_end.safetensors", flip_bytes),
        ("mask_mask.parquet", truncate),
        ("weights_init.safetensors", truncate),
        ("mask_mask.parquet", flip_bytes),
        ("manifest.json", tamper_metric),
    ],
)
def test_corrupt_entry_is_reported_removed_and_replaced(
    store: StageStore, filename: str, damage: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    key = key_of("corrupt")
    store.put(make_entry(key))
    damage(store, entry_file(store, key, filename))
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stages"):
        assert store.get(key) is None
    assert key in caplog.text and filename in caplog.text
    assert not store.contains(key)
    assert store.filesystem.get_file_info(f"{store.root}/stages/{key[:2]}/{key}").type == pafs.FileType.NotFound
    store.put(make_entry(key))
    loaded = store.get(key)
    assert loaded is not None
    assert_same(loaded, make_entry(key))


def test_missing_data_file_is_corrupt(store: StageStore, caplog: pytest.LogCaptureFixture) -> None:
    key = key_of("missing")
    store.put(make_entry(key))
    store.filesystem.delete_file(entry_file(store, key, "weights_end.safetensors"))
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stages"):
        assert store.get(key) is None
    assert "weights_end.safetensors: missing" in caplog.text


def test_get_or_compute_replaces_a_corrupt_entry(store: StageStore) -> None:
    key = key_of("recompute")
    store.put(make_entry(key))
    flip_bytes(store, entry_file(store, key, "weights_end.safetensors"))
    entry, reused = store.get_or_compute(key, lambda: make_entry(key))
    assert not reused
    assert_same(store.get(key), entry)


def test_partial_entry_without_manifest_is_absent(store: StageStore) -> None:
    key = key_of("partial")
    directory = f"{store.root}/stages/{key[:2]}/{key}"
    store.filesystem.create_dir(directory, recursive=True)
    write_file(store, f"{directory}/weights_end.safetensors", b"half of a file")
    assert not store.contains(key) and store.get(key) is None
    store.put(make_entry(key))
    assert_same(store.get(key), make_entry(key))


def test_manifest_cannot_point_outside_the_entry(store: StageStore, caplog: pytest.LogCaptureFixture) -> None:
    key = key_of("escape")
    store.put(make_entry(key))
    path = entry_file(store, key, "manifest.json")
    body = json.loads(read_file(store, path))
    del body["checksum"]
    body["files"]["../../../../weights_x.safetensors"] = {"sha256": "0" * 64, "bytes": 1}
    write_file(store, path, encode_manifest(body))  # a validly signed but hostile manifest
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stages"):
        assert store.get(key) is None
    assert "unexpected file name" in caplog.text


def test_newer_format_is_refused_not_deleted(store: StageStore) -> None:
    key = key_of("future")
    store.put(make_entry(key))
    path = entry_file(store, key, "manifest.json")
    body = json.loads(read_file(store, path))
    del body["checksum"]
    body["format"] = 99
    write_file(store, path, encode_manifest(body))
    with pytest.raises(StoreError, match="newer lth-search"):
        store.get(key)
    assert store.contains(key)


# Safety -----------------------------------------------------------------------------------
BAD_KEYS = ["../x", "/etc/passwd", "a" * 63, "a" * 65, "A" * 64, "g" * 64, "ab/" + "c" * 61, "", None, 7]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_raise_store_error(store: StageStore, key: object) -> None:
    for call in (store.get, store.contains, lambda k: store.put(make_entry(k))):
        with pytest.raises(StoreError, match="invalid stage key"):
            call(key)
    with pytest.raises(StoreError):
        store.get_or_compute(key, lambda: make_entry(key))


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "x" * 65, "sp ace", "..\\x"])
def test_bad_set_names_raise_store_error(store: StageStore, name: str) -> None:
    key = key_of("names")
    entry = make_entry(key)
    entry.weights = {name: entry.weights["end"]}
    with pytest.raises(StoreError, match="invalid weight set name"):
        store.put(entry)
    entry = make_entry(key)
    entry.masks = {name: entry.masks["mask"]}
    with pytest.raises(StoreError, match="invalid mask name"):
        store.put(entry)
    assert not store.contains(key)


@pytest.mark.parametrize("kind", ["Dense", "../round", "", "round/1"])
def test_bad_kinds_raise_store_error(store: StageStore, kind: str) -> None:
    with pytest.raises(StoreError, match="invalid stage kind"):
        store.put(make_entry(key_of("kind"), kind=kind))


def test_names_with_dots_stay_inside_the_entry(store: StageStore) -> None:
    key = key_of("dots")
    entry = make_entry(key)
    entry.weights = {"..": entry.weights["end"], "rewind_1.5": entry.weights["init"]}
    store.put(entry)
    loaded = store.get(key)
    assert loaded is not None and set(loaded.weights) == {"..", "rewind_1.5"}
    assert store.filesystem.get_file_info(entry_file(store, key, "weights_...safetensors")).type == pafs.FileType.File


# Opening ----------------------------------------------------------------------------------
def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = StageStore("relative/store")
    assert store.uri == str(tmp_path / "relative" / "store") and store.local
    assert (tmp_path / "relative" / "store" / "stages").is_dir()


def test_from_config(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"store.uri={tmp_path}/s", "store.lease_timeout_s=7", "store.heartbeat_s=1"])
    store = StageStore.from_config(cfg)
    assert store.uri == f"{tmp_path}/s" and store.lease_timeout_s == 7 and store.heartbeat_s == 1
    default = StageStore.from_config(load_config(overrides=[f"output_dir={tmp_path}/out"]))
    assert default.uri == f"{tmp_path}/out/store"


def test_unusable_locations_raise_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        StageStore("nosuchscheme://bucket/x")
    with pytest.raises(StoreError, match="heartbeat_s"):
        StageStore(str(tmp_path), lease_timeout_s=1, heartbeat_s=2)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create"):
        StageStore(str(tmp_path / "file" / "store"))


def test_fsspec_protocols_open_through_pyfilesystem(tmp_path: Path) -> None:
    """Schemes pyarrow lacks (local://, memory://, sftp://, ...) go through fsspec, as non-local stores."""
    import pyarrow.fs as pafs

    on_disk = StageStore(f"local://{tmp_path}/s")
    assert isinstance(on_disk.filesystem, pafs.PyFileSystem) and not on_disk.local
    entry = make_entry(key_of("fsspec"))
    on_disk.put(entry)
    assert (tmp_path / "s" / "stages" / entry.key[:2] / entry.key / "manifest.json").is_file()
    assert not list((tmp_path / "s" / "stages").rglob("*.tmp"))  # the manifest was moved into place
    assert StageStore(str(tmp_path / "s")).get(entry.key) is not None  # the same bytes as a local store's
    assert StageStore(f"file://{tmp_path}/s").local  # file:// stays pyarrow's own local filesystem


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
    from lth_search.store.stages import StageEntry, StageStore

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
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        entry, reused = store.get_or_compute(key, lambda: StageEntry(key, "dense", {"x": 1}, {"by": "taker"}))
    waited = time.monotonic() - started
    assert not reused and entry.metrics == {"by": "taker"}
    assert waited < 5, waited  # the holder's pid is dead: no need to wait out the 60 s time-out
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
    assert not reused and 0.5 < time.monotonic() - started < 10


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


def test_records_round_trip_and_stay_inside(tmp_path) -> None:
    import pyarrow.fs as pafs
    import fsspec

    from lth_search.errors import StoreError
    from lth_search.store.stages import StageStore

    memory = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    for store in (StageStore(str(tmp_path / "s")), StageStore("/records-test", filesystem=memory)):
        assert store.records("search-x") == {}
        store.put_record("search-x", "trial_1", {"round_keys": ["a"], "n": 1})
        store.put_record("search-x", "trial_1", {"round_keys": ["a", "b"], "n": 2})
        store.put_record("search-x", "trial_2", {"n": 3})
        assert store.records("search-x") == {"trial_1": {"round_keys": ["a", "b"], "n": 2}, "trial_2": {"n": 3}}
        assert store.record("search-x", "trial_2") == {"n": 3}
        assert store.record("search-x", "trial_3") is None and store.record("search-y", "trial_1") is None
        for bad in ("../x", "/abs", "a/b", ".hidden", ""):
            with pytest.raises(StoreError):
                store.put_record("search-x", bad, {})
            with pytest.raises(StoreError):
                store.records(bad)
            with pytest.raises(StoreError):
                store.record("search-x", bad)
