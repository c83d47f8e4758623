"""What a run has yet to send to MLflow, sent in a few requests at a time.

Every MLflow request is a database transaction (on sqlite a commit with its fsync, on a
server a round trip). A tiny lineage logged its params, config, dense stage, rewind
weights, data set, each round's metrics and files, its summary and its end in ~12
requests: at thousands of lineages that was more of a slot's time than their training
(issue 24). So a trial's run queues what it logs and sends it at most every
`tracking.flush_s` seconds and at its end (trial_run.py): a lineage of long rounds still
shows each round as it ends, a tiny one sends everything in one upload, one `log_batch`
and one data-set input.

Which part of a flush succeeded decides what the run's `RunState` records as logged; a part
that failed stays unlogged, so a retry or `lth-search sync` logs it from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from lth_search.tracking.client import MlflowIO
from lth_search.tracking.layout import COMPLETE

Part = Literal["values", "files", "inputs"]


@dataclass
class PendingLog:
    """Metrics, params and tags (one `log_batch`), artifacts (one upload) and the data set's input,
    with what to record once each part is sent."""

    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    inputs: Callable[[], None] | None = None
    """Logs the data set as the run's input (MLflow's own request)."""
    complete: bool = False
    """Mark the run complete (`lth.complete`) with the values when nothing of it was missed before
    them: the run's end sends its status tags in its last `log_batch`, not in one of their own."""
    sent: list[tuple[Part, Callable[[], None]]] = field(default_factory=list)
    """(part, update): applied when that part was sent."""
    what: list[str] = field(default_factory=list)
    """What it holds (the dense stage, round 2, ...), for the warning when sending fails."""

    def add(self, what: str, part: Part, on_sent: Callable[[], None] | None = None) -> None:
        """Note that `what` is queued in `part`, and what to record once it is sent."""
        self.what.append(what)
        if on_sent is not None:
            self.sent.append((part, on_sent))

    def empty(self) -> bool:
        return not (self.metrics or self.params or self.tags or self.files or self.inputs is not None)

    def send(self, io: MlflowIO, run_id: str, owner: str, artifact_uri: str | None = None) -> None:
        """Send every part (the files, the values, the data set), then record what each part that
        was sent holds; empties itself either way. Never raises (MlflowIO.call)."""
        if self.empty():
            return
        label = f"{', '.join(dict.fromkeys(self.what))} of {owner}"
        done: set[Part] = set()
        if self.files and io.call(f"upload {label}", lambda: io.log_files(run_id, self.files, artifact_uri))[0]:
            done.add("files")
        if self.inputs is not None and io.call(f"log the data set of {owner}", self.inputs)[0]:
            done.add("inputs")
        if self.complete and not io.missed:  # the values go last: every other part of the run is in
            self.tags[COMPLETE] = "1"
        if (self.metrics or self.params or self.tags) and io.call(
                f"log {label}", lambda: io.log_batch(run_id, self.metrics, self.params, self.tags))[0]:
            done.add("values")
        for part, update in self.sent:
            if part in done:
                update()
        self.__init__()  # type: ignore[misc]
