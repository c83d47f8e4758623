"""Readers of the standard data-set file formats, safe on untrusted files.

IDX (MNIST, Fashion-MNIST) is parsed with numpy; CIFAR-10's python batches are pickles,
so they go through an unpickler that resolves only the few globals those files use
(numpy array reconstruction, numeric dtypes, bytes) and refuses anything else before it
runs. Every problem is a one-line `DataError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lth_search.errors import DataError


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (raw or .gz): magic 00 00 08 ndim, big-endian dims."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read IDX file ({error})") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dim(s) (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)  # Python ints: four 32-bit dims overflow numpy's int64
    if len(data) - header != expected:
        shape = " x ".join(str(d) for d in dims)
        raise DataError(f"{path}: header says {shape} = {expected} bytes, file holds {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)



class _Refused(Exception):
    """A pickle asked for something a CIFAR-10 batch never holds (read_cifar_batch adds the path)."""


def _numeric_dtype(spec: Any, *args: Any) -> np.dtype:
    dtype = np.dtype(spec, *args)
    if dtype.kind not in "biuf":
        raise _Refused(f"refusing numpy dtype {dtype}")
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes at protocol 2; nothing else of _codecs is needed."""
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"refusing _codecs.encode with {str(encoding)[:40]!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whichever module holds it
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): bytes,
    ("__builtin__", "bytes"): bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR-10 batch references; any other global is refused unrun."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[(module, name)]
        raise _Refused(f"refusing to unpickle {module[:80]}.{name[:80]}")


CIFAR_CLASSES = 10


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as uint8 (N, 3, 32, 32) images and int64 labels."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path).load()
    except _Refused as refusal:
        raise DataError(f"{path}: {refusal}; not a CIFAR-10 python batch") from None
    except Exception as error:  # a malformed pickle can fail in many ways; all mean "bad file"
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {str(error)[:100]})") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected b'data' as a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < CIFAR_CLASSES for v in labels
    ):
        raise DataError(f"{path}: expected b'labels' as a list of {len(data)} ints in [0, {CIFAR_CLASSES - 1}]")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)
