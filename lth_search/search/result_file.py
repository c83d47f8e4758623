"""Tune's result.json per trial: one row per reported round, whatever restarted the trial.

The automatic loggers are off (console.py `use_console`: their TensorBoard hint and CSV
files), but results stay readable per trial through Ray's own JSON writer, with one change
to what it does when a trial restarts from a checkpoint. Ray then copies result.json back
from storage over the driver's copy. Storage gets the driver's copy only when Ray syncs
(ray_storage.py), so two things went wrong:

- a worker killed just after its round-1 report: storage had not yet been sent row 1, the
  copy back dropped it, and the trial's rows read [2, 3] (CI; the killed-worker test now
  empties storage's copy to make the case certain, and Ray's writer fails it);
- a round's row twice after a killed driver resumed (once in ~8 local runs of the
  killed-driver test, not made certain): a driver killed after writing round c+1's row but
  before registering its checkpoint leaves storage with the row, and the resumed trial
  reports round c+1 again.

So a restarted trial keeps the driver's copy when the driver has one (it holds every row the
driver saw; a resumed driver has none and takes storage's, as Ray does), and the rows after
the round of the checkpoint it restarts from are dropped, because the trial reports those
rounds again (search/trainable.py). Every row carries its `attempt`, so which attempt reported
a round stays readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.logger import JsonLoggerCallback

from lth_search.search.ray_storage import PARTIAL_SUFFIX


def result_files() -> list[tune.Callback]:
    """The result.json writer for every Tuner of a search."""
    return [RoundRows()]


class RoundRows(JsonLoggerCallback):
    """Ray's JSON writer, with the restart rule of the module docstring (Ray's hook for the copy
    back is private, `_restore_from_remote`; tests/test_search_distributed.py holds it to it)."""

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        local = Path(trial.local_path, file_name)
        if not local.exists():
            super()._restore_from_remote(file_name, trial)
        checkpoint = trial.latest_checkpoint_result
        last = (checkpoint.metrics or {}).get("round") if checkpoint is not None else None
        if isinstance(last, int) and local.exists():
            keep_rows_up_to(local, last)


def keep_rows_up_to(path: Path, last_round: int) -> None:
    """Rewrite a result.json without the rows of rounds after `last_round` (and without a row
    cut short by a killed driver); untouched when nothing goes. Replaced whole, never half."""
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _kept(line, last_round)]
    if len(kept) == len(lines):
        return
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    partial.write_text("".join(f"{line}\n" for line in kept))
    os.replace(partial, path)


def _kept(line: str, last_round: int) -> bool:
    """Whether a row stays: a readable row of a round up to `last_round`, or one that names no round."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    if not isinstance(row, dict):
        return False
    value = row.get("round")
    return value is None or (isinstance(value, (int, float)) and value <= last_round)
