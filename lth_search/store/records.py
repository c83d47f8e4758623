"""Small JSON records kept beside the stages (e.g. which stages each search trial walked).

Stages say *what* was computed; records say *who needed it*: a search trial writes its
choices and stage keys after every round, so `lth-search sync` and summaries can rebuild
a search from the store alone, on any node. Records live under `records/<namespace>/`
of the store root and are replaced atomically (written aside, then moved: a rename, or
an object copy on object stores). They are JSON, never pickles.
"""

from __future__ import annotations

import json
import re
import uuid

import pyarrow.fs as pafs

from lth_search.errors import StoreError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_record_name(name: object, what: str) -> str:
    """A namespace or record name that cannot leave its folder (no '/', no leading '.')."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(f"record {what} {name!r} is invalid: use 1-128 letters, digits, '_', '.', '-'")
    return name


def records_namespace(search_name: str, role: str = "search") -> str:
    """Where a search's trial records live in the store: `search-<name>` for its trials,
    `confirm-<name>` for its confirmation runs."""
    return f"{role}-{search_name}"


def write_record(filesystem: pafs.FileSystem, root: str, namespace: str, name: str, payload: dict) -> None:
    """Replace the record `namespace/name` with `payload` (JSON) atomically."""
    folder = _folder(root, namespace)
    path = _record_path(root, namespace, name)
    data = json.dumps(payload, sort_keys=True).encode()
    filesystem.create_dir(folder, recursive=True)
    staging = f"{path}.{uuid.uuid4().hex}.tmp"  # a move is a rename (or an object copy): readers never see half
    with filesystem.open_output_stream(staging) as stream:
        stream.write(data)
    filesystem.move(staging, path)


def read_record(filesystem: pafs.FileSystem, root: str, namespace: str, name: str) -> dict | None:
    """One record (None when it does not exist or cannot be read right now)."""
    path = _record_path(root, namespace, name)
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):  # absent (FileNotFoundError is an OSError) or being replaced
        return None


def _folder(root: str, namespace: str) -> str:
    return f"{root.rstrip('/')}/records/{check_record_name(namespace, 'namespace')}"


def _record_path(root: str, namespace: str, name: str) -> str:
    return f"{_folder(root, namespace)}/{check_record_name(name, 'name')}.json"


def read_records(filesystem: pafs.FileSystem, root: str, namespace: str) -> dict[str, dict]:
    """Every record of a namespace by name ({} when there is none); unreadable ones are skipped."""
    folder = _folder(root, namespace)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    records: dict[str, dict] = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with filesystem.open_input_stream(info.path) as stream:
                records[info.base_name[: -len(".json")]] = json.loads(stream.read())
        except (OSError, ValueError):
            continue  # a record being replaced right now; the next read sees it
    return records
