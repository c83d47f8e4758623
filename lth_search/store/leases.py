"""Leases: who computes a missing stage while everyone else who needs it waits.

A lease is a time-limited claim on one stage key. The holder renews it from a heartbeat
thread while it computes; a holder that dies stops renewing, its lease expires after
its time-out, and a waiter takes over. Correctness never depends on a lease (stages are
published atomically under content-addressed keys and verified when read): a lost or
doubly-held lease only costs compute. So the services here favour simplicity and
never block forever.

- `FileLeaseService`: lease files in a local (or NFS) directory, created with O_EXCL so
  exactly one process wins a free lease; for several processes on one machine.
- `FilesystemLeaseService`: best-effort lease objects on any pyarrow filesystem (object
  stores have no exclusive create); for workers on several nodes without a better
  service. A cluster-wide service (e.g. a Ray named actor) plugs in through the
  `LeaseService` protocol.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Protocol

import pyarrow.fs as pafs

from lth_search.errors import os_reason
from lth_search.store.content_keys import check_key

log = logging.getLogger(__name__)


class LeaseService(Protocol):
    """Time-limited exclusive claims on stage keys."""

    def acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        """True if `holder` now holds the lease: it was free, expired (taken over), or already held by `holder`."""

    def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        """Extend `holder`'s lease by `ttl_s` from now; False if `holder` no longer holds it."""

    def release(self, key: str, holder: str) -> None:
        """Give the lease up (no-op unless `holder` holds it)."""


_HELD: set[str] = set()
"""The holders whose lease this process took and has not released: a lease that names this
process's pid but is not here was left behind (its release failed, e.g. on a store that
turned read-only) and is as dead as a killed process's."""


def new_holder() -> str:
    """A holder id unique across hosts, processes and calls."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def dead_here(holder: str) -> int | None:
    """The pid of `holder` if it is a process of this host that no longer runs, else None.

    A holder killed outright (SIGKILL, OOM) never releases its lease; waiting out the
    time-out would cost minutes. On the holder's own host that is knowable at once. (A
    holder on another host is judged by its time-out only.)
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return None if holder in _HELD else pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except PermissionError:
        return None  # runs, as another user
    try:  # a killed child its parent has not reaped yet is a zombie: dead, though kill(0) works
        return pid if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X") else None
    except (OSError, IndexError):
        return None


def _takeover_reason(record: dict | None, mtime: float | None, ttl_s: float) -> str | None:
    """Why a lease may be taken over now ("expired", "its holder pid N is dead"), or None."""
    if record is not None:
        pid = dead_here(record["holder"])
        if pid is not None:
            return f"its holder (pid {pid} on this host) is dead"
        return "it expired" if record["expires"] < time.time() else None
    return "it expired" if mtime is not None and mtime + ttl_s < time.time() else None


def _held(holder: str, acquire: Callable[[], bool]) -> bool:
    """Run `acquire` with `holder` already counted as held by this process, and keep it only if
    it won. Added before the lease exists: another thread of this process that reads the new
    lease in between must not judge its holder (this pid, not in `_HELD`) dead and take it over,
    which would train the stage twice (seen in CI: two threads packing overlapping stages)."""
    _HELD.add(holder)
    acquired = False
    try:
        acquired = acquire()
    finally:
        if not acquired:
            _HELD.discard(holder)
    return acquired


def _record(holder: str, ttl_s: float) -> bytes:
    return json.dumps({"holder": holder, "expires": time.time() + ttl_s, "nonce": uuid.uuid4().hex}).encode()


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data)
        return record if isinstance(record.get("holder"), str) and isinstance(record.get("expires"), float) else None
    except (ValueError, AttributeError):
        return None


