"""Small JSON records kept beside the stages (e.g. which stages each search trial walked).

Stages say *what* was computed; records say *who needed it*: a search trial writes its
choices and stage keys after every round, so `lth-search sync` and summaries can rebuild
a search from the store alone, on any node. Records live under `records/<namespace>/`
of the store root and are replaced atomically (written aside, then moved: a rename, or
an object copy on object stores). They are JSON, never pickles.
"""

from __future__ import annotations

import json
import pyarrow.fs as pafs

from lth_search.config.names import check_name
from lth_search.errors import StoreError
from lth_search.store.uri import replace_file


def check_record_name(name: object, what: str) -> str:
    """A namespace or record name that cannot leave its folder (names.py: no '/', no leading '.')."""
    return check_name(name, f"record {what}", StoreError)


def records_namespace(search_name: str, role: str = "search") -> str:
    """Where a search's trial records live in the store: `search-<name>` for its trials,
    `confirm-<name>` for its confirmation runs."""
    return f"{role}-{search_name}"


def write_record(filesystem: pafs.FileSystem, root: str, namespace: str, name: str, payload: dict) -> None:
    """Replace the record `namespace/name` with `payload` (JSON) atomically.

    A failed write (disk full, read-only) leaves the old record and no staging file, and
    raises StoreFailure. NaN and infinity are kept (Python's JSON reads them back): a
    diverged lineage's loss is what its record must say, as its stages' manifests do.
    """
    data = json.dumps(payload, sort_keys=True, allow_nan=True).encode()
    replace_file(filesystem, _record_path(root, namespace, name), data, f"record {namespace}/{name} in {root}")


def read_record(filesystem: pafs.FileSystem, root: str, namespace: str, name: str) -> dict | None:
    """One record (None when it does not exist or cannot be read right now)."""
    path = _record_path(root, namespace, name)
    try:
        with filesystem.open_input_stream(path) as stream:
            record = json.loads(stream.read())
    except (OSError, ValueError):  # absent (FileNotFoundError is an OSError) or damaged
        return None
    return record if isinstance(record, dict) else None


def _folder(root: str, namespace: str) -> str:
    return f"{root.rstrip('/')}/records/{check_record_name(namespace, 'namespace')}"


def _record_path(root: str, namespace: str, name: str) -> str:
    return f"{_folder(root, namespace)}/{check_record_name(name, 'name')}.json"


def read_records(
    filesystem: pafs.FileSystem, root: str, namespace: str, unreadable: list[str] | None = None
) -> dict[str, dict]:
    """Every record of a namespace by name ({} when there is none).

    A record that cannot be read (or is not a JSON object) is left out and its name is
    appended to `unreadable`, so a caller that must see every record (`sync`) can say so
    instead of reporting "up to date". Records are replaced by a move, so a reader never
    sees half of one; a record that fails twice is damaged, not busy.
    """
    folder = _folder(root, namespace)
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    records: dict[str, dict] = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        name = info.base_name[: -len(".json")]
        for attempt in range(2):
            try:
                with filesystem.open_input_stream(info.path) as stream:
                    record = json.loads(stream.read())
                if isinstance(record, dict):
                    records[name] = record
                    break
            except FileNotFoundError:
                break  # deleted meanwhile
            except (OSError, ValueError):
                pass
        else:
            if unreadable is not None:
                unreadable.append(name)
    return records
