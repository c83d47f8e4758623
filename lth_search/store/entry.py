"""One stage entry and its bytes: the record a stage produces, the files and the signed manifest.

A stage's output (`StageEntry`: metrics, named weight sets, named masks) is stored as
safetensors and Parquet files (codec.py) plus ``manifest.json``, which makes the entry
exist. The manifest holds format, key, kind, inputs, metrics, created_at, code_version,
provenance (torch version, device type, dtype),
``files: {filename: {sha256, bytes}}`` and a ``checksum`` (sha256 of the canonical JSON
of all other fields), so every byte of an entry is verified when read. Anything that
fails verification raises `Corrupt`, which the store (stages.py) treats as absent.

This module knows no filesystem: it turns an entry into bytes and bytes back into an
entry; where those bytes live, and how they are published atomically, is stages.py.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Callable

import torch

from lth_search.errors import StoreError
from lth_search.store.codec import (
    Mask,
    decode_manifest,
    decode_mask,
    decode_weights,
    encode_manifest,
    encode_mask,
    encode_weights,
)
from lth_search.store.content_keys import check_key

FORMAT = 1
"""Manifest format version; a reader refuses entries from a newer format."""
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KIND_RE = re.compile(r"^[a-z_]{1,32}$")
_FILE_RE = re.compile(r"^(?:weights_([A-Za-z0-9_.-]{1,64})\.safetensors|mask_([A-Za-z0-9_.-]{1,64})\.parquet)$")


@dataclass
class StageEntry:
    """One stage's output: metrics, named weight sets and named masks."""

    key: str
    kind: str
    inputs: dict
    metrics: dict
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    masks: dict[str, Mask] = field(default_factory=dict)
    created_at: str = ""
    code_version: str = ""
    provenance: dict[str, str] = field(default_factory=dict)
    """How the stage was computed: torch version, device type, dtype (engine/lineage/keys.py
    `provenance`); one key stores one result per (device type, dtype)."""
    encoded: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    """The entry's files as the store wrote or read them (entries of at most `ENCODED_KEPT_BYTES`):
    who copies a weight set or a mask elsewhere (MLflow's artifacts) takes these bytes instead of
    encoding the tensors a second time (`weights_file`, `mask_file`)."""

    def weights_file(self, name: str) -> bytes:
        """The weight set `name` as a safetensors file: the stored bytes."""
        return self.encoded.get(_weights_filename(name)) or encode_weights(self.weights[name])

    def mask_file(self, name: str) -> bytes:
        """The mask `name` as a Parquet file: the stored bytes."""
        return self.encoded.get(_mask_filename(name)) or encode_mask(self.masks[name])


ENCODED_KEPT_BYTES = 64 * 2**20
"""An entry keeps its encoded files (`StageEntry.encoded`) up to this size: a tiny lineage's
tracking re-encoded what the store had just encoded (~3 % of its fixed cost), while a large
network's bytes would double what its entries hold in memory for an encoding that costs little
beside its training."""


def _weights_filename(name: str) -> str:
    return f"weights_{_check_name(name, 'weight set')}.safetensors"


def _mask_filename(name: str) -> str:
    return f"mask_{_check_name(name, 'mask')}.parquet"


def _kept(files: dict[str, bytes]) -> dict[str, bytes]:
    return files if sum(len(data) for data in files.values()) <= ENCODED_KEPT_BYTES else {}


Check = Callable[[StageEntry], "str | None"]
"""What a caller needs of an entry: None if it has it, else what is missing (see `StageStore.get`)."""


class Corrupt(Exception):
    """An entry failed verification; the message names the file."""


# Writing ----------------------------------------------------------------------------------
def encode_entry(entry: StageEntry) -> dict[str, bytes]:
    """The entry's files by name, the signed manifest among them.

    Checks the key and every name first (nothing is encoded for a bad one), then fills
    `entry.created_at` and `entry.code_version`, which the manifest records.
    """
    files = _encode_files(entry)
    entry.created_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    entry.code_version = _code_version()
    files[MANIFEST] = encode_manifest(_manifest_body(entry, files))
    entry.encoded = _kept(files)
    return files


