"""Where Ray Tune writes a search's results: a filesystem whose files are replaced whole.

Tune rewrites its search state (`experiment_state-*.json`, the searcher's state, each
trial's `result.json`) by copying its staging folder over the results folder, and the
copy overwrites each file in place. A driver killed during that copy leaves an empty or
cut file; `Tuner.restore` then logs "Failed to restore the run state" and quietly starts
the experiment over, losing every trial it knew (CI saw exactly this). Ray has no option
for atomic writes, so the results folder is handed to Ray through this filesystem: every
file is written to `<name>.lth-partial` and moved over `<name>` when complete, so a
reader, and a resume after a kill, sees the old file or the new one, never half of one.

The same filesystem keeps the trials' checkpoints that Ray deletes. With `num_to_keep=1`
Ray deletes round r-1's checkpoint as it registers round r's, a moment before the saved
state that names round r reaches storage; a driver killed in between left a state naming
a deleted checkpoint, and that trial failed on resume ("Could not recover from
checkpoint as it does not exist on storage anymore", seen in 1 of ~10 suite runs). Our
checkpoints are a few bytes each (search/trainable.py), so none is deleted. (The driver now
sets num_to_keep=None, so Ray deletes none itself; this stays the guard.)

Object stores (s3://, gs://, ...) publish an object only when its upload completes, so a
write there is already all or nothing; their filesystem is wrapped (`ObjectStoreHandler`) to
keep the checkpoints and to skip what a snapshot would write unchanged (below).

Each snapshot of the search copies the whole staging folder: the experiment state and
every trial's result files, so a snapshot of a 1,000-trial search wrote ~3,000 files, most
of them unchanged, and on S3 made a folder marker per trial folder too: O(N) requests per
snapshot, ~1,400 a trial in a 1,000-trial search on moto. The filesystem holds a file's bytes
until it is closed and then writes them only when they differ from what the same filesystem
object last wrote there (`UnchangedSkipped`); an object store's folders are made once
(`ObjectStoreHandler.create_dir`): a snapshot writes what changed. The state file itself, which
grows with the trials and changes at every snapshot, is streamed (`BUFFERED_UP_TO`): to its
partial file on a filesystem, straight to its object on an object store. Only the driver
writes these files, and the memory of what was written is not pickled, so a worker or a
resumed driver writes everything once.

A Python stream inside pyarrow's `copy_files` to S3 deadlocked once (a 1,000-trial search on
moto), most likely as in apache/arrow#15233: the copy runs on pyarrow's IO threads, and S3's own
streams upload in the background on the same threads, so a stream closed from inside the copy
can wait for threads that are all waiting too. The S3 filesystem Ray is given therefore writes in the calling thread
(`background_writes=False`, `synchronous_s3`); Ray itself copies to S3 without threads for the
same reason, but cannot see S3 behind a wrapped filesystem.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from lth_search.store.uri import pyarrow_location

CHECKPOINT_DIR = re.compile(r"checkpoint_\d{6}")
"""Ray's name for a trial checkpoint's folder."""
BUFFERED_UP_TO = 1 << 20
"""Files up to this size are held in memory until closed and skipped when unchanged (a trial's
files); a larger one (the search's state, which changes at every snapshot) goes straight to its
partial file and is always written."""
PARTIAL_SUFFIX = ".lth-partial"
"""A file being written; Ray's file patterns (`*.json`, `*.pkl`, `checkpoint_*`) never match it."""


class WholeOnClose:
    """A binary output file that replaces its path whole when closed (`ReplacingHandler`,
    `ObjectStoreHandler`).

    Held in memory up to `BUFFERED_UP_TO` bytes, then streamed to its handler's partial file. The
    search's state file grows with the number of trials and is rewritten at every snapshot:
    held whole in memory, hashed and copied by pyarrow's IO threads, it cost 9 % of the
    driver's CPU in a 300-trial search (py-spy) and kept the largest copy in each thread's
    malloc arena.
    """

    def __init__(self, handler: "ReplacingHandler | ObjectStoreHandler", path: str) -> None:
        self.handler, self.path = handler, path
        self._buffer: io.BytesIO | None = io.BytesIO()
        self._partial: Any = None
        self._size = 0
        self._closed = False

    def write(self, data: bytes) -> int:
        assert not self._closed, f"{self.path}: written after close"
        if self._partial is None and self._buffer is not None and self._size + len(data) > BUFFERED_UP_TO:
            self._partial = self.handler.open_partial(self.path)
            self._partial.write(self._buffer.getbuffer())
            self._buffer = None
        written = (self._partial or self._buffer).write(data)
        self._size += len(data)
        return written

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self._size

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._partial is not None:
            self._partial.close()
            self.handler.replace_with_partial(self.path)
        else:
            assert self._buffer is not None
            data, self._buffer = self._buffer.getvalue(), None
            publish(self.handler, self.path, data)


class UnchangedSkipped:
    """What this filesystem object last wrote to each path (a digest), so an unchanged file is not
    written again (see the module's docstring). Never pickled: a copy starts empty."""

    def __init__(self) -> None:
        self._digests: dict[str, bytes] = {}
        self._lock = threading.Lock()  # pyarrow's copy_files writes from several threads

    def changed(self, path: str, data: bytes) -> bytes | None:
        """The digest to `remember` once written, or None when `path` holds `data` already."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        with self._lock:
            return None if self._digests.get(path) == digest else digest

    def remember(self, path: str, digest: bytes | None) -> None:
        """After a write: its digest, or None for a file written without one (streamed)."""
        with self._lock:
            if digest is None:
                self._digests.pop(path, None)
            else:
                self._digests[path] = digest

    def forget_under(self, prefix: str) -> None:
        """After a folder is deleted: nothing below it is known to be written."""
        with self._lock:
            self._digests = {p: d for p, d in self._digests.items() if not p.startswith(prefix)}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def publish(handler: "ReplacingHandler | ObjectStoreHandler", path: str, data: bytes) -> None:
    """Replace `path` with `data` through the handler's partial file, unless the handler wrote
    exactly them there last (`UnchangedSkipped`)."""
    digest = handler.written.changed(path, data)
    if digest is None:
        return
    with handler.open_partial(path) as out:
        out.write(data)
    handler.replace_with_partial(path)
    handler.written.remember(path, digest)


class ReplacingHandler(pafs.FSSpecHandler):
    """fsspec's pyarrow handler, with output streams that replace their file whole (written to
    `<path>.lth-partial`, moved over `path`), skip a file that is unchanged, and trial checkpoints
    that are never deleted (see the module's docstring)."""

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        self.written = UnchangedSkipped()

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(WholeOnClose(self, path), mode="w")

    def open_partial(self, path: str) -> Any:
        return self.fs.open(path + PARTIAL_SUFFIX, mode="wb")

    def replace_with_partial(self, path: str) -> None:
        """Move a complete `<path>.lth-partial` over `path`."""
        self.fs.mv(path + PARTIAL_SUFFIX, path)
        self.written.remember(path, None)

    def delete_dir(self, path: str) -> None:
        if CHECKPOINT_DIR.fullmatch(path.rstrip("/").rsplit("/", 1)[-1]):
            return
        super().delete_dir(path)


class ObjectStoreHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem (an object store's) as it is, except that trial checkpoints are never
    deleted, an unchanged small file is not written again and a folder is made once (see the
    module's docstring). An object is published whole when its upload completes, so the partial
    file a filesystem writes aside is the object itself here."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        self.written = UnchangedSkipped()
        self._folders: set[str] = set()
        self._folders_lock = threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectStoreHandler) and self.fs.equals(other.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return ObjectStoreHandler, (self.fs,)  # what was written and made is this process's to know

    def get_type_name(self) -> str:
        return f"lth-keep-checkpoints+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        """Made once per process: every snapshot asks again for every trial's folder."""
        with self._folders_lock:
            if path in self._folders:
                return
        self.fs.create_dir(path, recursive=recursive)
        with self._folders_lock:
            self._folders.add(path)

    def delete_dir(self, path: str) -> None:
        if CHECKPOINT_DIR.fullmatch(path.rstrip("/").rsplit("/", 1)[-1]):
            return
        self._forget(path)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._forget(path)
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("lth-search never empties a filesystem's root")

    def delete_file(self, path: str) -> None:
        self.written.remember(path, None)
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.written.remember(src, None)
        self.written.remember(dest, None)
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.written.remember(dest, None)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(WholeOnClose(self, path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        self.written.remember(path, None)
        return self.fs.open_append_stream(path, metadata=metadata)

    def open_partial(self, path: str) -> Any:
        self.written.remember(path, None)
        return self.fs.open_output_stream(path)

    def replace_with_partial(self, path: str) -> None:
        """Nothing to move: the object was published when its stream closed."""

    def _forget(self, folder: str) -> None:
        prefix = folder.rstrip("/") + "/"
        with self._folders_lock:
            self._folders = {f for f in self._folders if f != folder and not f.startswith(prefix)}
        self.written.forget_under(prefix)


def synchronous_s3(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same S3 filesystem, writing in the calling thread (see the module's docstring); any
    other filesystem as it is. Its options are the ones pyarrow pickles it with."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, (options,) = fs.__reduce__()
    return pafs.S3FileSystem(**{**options, "background_writes": False})


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for Tune's `storage_path`/`storage_filesystem` and `Tuner.restore`.

    Local paths and fsspec URIs (`local://`, `sftp://`, ...) get the replacing filesystem;
    pyarrow's object stores their own filesystem, wrapped (`ObjectStoreHandler`).
    """
    import fsspec

    path, filesystem = pyarrow_location(uri)
    if path.lower().startswith("file://"):
        path = path[len("file://"):]
    if filesystem is None and "://" in path:  # s3://, gs://, ...: writes are already all or nothing
        native, inner_path = pafs.FileSystem.from_uri(path)
        return inner_path, pafs.PyFileSystem(ObjectStoreHandler(synchronous_s3(native)))
    if filesystem is None:
        inner = fsspec.filesystem("file")
    else:
        handler = getattr(filesystem, "handler", None)
        inner = getattr(handler, "fs", None)
        if inner is None:
            return path, filesystem
    return path, pafs.PyFileSystem(ReplacingHandler(inner))
