"""Content-addressed stage store: a stage any lineage computed is never trained again.

An entry is keyed by the sha256 of the stage's canonical inputs (parent key included),
so equal inputs find equal entries and nothing is ever overwritten with different
meaning. The root is any pyarrow filesystem: a local path, ``file://``, ``s3://``,
``gs://``, another fsspec protocol (store_uri.py), or a filesystem object given
explicitly. Layout under the root::

    stages/<key[:2]>/<key>/manifest.json            what makes the entry exist
    stages/<key[:2]>/<key>/weights_<name>.safetensors
    stages/<key[:2]>/<key>/mask_<name>.parquet      (columns: see codec.py)
    leases/<key>.lease                              single-flight claims (leases.py)
    tmp/                                            staging of local publishes

What an entry is and how its bytes are signed and verified is entry.py. Here, a
corrupt entry is logged and removed, which makes it look absent: the caller recomputes
and republishes.

Publishing is atomic, and how depends on the backend, one class each: `LocalStageStore`
writes the entry under ``tmp/`` and renames the directory into place;
`ObjectStageStore` (object stores and any other pyarrow filesystem, which have no
directory rename) writes the data files first and the manifest last, written aside and
moved into place whole: a stage directory without a manifest is absent. `StageStore(uri)`
gives the one the URI's filesystem needs.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow.fs as pafs

from lth_search.errors import StoreError, StoreFailure, os_reason, os_remedy
from lth_search.store.entry import MANIFEST, Check, Corrupt, StageEntry, decode_entry, encode_entry
from lth_search.store.content_keys import check_key
from lth_search.store.leases import (
    FileLeaseService,
    FilesystemLeaseService,
    Heartbeat,
    LeaseService,
    new_holder,
)
from lth_search.store.records import read_record, read_records, write_record
from lth_search.store.uri import make_folder, resolve_uri, write_whole

if TYPE_CHECKING:
    from lth_search.config import ExperimentConfig

log = logging.getLogger(__name__)

_TMP_MAX_AGE_S = 24 * 3600

__all__ = ["LocalStageStore", "ObjectStageStore", "StageStore"]


class StageStore:
    """Stages on a pyarrow filesystem, published atomically, verified on read, computed once.

    `StageStore(uri, ...)` makes a `LocalStageStore` for a local filesystem and an
    `ObjectStageStore` for any other; the two differ only in how an entry is published
    and removed, and which lease service they default to.
    """

    def __new__(cls, uri: str | None = None, filesystem: pafs.FileSystem | None = None, *args: object,
                **kwargs: object) -> "StageStore":
        if cls is StageStore and uri is not None:  # (uri None: unpickling, which knows its class)
            local = isinstance(resolve_uri(uri, filesystem)[1], pafs.LocalFileSystem)
            cls = LocalStageStore if local else ObjectStageStore
        return super().__new__(cls)

    poll_s = 0.25
    """How often a waiter looks for a stage another worker is computing."""

    def __init__(
        self,
        uri: str,
        filesystem: pafs.FileSystem | None = None,
        lease_timeout_s: float = 120.0,
        heartbeat_s: float = 5.0,
        lease_service: LeaseService | None = None,
    ) -> None:
        if not 0 < heartbeat_s < lease_timeout_s:
            raise StoreError(
                f"store.heartbeat_s ({heartbeat_s}) must be > 0 and smaller than store.lease_timeout_s ({lease_timeout_s})"
            )
        self.uri, self.filesystem, self.root = resolve_uri(uri, filesystem)
        self.lease_timeout_s, self.heartbeat_s = lease_timeout_s, heartbeat_s
        try:
            for sub in ("stages", "tmp"):
                make_folder(self.filesystem, self._path(sub))
            self.leases: LeaseService = lease_service or self._default_leases()
            self._opened()
        except NotImplementedError:
            raise StoreError(f"store {self.uri!r}: this filesystem is read-only; a store must be writable") from None
        except OSError as error:
            raise StoreFailure(f"store {self.uri!r}: cannot create its folders ({os_reason(error)})") from None

    @classmethod
    def from_config(cls, cfg: "ExperimentConfig", lease_service: LeaseService | None = None) -> "StageStore":
        """The store an experiment config names (default `<output_dir>/store`)."""
        return cls(
            cfg.store_uri(),
            lease_timeout_s=cfg.store.lease_timeout_s,
            heartbeat_s=cfg.store.heartbeat_s,
            lease_service=lease_service,
        )

    # What a backend supplies ----------------------------------------------------------------
    def _default_leases(self) -> LeaseService:
        raise NotImplementedError

    def _opened(self) -> None:
        """Housekeeping once the store's folders exist."""

    def _publish_files(self, entry: StageEntry, files: dict[str, bytes]) -> StageEntry:
        """Publish `files` atomically; return the entry now stored (`entry`, or a racer's)."""
        raise NotImplementedError

    def _remove_dir(self, directory: str) -> None:
        """Remove an entry's directory so that readers see the whole entry or none."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"StageStore({self.uri!r})"

    # Records ------------------------------------------------------------------------------
    def put_record(self, namespace: str, name: str, payload: dict) -> None:
        """Replace the JSON record `namespace/name` (see records.py) atomically."""
        write_record(self.filesystem, self.root, namespace, name, payload)

    def record(self, namespace: str, name: str) -> dict | None:
        """The JSON record `namespace/name`, or None."""
        return read_record(self.filesystem, self.root, namespace, name)

    def records(self, namespace: str, unreadable: list[str] | None = None) -> dict[str, dict]:
        """Every JSON record of `namespace`, by name; names of damaged ones go to `unreadable`."""
        return read_records(self.filesystem, self.root, namespace, unreadable)

    # Paths --------------------------------------------------------------------------------
    def _path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def _entry_dir(self, key: str) -> str:
        check_key(key)
        return self._path(f"stages/{key[:2]}/{key}")

    # Reading ------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """Whether a published entry exists (cheap: the manifest is not verified)."""
        info = self.filesystem.get_file_info(f"{self._entry_dir(key)}/{MANIFEST}")
        return info.type == pafs.FileType.File

    def get(self, key: str, check: Check | None = None) -> StageEntry | None:
        """The verified entry, or None if absent; a corrupt entry is logged, removed and None.

        `check(entry)` names what a caller needs and the entry lacks (None: nothing); an
        entry whose checksums hold but which fails it (a manifest re-signed without some
        of its files) is corrupt too.
        """
        directory = self._entry_dir(key)
        manifest = self._read(f"{directory}/{MANIFEST}")
        if manifest is None:
            return None
        try:
            entry = decode_entry(key, manifest, lambda filename: self._read(f"{directory}/{filename}"))
            problem = check(entry) if check is not None else None
            if problem:
                raise Corrupt(problem)
            return entry
        except Corrupt as problem:
            log.warning("stage %s is corrupt (%s); removing it so that it is recomputed", key, problem)
            self._remove(key, manifest)
            return None

    def _read(self, path: str) -> bytes | None:
        try:
            with self.filesystem.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            if self.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise StoreFailure(f"store {self.uri!r}: cannot read {path} ({os_reason(error)})") from None

    # Writing ------------------------------------------------------------------------------
    def put(self, entry: StageEntry) -> None:
        """Publish atomically; if the entry exists already (a racing writer), keep that one.

        Fills `entry.created_at` and `entry.code_version`.
        """
        self._publish(entry)

    def _publish(self, entry: StageEntry) -> StageEntry:
        """Publish and return the entry now stored: `entry`, or an existing valid one."""
        files = encode_entry(entry)
        try:
            return self._publish_files(entry, files)
        except (OSError, NotImplementedError) as error:  # disk full, read-only, permissions: nothing was published
            raise StoreFailure(
                f"store {self.uri!r}: cannot publish stage {entry.key[:12]} ({os_reason(error)}); "
                f"stages stored before stay stored: {os_remedy(error)} and run the command again"
            ) from None

    def _write(self, path: str, data: bytes) -> None:
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(data)

    def _remove(self, key: str, judged_manifest: bytes) -> None:
        """Remove a corrupt entry, unless a writer replaced it since it was judged."""
        directory = self._entry_dir(key)
        if self._read(f"{directory}/{MANIFEST}") != judged_manifest:
            return
        self._remove_dir(directory)

    # Single flight ------------------------------------------------------------------------
    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Check | None = None
    ) -> tuple[StageEntry, bool]:
        """(entry, reused): the stored entry, or compute it once however many workers ask.

        The first worker to take the lease computes (renewing the lease from a heartbeat
        thread); the others poll until the entry appears, or take over once the lease
        expires or its holder is known dead (a process of this host that no longer runs).
        A waiter says so on the console (a warning), so a wait is never silent.
        """
        entry = self.get(key, check)
        if entry is not None:
            return entry, True
        holder = new_holder()
        waiting = False
        while True:
            if self.leases.acquire(key, holder, self.lease_timeout_s):
                return self._compute_holding(key, compute, holder, check)
            if not waiting:
                waiting = True
                log.warning(
                    "stage %s is being computed by another process; waiting for it (taken over if that "
                    "process dies, or after store.lease_timeout_s = %gs without a heartbeat)", key[:12],
                    self.lease_timeout_s,
                )
            time.sleep(self.poll_s * random.uniform(0.8, 1.2))
            if self.contains(key):
                entry = self.get(key, check)
                if entry is not None:
                    return entry, True

    def _compute_holding(
        self, key: str, compute: Callable[[], StageEntry], holder: str, check: Check | None
    ) -> tuple[StageEntry, bool]:
        try:
            entry = self.get(key, check)  # published while we were acquiring?
            if entry is not None:
                return entry, True
            with Heartbeat(self.leases, key, holder, self.lease_timeout_s, self.heartbeat_s):
                entry = compute()
            if not isinstance(entry, StageEntry) or entry.key != key:
                raise ValueError(f"compute for stage {key} returned {type(entry).__name__} with another key")
            return self._publish(entry), False
        finally:
            try:
                self.leases.release(key, holder)
            except OSError as error:  # it expires on its own; never mask the real outcome
                log.warning("releasing the lease on stage %s failed: %s", key, error)


class LocalStageStore(StageStore):
    """A store on a local (or mounted) filesystem: entries renamed into place whole."""

    def _default_leases(self) -> LeaseService:
        return FileLeaseService(self.root)

    def _opened(self) -> None:
        self._sweep_tmp()

    def _publish_files(self, entry: StageEntry, files: dict[str, bytes]) -> StageEntry:
        staging = Path(self._path(f"tmp/{entry.key}.{uuid.uuid4().hex}"))
        try:
            staging.mkdir(parents=True)
            for filename, data in files.items():
                self._write(str(staging / filename), data)
            destination = Path(self._entry_dir(entry.key))
            destination.parent.mkdir(parents=True, exist_ok=True)
            return self._move_into_place(entry, staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; a failed write leaves nothing

    def _move_into_place(self, entry: StageEntry, staging: Path, destination: Path) -> StageEntry:
        for _ in range(3):
            try:
                os.rename(staging, destination)
                return entry
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            existing = self.get(entry.key)
            if existing is not None:
                return existing
            if destination.exists() and not (destination / MANIFEST).exists():
                self._discard_local(destination)  # leftovers without a manifest are never an entry
        raise StoreError(f"store {self.uri!r}: could not publish stage {entry.key} (destination keeps changing)")

    def _remove_dir(self, directory: str) -> None:
        self._discard_local(Path(directory))

    def _discard_local(self, directory: Path) -> None:
        trash = Path(self._path(f"tmp/{directory.name}.{uuid.uuid4().hex}.trash"))
        try:
            os.rename(directory, trash)  # atomic: readers see the whole entry or nothing
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_tmp(self) -> None:
        """Delete staging folders that killed writers left behind (older than a day)."""
        cutoff = time.time() - _TMP_MAX_AGE_S
        for child in Path(self._path("tmp")).iterdir():
            try:
                if child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)
            except FileNotFoundError:
                pass


class ObjectStageStore(StageStore):
    """A store on an object store or any other pyarrow filesystem: the manifest is written last."""

    def _default_leases(self) -> LeaseService:
        return FilesystemLeaseService(self.filesystem, self.root)

    def _publish_files(self, entry: StageEntry, files: dict[str, bytes]) -> StageEntry:
        if self.contains(entry.key):
            existing = self.get(entry.key)
            if existing is not None:
                return existing
        directory = self._entry_dir(entry.key)
        make_folder(self.filesystem, directory)
        for filename, data in files.items():
            if filename != MANIFEST:
                self._write(f"{directory}/{filename}", data)
        # Last, and whole: the manifest makes the entry exist, and a reader never sees half of it.
        write_whole(self.filesystem, f"{directory}/{MANIFEST}", files[MANIFEST])
        return entry

    def _remove_dir(self, directory: str) -> None:
        try:
            self.filesystem.delete_file(f"{directory}/{MANIFEST}")  # first: the entry is now absent
            self.filesystem.delete_dir(directory)
        except FileNotFoundError:
            pass