def _encode_files(entry: StageEntry) -> dict[str, bytes]:
    check_key(entry.key)
    if not isinstance(entry.kind, str) or not _KIND_RE.fullmatch(entry.kind):
        raise StoreError(f"invalid stage kind {entry.kind!r}: expected 1-32 lowercase letters or '_'")
    files = {_weights_filename(n): encode_weights(s) for n, s in entry.weights.items()}
    files.update({_mask_filename(n): encode_mask(m) for n, m in entry.masks.items()})
    return files


def _manifest_body(entry: StageEntry, files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "key": entry.key,
        "kind": entry.kind,
        "inputs": entry.inputs,
        "metrics": entry.metrics,
        "created_at": entry.created_at,
        "code_version": entry.code_version,
        "provenance": entry.provenance,
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError(f"invalid {what} name {name!r}: expected 1-64 letters, digits, '_', '.' or '-'")
    return name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _code_version() -> str:
    """The installed package's version, read once per process (importlib.metadata scans the
    installed distributions at every call: ~0.5 ms a stage)."""
    try:
        return metadata.version("lth-search")
    except metadata.PackageNotFoundError:
        return "unknown"


# Reading ----------------------------------------------------------------------------------
def decode_entry(key: str, manifest_bytes: bytes, read: Callable[[str], bytes | None]) -> StageEntry:
    """The entry whose manifest is `manifest_bytes`, each file `read(filename)` (None: missing)
    and verified against the manifest; Corrupt at the first file that is not as signed."""
    manifest = _parse_manifest(key, manifest_bytes)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    masks: dict[str, Mask] = {}
    files = {MANIFEST: manifest_bytes}
    for filename, expected in manifest["files"].items():
        data = files[filename] = read(filename)  # type: ignore[assignment]
        _verify_file(filename, data, expected)
        weights_name, mask_name = _FILE_RE.fullmatch(filename).groups()  # type: ignore[union-attr]
        try:
            if weights_name is not None:
                weights[weights_name] = decode_weights(data)  # type: ignore[arg-type]
            else:
                masks[mask_name] = decode_mask(data)  # type: ignore[arg-type]
        except ValueError as error:
            raise Corrupt(f"{filename}: {error}") from None
    return StageEntry(
        key=key,
        kind=manifest["kind"],
        inputs=manifest["inputs"],
        metrics=manifest["metrics"],
        weights=weights,
        masks=masks,
        created_at=manifest["created_at"],
        code_version=manifest["code_version"],
        provenance={str(k): str(v) for k, v in manifest.get("provenance", {}).items()}
        if isinstance(manifest.get("provenance"), dict) else {},
        encoded=_kept(files),
    )


_MANIFEST_FIELDS = {"format": int, "key": str, "kind": str, "inputs": dict, "metrics": dict, "created_at": str,
                    "code_version": str, "files": dict}


def _parse_manifest(key: str, data: bytes) -> dict[str, Any]:
    """The manifest, verified against its own checksum, then its format, fields and key.

    The checksum comes first: every format signs the same way (sha256 of the canonical
    JSON of the other fields), so a flipped bit in `format` is corruption to recompute,
    not a permanent "upgrade lth-search". A manifest whose checksum holds but whose fields
    do not (re-signed by hand or by a bug) is corrupt too, never a KeyError.
    """
    try:
        manifest = decode_manifest(data)
    except ValueError as error:
        raise Corrupt(f"{MANIFEST}: {error}") from None
    fmt = manifest.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
        raise StoreError(f"stage {key} was written by a newer lth-search (format {fmt}); upgrade lth-search")
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            raise Corrupt(f"{MANIFEST}: field {name!r} missing or not a {kind.__name__}")
    if manifest["key"] != key:
        raise Corrupt(f"{MANIFEST}: names key {manifest['key'][:80]!r}")
    for filename, expected in manifest["files"].items():
        if not _FILE_RE.fullmatch(filename):
            raise Corrupt(f"{MANIFEST}: unexpected file name {filename[:80]!r}")
        if not (isinstance(expected, dict) and isinstance(expected.get("sha256"), str)
                and isinstance(expected.get("bytes"), int)):
            raise Corrupt(f"{MANIFEST}: no sha256 and size for {filename}")
    return manifest


def _verify_file(filename: str, data: bytes | None, expected: dict[str, Any]) -> None:
    if data is None:
        raise Corrupt(f"{filename}: missing")
    if len(data) != expected["bytes"] or _sha256(data) != expected["sha256"]:
        raise Corrupt(f"{filename}: sha256 mismatch ({len(data)} bytes, {expected['bytes']} expected)")