class FileLeaseService:
    """Leases as files `<root>/leases/<key>.lease` on a local or NFS directory.

    A free lease is created whole by a hard link (exclusive, like O_EXCL), so exactly one
    creator wins and a lease file always names its holder. An expired
    one is deleted by one taker at a time (under an O_EXCL guard file), and only if it is
    still the record judged stale; then taking it is an ordinary exclusive create.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.dir = Path(root) / "leases"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)  # someone may have deleted leases/ mid-run
        return self.dir / f"{check_key(key)}.lease"

    def acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        return _held(holder, lambda: self._acquire(key, holder, ttl_s))

    def _acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        path = self._path(key)
        for _ in range(3):
            if self._create(path, holder, ttl_s):
                return True
            record, mtime = self._read(path)
            if record is None and mtime is None:
                continue  # released meanwhile: try to create again
            if record is not None and record["holder"] == holder:
                return self.renew(key, holder, ttl_s)
            reason = _takeover_reason(record, mtime, ttl_s)
            if reason is None:
                return False
            if not self._take_stale(path, (record, mtime), ttl_s):
                return False
            log.warning("lease on stage %s: %s; taking it over", key[:12], reason)
        return False

    def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        path = self._path(key)
        record, _ = self._read(path)
        if record is None or record["holder"] != holder:
            return False
        staging = path.with_name(f"{path.name}.{uuid.uuid4().hex}.new")
        try:
            staging.write_bytes(_record(holder, ttl_s))
            os.replace(staging, path)  # readers see the old or the new record, never half of one
        finally:
            staging.unlink(missing_ok=True)
        return True

    def release(self, key: str, holder: str) -> None:
        _HELD.discard(holder)  # before the delete: if that fails, the lease left behind is stale
        path = self._path(key)
        record, _ = self._read(path)
        if record is not None and record["holder"] == holder:
            path.unlink(missing_ok=True)

    def holder(self, key: str) -> str | None:
        """Who holds the lease on `key` now (None when nobody, or while its creator writes)."""
        record, _ = self._read(self._path(key))
        return record["holder"] if record is not None else None

    @staticmethod
    def _create(path: Path, holder: str, ttl_s: float) -> bool:
        """Create the lease file with its whole record, or False if it exists.

        The record is written aside and hard-linked into place (link fails if the name
        exists, like O_EXCL): a holder killed while creating never leaves an empty lease
        that nobody could attribute to a dead process and that would block for the time-out.
        """
        staging = path.with_name(f"{path.name}.{uuid.uuid4().hex}.new")
        try:
            staging.write_bytes(_record(holder, ttl_s))
            os.link(staging, path)
            return True
        except FileExistsError:
            return False
        finally:
            staging.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> tuple[dict | None, float | None]:
        """(record, mtime); record None while a creator is still writing; both None if absent."""
        try:
            mtime = path.stat().st_mtime
            return _parse(path.read_bytes()), mtime
        except FileNotFoundError:
            return None, None

    @staticmethod
    def _take_stale(path: Path, stale: tuple[dict | None, float | None], ttl_s: float) -> bool:
        """Delete the stale lease file if it is still `stale`; False if someone else got there.

        A `.takeover` guard file (O_EXCL) admits one taker at a time, so no taker can
        delete a lease another taker has just created.
        """
        guard = path.with_name(f"{path.name}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:  # a taker that died inside its guard: clear the guard after a generous delay
                if guard.stat().st_mtime + max(ttl_s, 10.0) < time.time():
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            if FileLeaseService._read(path) != stale:
                return False  # renewed, released or taken over since we judged it
            path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)


class FilesystemLeaseService:
    """Best-effort lease objects `<root>/leases/<key>.lease` on any pyarrow filesystem.

    Object stores have no exclusive create, so acquiring writes the record, waits
    `settle_s`, and reads it back: of writers racing within that window, the last one
    wins. Two holders remain possible in rare races; that costs compute, not correctness.
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str, settle_s: float = 0.2) -> None:
        self.fs = filesystem
        self.dir = f"{root.rstrip('/')}/leases"
        self.settle_s = settle_s
        self.fs.create_dir(self.dir, recursive=True)

    def _path(self, key: str) -> str:
        return f"{self.dir}/{check_key(key)}.lease"

    def _read(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return _parse(stream.read())
        except (FileNotFoundError, OSError):
            return None

    def holder(self, key: str) -> str | None:
        """Who holds the lease on `key` now (None when nobody)."""
        record = self._read(self._path(key))
        return record["holder"] if record is not None else None

    def _write(self, path: str, holder: str, ttl_s: float) -> None:
        self.fs.create_dir(self.dir, recursive=True)  # someone may have deleted leases/ mid-run
        with self.fs.open_output_stream(path) as stream:
            stream.write(_record(holder, ttl_s))

    def acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        return _held(holder, lambda: self._acquire(key, holder, ttl_s))

    def _acquire(self, key: str, holder: str, ttl_s: float) -> bool:
        path = self._path(key)
        record = self._read(path)
        if record is not None and record["holder"] != holder:
            reason = _takeover_reason(record, None, ttl_s)
            if reason is None:
                return False
            log.warning("lease on stage %s: %s; taking it over", key[:12], reason)
        self._write(path, holder, ttl_s)
        time.sleep(self.settle_s)
        record = self._read(path)
        return record is not None and record["holder"] == holder

    def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        path = self._path(key)
        record = self._read(path)
        if record is None or record["holder"] != holder:
            return False
        self._write(path, holder, ttl_s)
        return True

    def release(self, key: str, holder: str) -> None:
        _HELD.discard(holder)
        path = self._path(key)
        record = self._read(path)
        if record is not None and record["holder"] == holder:
            try:
                self.fs.delete_file(path)
            except (FileNotFoundError, OSError):
                pass


class Heartbeat:
    """Context manager renewing a lease every `every_s` from a daemon thread.

    Keeps a long computation's lease alive; if the lease is lost anyway (a stalled
    process, a clock jump) it warns once and lets the computation finish: the publish
    is atomic, so the worst case is a stage computed twice.
    """

    def __init__(self, service: LeaseService, key: str, holder: str, ttl_s: float, every_s: float) -> None:
        self.service, self.key, self.holder, self.ttl_s, self.every_s = service, key, holder, ttl_s, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{key[:8]}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        warned = failing = False
        while not self._stop.wait(self.every_s):
            try:
                held = self.service.renew(self.key, self.holder, self.ttl_s)
            except Exception as error:  # a flaky filesystem must not kill the computation
                if not failing:  # once per streak of failures, not every heartbeat
                    log.warning("renewing the lease on stage %s failed: %s", self.key[:12], os_reason(error))
                failing = True
                continue
            failing = False
            if not held and not warned:
                log.warning("lost the lease on stage %s; computing it anyway (another worker may too)", self.key)
                warned = True
