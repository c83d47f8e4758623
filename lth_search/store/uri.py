"""Where a stage store lives: a path or URI, resolved to a pyarrow filesystem and a root.

pyarrow opens paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` and ``abfs://`` itself;
any other protocol fsspec knows (``sftp://``, ``memory://``, ``local://``, ...) is opened
through fsspec and wrapped as ``pyarrow.fs.PyFileSystem``, so "any pyarrow filesystem"
includes everything fsspec reaches.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.fs as pafs

from lth_search.config.names import check_store_uri
from lth_search.errors import StoreError, StoreFailure, os_reason, os_remedy


def resolve_uri(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[str, pafs.FileSystem, str]:
    """(normalised uri, filesystem, root path within it) of a store location."""
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError("store.uri must be a path or a URI such as s3://bucket/prefix")
    check_store_uri(uri, "store.uri", StoreError)
    if filesystem is not None:
        return uri, filesystem, uri.rstrip("/") or "/"
    if "://" not in uri:
        path = str(Path(uri).expanduser().resolve())
        return path, pafs.LocalFileSystem(), path
    scheme = uri.split("://", 1)[0].lower()
    try:
        if scheme in PYARROW_SCHEMES:
            fs, root = pafs.FileSystem.from_uri(uri)
        else:
            fs, root = _fsspec_filesystem(uri, scheme)
    except (OSError, ValueError, ImportError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise StoreError(f"store.uri {uri!r}: cannot open ({str(error).splitlines()[0]})") from None
    return uri.rstrip("/"), fs, root.rstrip("/") or "/"


PYARROW_SCHEMES = frozenset({"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock"})
"""URI schemes pyarrow opens natively; any other scheme fsspec knows is opened through fsspec."""


def _fsspec_filesystem(uri: str, scheme: str) -> tuple[pafs.FileSystem, str]:
    """An fsspec filesystem (sftp://, memory://, local://, ...) wrapped as a pyarrow filesystem.

    The store then takes its object-store path (data first, manifest last; lease objects),
    which is right for any filesystem whose renames are not known to be atomic.
    """
    import fsspec

    if scheme not in fsspec.available_protocols():
        known = ", ".join(sorted(PYARROW_SCHEMES - {"mock"}))
        raise ValueError(f"unknown scheme {scheme}://; use a path, one of {known}, or an fsspec protocol")
    filesystem, root = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root


def pyarrow_location(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path or URI, filesystem) to hand a pyarrow consumer such as Ray Tune's storage.

    Paths and the URIs pyarrow opens itself go as they are (filesystem None); any other
    fsspec URI (local://, sftp://, ...) becomes its path within the wrapped filesystem.
    """
    if "://" not in uri or uri.split("://", 1)[0].lower() in PYARROW_SCHEMES:
        return uri, None
    _, filesystem, path = resolve_uri(uri)
    return path, filesystem


def beside(uri: str, name: str) -> str:
    """The location `name` next to a store root, on the same storage.

    /runs/store -> /runs/<name>; s3://b/lth/store -> s3://b/lth/<name>; a bucket root
    (s3://b) -> s3://b/<name>. Ray's results and the searches' resume state live there,
    so a search can be continued from any machine that reaches the store.
    """
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve().parent / name)
    scheme, path = uri.rstrip("/").split("://", 1)
    parent = path.rsplit("/", 1)[0] if "/" in path.strip("/") else path
    return f"{scheme}://{parent.rstrip('/')}/{name}"


def read_file(uri: str) -> bytes | None:
    """The bytes of the file at `uri` (a path or any store URI), None when there is none."""
    _, filesystem, path = resolve_uri(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def write_file(uri: str, data: bytes) -> None:
    """Replace the file at `uri` (a path or any store URI) with `data`, atomically."""
    _, filesystem, path = resolve_uri(uri)
    replace_file(filesystem, path, data)


OBJECT_STORES = tuple(getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")
                      if hasattr(pafs, name))
"""pyarrow's object stores: an object appears whole when its upload completes, and folders are only
prefixes of names."""


def is_object_store(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, OBJECT_STORES)


def make_folder(filesystem: pafs.FileSystem, path: str) -> None:
    """Create the folder `path` and its parents; nothing on an object store, whose folders are only
    prefixes of names (a marker object there is a request a write, issue 24). Raises as the
    filesystem does."""
    if not is_object_store(filesystem):
        filesystem.create_dir(path, recursive=True)


def write_whole(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that a reader sees the old file or the new one, never half of one.

    On an object store, one upload: it publishes the object whole, and a staging object and a
    move (a copy and a delete) cost 3 more requests a write (issue 24). Elsewhere, write aside,
    then move into place (a rename); a failed write leaves no staging file. Raises OSError (or
    NotImplementedError) as the filesystem does.
    """
    if is_object_store(filesystem):
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with filesystem.open_output_stream(staging) as stream:
            stream.write(data)
        filesystem.move(staging, path)
    except (OSError, NotImplementedError):
        try:
            filesystem.delete_file(staging)
        except (OSError, NotImplementedError):
            pass
        raise


def replace_file(filesystem: pafs.FileSystem, path: str, data: bytes, what: str | None = None) -> None:
    """`write_whole` into its folder (made when missing; an object store has none to make).

    A failed write (disk full, read-only) leaves the old file and no staging file, and
    raises StoreFailure naming `what` (default: the path).
    """
    try:
        make_folder(filesystem, path.rsplit("/", 1)[0])
        write_whole(filesystem, path, data)
    except (OSError, NotImplementedError) as error:
        raise StoreFailure(
            f"cannot write {what or path} ({os_reason(error)}): {os_remedy(error)} and run the command again"
        ) from None
