"""Fault drills of the stage store (issue 12): a full disk, a read-only store, a deleted
leases folder, damaged manifests. Each is a one-line error or a recomputed stage, never a
traceback or a stage half-written. The other drills are test_faults.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import pyarrow.fs as pafs
import torch

from fault_helpers import MountRefused, fill, tmpfs
from lth_search.errors import StoreError, StoreFailure, os_reason, os_remedy
from lth_search.store.codec import decode_manifest, encode_manifest
from lth_search.store.entry import StageEntry
from lth_search.store.content_keys import content_key
from lth_search.store.leases import FileLeaseService
from lth_search.store.stage_store import StageStore
from lth_search.store.uri import replace_file


def _entry(key: str, size: int = 64) -> StageEntry:
    return StageEntry(key, "dense", {"x": 1}, {"val_accuracy": 0.5}, weights={"end": {"w": torch.ones(size)}})


def test_disk_full_while_publishing_leaves_nothing(tmp_path: Path) -> None:
    """3: ENOSPC while publishing was a raw OSError traceback with staging left in tmp/ for 24 h."""
    try:
        with tmpfs(tmp_path / "disk", 256) as disk:
            store = StageStore(str(disk / "store"))
            small = content_key({"small": 1})
            store.put(_entry(small))
            ballast = fill(disk, leave_kb=16)
            key = content_key({"big": 1})
            with pytest.raises(StoreFailure, match="No space left on device"):
                store.put(_entry(key, size=30_000))  # 120 kB of weights
            assert list((disk / "store" / "tmp").iterdir()) == [] and not store.contains(key)
            ballast.unlink()
            store.put(_entry(key, size=30_000))  # space freed: the same publish succeeds
            assert store.get(key) is not None and store.get(small) is not None
    except MountRefused as refused:
        pytest.skip(str(refused))


def test_read_only_http_store_is_one_line() -> None:
    """10: an http:// store (read-only fsspec) raised NotImplementedError."""
    with pytest.raises(StoreError, match="read-only"):
        StageStore("http://127.0.0.1:1/store")


def test_leases_folder_deleted_mid_run(tmp_path: Path) -> None:
    """10: deleting leases/ made the next acquire or renew raise FileNotFoundError."""
    service = FileLeaseService(tmp_path)
    key = content_key({"lease": 1})
    assert service.acquire(key, "me", 30)
    shutil.rmtree(tmp_path / "leases")
    assert not service.renew(key, "me", 30)  # the lease is gone: lost, not a crash
    assert service.acquire(key, "me", 30) and service.renew(key, "me", 30)


def _rewrite_manifest(store: StageStore, key: str, change) -> None:
    path = Path(store._entry_dir(key)) / "manifest.json"
    path.write_bytes(change(path.read_bytes()))


def test_resigned_manifest_without_its_files_is_recomputed(tmp_path: Path) -> None:
    """10: a validly signed manifest that lacks files or fields gave a KeyError; now it is corrupt, recomputed."""
    store = StageStore(str(tmp_path / "store"))
    for change in ({"drop": "files"}, {"drop": "kind"}, {"empty_files": True}):
        key = content_key({"resigned": str(change)})
        store.put(_entry(key))

        def resign(data: bytes) -> bytes:
            body = decode_manifest(data)
            if "drop" in change:
                body.pop(change["drop"])
            else:
                body["files"] = {}
            return encode_manifest(body)

        _rewrite_manifest(store, key, resign)
        needs_end = lambda entry: None if "end" in entry.weights else "lacks weights end"  # noqa: E731
        entry, reused = store.get_or_compute(key, lambda: _entry(key), check=needs_end)
        assert not reused and "end" in entry.weights


def test_flipped_format_bit_is_corruption_not_upgrade(tmp_path: Path) -> None:
    """12: a one-bit flip of `format` was a permanent "upgrade lth-search" error."""
    store = StageStore(str(tmp_path / "store"))
    key = content_key({"flip": 1})
    store.put(_entry(key))
    _rewrite_manifest(store, key, lambda data: json.dumps({**json.loads(data), "format": 3}).encode())
    assert store.get(key) is None  # corrupt: removed, so it is recomputed
    entry, reused = store.get_or_compute(key, lambda: _entry(key))
    assert not reused


def test_a_failed_pyarrow_write_is_one_short_line_with_its_remedy(tmp_path: Path) -> None:
    """pyarrow's errors carry the whole message in strerror; the line keeps the errno's words and what to do."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreFailure) as caught:
        replace_file(pafs.LocalFileSystem(), str(tmp_path / "file" / "sub" / "x.json"), b"{}", what="record r1")
    message = str(caught.value)
    assert message == "cannot write record r1 (Not a directory): fix it and run the command again", message
    read_only = OSError("Failed to open local file '/s/x'. Detail: [errno 30] Read-only file system")
    assert (os_reason(read_only), os_remedy(read_only)) == ("Read-only file system", "make it writable")
