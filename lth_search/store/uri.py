"""Where a stage store lives: a path or URI, resolved to a pyarrow filesystem and a root.

pyarrow opens paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` and ``abfs://`` itself;
any other protocol fsspec knows (``sftp://``, ``memory://``, ``local://``, ...) is opened
through fsspec and wrapped as ``pyarrow.fs.PyFileSystem``, so "any pyarrow filesystem"
includes everything fsspec reaches.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from lth_search.config.names import check_store_uri
from lth_search.errors import StoreError


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
