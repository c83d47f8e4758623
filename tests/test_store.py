"""The stage store on real filesystems: round trips, corruption, safety, opening (no mocks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import fsspec
import pyarrow.fs as pafs
import pytest
from store_helpers import KINDS, assert_same, entry_file, key_of, make_entry, make_store, read_file, write_file

from lth_search.config import load_config
from lth_search.errors import StoreError
from lth_search.store.codec import encode_manifest
from lth_search.store.entry import StageEntry
from lth_search.store.stage_store import LocalStageStore, ObjectStageStore, StageStore


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StageStore:
    return make_store(request.param, tmp_path)


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


def test_an_entry_hands_out_the_files_the_store_holds(store: StageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking uploads a stage's weights and mask as the store's own bytes (`weights_file`,
    `mask_file`), whether the entry was just written or read back; a large entry keeps no copy
    of its files and encodes them again, to the same bytes."""
    import lth_search.store.entry as entry_module
    from lth_search.store.codec import encode_mask, encode_weights

    key = key_of("files")
    entry = make_entry(key)
    store.put(entry)
    stored = {name: read_file(store, entry_file(store, key, name))
              for name in ("weights_end.safetensors", "mask_mask.parquet")}
    loaded = store.get(key)
    assert loaded is not None
    for held in (entry, loaded):
        assert held.encoded and held.weights_file("end") == stored["weights_end.safetensors"]
        assert held.mask_file("mask") == stored["mask_mask.parquet"]
    assert stored["weights_end.safetensors"] == encode_weights(entry.weights["end"])
    assert stored["mask_mask.parquet"] == encode_mask(entry.masks["mask"])
    monkeypatch.setattr(entry_module, "ENCODED_KEPT_BYTES", 10)
    large = store.get(key)
    assert large is not None and large.encoded == {} and large.weights_file("end") == stored["weights_end.safetensors"]


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
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stage_store"):
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
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stage_store"):
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
    with caplog.at_level(logging.WARNING, logger="lth_search.store.stage_store"):
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
    assert store.uri == str(tmp_path / "relative" / "store") and isinstance(store, LocalStageStore)
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
    assert isinstance(on_disk.filesystem, pafs.PyFileSystem) and isinstance(on_disk, ObjectStageStore)
    entry = make_entry(key_of("fsspec"))
    on_disk.put(entry)
    assert (tmp_path / "s" / "stages" / entry.key[:2] / entry.key / "manifest.json").is_file()
    assert not list((tmp_path / "s" / "stages").rglob("*.tmp"))  # the manifest was moved into place
    assert StageStore(str(tmp_path / "s")).get(entry.key) is not None  # the same bytes as a local store's
    assert isinstance(StageStore(f"file://{tmp_path}/s"), LocalStageStore)  # file:// stays pyarrow's own local filesystem


def test_records_round_trip_and_stay_inside(tmp_path) -> None:
    import pyarrow.fs as pafs

    from lth_search.errors import StoreError
    from lth_search.store.stage_store import StageStore

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
