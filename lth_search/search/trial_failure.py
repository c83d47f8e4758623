"""Why a trial failed, in one line, and the failures that stop the whole search.

Ray keeps a failed trial's error as text (`error.txt` in the trial's folder: the remote
traceback, or an ActorDiedError's account of a dead worker) and prints it as a 20-line
traceback by default. A person needs one line: what happened and whether Ray retries.
The text is read, never the pickled copy beside it (a rule of the store and tracking:
nothing is unpickled from what a run left on disk).

Some failures are not the trial's: a store that cannot be written (disk full, read-only),
a data set or config that every trial reads the same way. Retrying them trial after trial
prints the same error dozens of times and then "finishes" a search in which nothing ran.
`SearchFailure` stops the search at the first one instead, the way Ctrl-C does: Tune's own
interrupt (SIGUSR1, which `tune.run` handles like SIGINT) snapshots every trial as it is,
so `lth-search resume` continues the search once the cause is fixed. Tune has no public
call for that interrupt from a callback; its Stopper would mark the running trials
TERMINATED, and a resumed search never reruns a terminated trial.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

from ray import tune

from lth_search import errors

_LTH_ERROR = re.compile(r"^lth_search\.errors\.(\w+): (.+)$", re.MULTILINE)
_LAST_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Failure|Interrupt)): ?(.*)$", re.MULTILINE)
_WORKER_EXIT = re.compile(r"Worker exit detail: ([^.]+)")
SEARCH_WIDE = (errors.StoreError, errors.ConfigError, errors.DataError)
"""Errors every trial would hit the same way (StoreFailure is a StoreError)."""


def error_text(trial: Any) -> str:
    """The latest failure Ray recorded for `trial` (the text after its last "Failure #" header)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""
    return text.rsplit("Failure # ", 1)[-1]


def search_wide(text: str) -> str | None:
    """The message of a failure that every trial would hit (a store, data or config error), or None."""
    found = _LTH_ERROR.findall(text)
    if not found:
        return None
    name, message = found[-1]
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, SEARCH_WIDE):
        return message.strip()
    return None


def reason(text: str, limit: int = 200) -> str:
    """One line saying why a trial failed: a dead worker's exit detail, or its error's last line."""
    if "ActorDiedError" in text or "actor died" in text.lower():
        detail = _WORKER_EXIT.search(text)
        return f"its worker process died: {detail.group(1).strip() if detail else 'killed or crashed'}"[:limit]
    lth = _LTH_ERROR.findall(text)
    if lth:
        return lth[-1][1].strip()[:limit]
    found = _LAST_ERROR_LINE.findall(text)
    if found:
        name, message = found[-1]
        return f"{name}: {message.strip()}"[:limit] if message.strip() else name
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(occurred")]
    return lines[-1][:limit] if lines else "no error text was kept"


class SearchFailure(tune.Callback):
    """Stops the search at the first failure every trial would hit, and keeps its one-line message.

    Holds only a string: Ray pickles callbacks into its experiment state.
    """

    def __init__(self) -> None:
        self.message: str | None = None

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        if self.message is not None:
            return
        message = search_wide(error_text(trial))
        if message is None:
            return
        self.message = message
        # Tune's interrupt handler is installed only when tune.run runs on the main thread;
        # elsewhere SIGUSR1's default action would kill the process, so the search runs on
        # (its trials fail) and the driver still reports this message at the end.
        handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if callable(handler):
            os.kill(os.getpid(), signal.SIGUSR1)
