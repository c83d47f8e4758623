"""Ray's saved search state, kept whole across a killed driver.

Tune saves a search's state (`experiment_state-*.json`, the searcher's
`searcher-state-*.pkl`, the generator's `search_gen_state-*.json`) by overwriting those
files in place, so a driver killed during the write leaves one empty or cut short.
`Tuner.restore` then logs "Failed to restore the run state" and quietly starts the
experiment over, which loses every trial it knew. Ray has no option for atomic state
writes, so this module keeps its own copy: after each trial event the driver copies the
state files, when every one of them is whole, into `.lth-last-whole/` beside them
(`StateKeeper`), and `repair` puts that copy back before a resume when Ray's newest is
damaged. The copy lags Ray's by at most one event; the store makes that cheap, since a
trial Ray restarts from an older checkpoint fetches its stored rounds instead of
training them.

Wholeness is checked without running anything: the JSON must parse, a pickle must reach its
STOP opcode under `pickletools.genops`, which reads opcodes and never builds objects.
"""

from __future__ import annotations

import fnmatch
import json
import pickletools
from typing import Any, Callable

import pyarrow.fs as pafs
from ray import tune

from lth_search.errors import RuntimeFailure
from lth_search.store.uri import pyarrow_location

STATE_PATTERNS = ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")
"""Tune's files of one session's search state (tune_controller.py, searcher.py)."""
BACKUP_DIR = ".lth-last-whole"
DAMAGED_DIR = ".lth-damaged"


def _location(results_path: str) -> tuple[pafs.FileSystem, str]:
    path, filesystem = pyarrow_location(results_path)
    if filesystem is None:
        filesystem, path = pafs.FileSystem.from_uri(path)
    return filesystem, path.rstrip("/")


def _state_files(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Names of Tune's state files directly in `folder` (none if it does not exist)."""
    infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    names = [info.base_name for info in infos if info.type == pafs.FileType.File]
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in STATE_PATTERNS))


def _session(name: str) -> str:
    """The Tune session a state file belongs to (`experiment_state-<session>.json`)."""
    for pattern in STATE_PATTERNS:
        prefix, suffix = pattern.split("*")
        if name.startswith(prefix) and name.endswith(suffix):
            return name[len(prefix):-len(suffix)]
    return name


def _read(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def _write(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write through a temporary name and move it into place: a reader never sees half a file."""
    partial = f"{path}.partial"
    with filesystem.open_output_stream(partial) as stream:
        stream.write(data)
    filesystem.move(partial, path)


def is_whole(name: str, data: bytes) -> bool:
    """Whether a state file's bytes are complete: JSON that parses, a pickle that reaches STOP.

    Only the experiment state is JSON; the other two are pickles (`search_gen_state-*.json`
    too, whatever its name says).
    """
    try:
        if name.startswith("experiment_state-"):
            json.loads(data)
        else:
            ops = list(pickletools.genops(data))
            if not ops or ops[-1][0].name != "STOP":
                return False
    except ValueError:  # json.JSONDecodeError, and genops on a cut or foreign stream
        return False
    return bool(data)


class StateKeeper(tune.Callback):
    """Copies Ray's state files into `.lth-last-whole/` after each trial event, when whole.

    Ray pickles callbacks into its own state, so this holds only the results path; the
    last copied bytes are kept to skip identical copies and dropped from the pickle.
    """

    def __init__(self, results_path: str) -> None:
        self.results_path = results_path
        self._copied: dict[str, bytes] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_copied": {}}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.keep()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.keep()

    def keep(self) -> None:
        """Copy the current state files if every one is whole; a half-written one skips this turn."""
        try:
            filesystem, folder = _location(self.results_path)
            files = {name: _read(filesystem, f"{folder}/{name}") for name in _state_files(filesystem, folder)}
            if not any(n.startswith("experiment_state-") for n in files):
                return
            if not all(is_whole(name, data) for name, data in files.items()) or files == self._copied:
                return
            filesystem.create_dir(f"{folder}/{BACKUP_DIR}", recursive=True)
            for name, data in files.items():
                if self._copied.get(name) != data:
                    _write(filesystem, f"{folder}/{BACKUP_DIR}/{name}", data)
            self._copied = files
        except OSError:  # the copy is a safety net: a failed turn must not stop the search
            return


def repair(results_path: str, progress: Callable[[str], None]) -> None:
    """Before `Tuner.restore`: set damaged state files aside and put the last whole copy back.

    Raises RuntimeFailure when Ray's state is damaged and no whole copy exists, since
    Tune would otherwise start the search over and drop every trial it knew.
    """
    filesystem, folder = _location(results_path)
    damaged = [n for n in _state_files(filesystem, folder) if not is_whole(n, _read(filesystem, f"{folder}/{n}"))]
    if not damaged:
        return
    backup = f"{folder}/{BACKUP_DIR}"
    kept = {n: _read(filesystem, f"{backup}/{n}") for n in _state_files(filesystem, backup)}
    kept = {n: data for n, data in kept.items() if is_whole(n, data)}
    # a session's files go together: Tune restores the newest of each kind by name, and a
    # searcher newer than the experiment state would not match it
    sessions = {_session(n) for n in damaged}
    aside = [n for n in _state_files(filesystem, folder) if _session(n) in sessions]
    usable = [n for n in [*kept, *_state_files(filesystem, folder)] if n not in aside or n in kept]
    if not any(n.startswith("experiment_state-") for n in usable):
        raise RuntimeFailure(
            f"Ray's saved state {folder}/{damaged[0]} is cut short (the driver died while writing it) and no "
            f"whole copy is in {backup}; start the search again with `lth-search run` (stored stages are reused)"
        )
    filesystem.create_dir(f"{folder}/{DAMAGED_DIR}", recursive=True)
    for name in aside:
        filesystem.move(f"{folder}/{name}", f"{folder}/{DAMAGED_DIR}/{name}")
    present = set(_state_files(filesystem, folder))
    for name, data in kept.items():
        if name not in present:
            _write(filesystem, f"{folder}/{name}", data)
    progress(f"Ray's saved state {', '.join(damaged)} was cut short when the driver died; "
             f"resuming from its last whole copy (the damaged session's files are in {DAMAGED_DIR}/)")
