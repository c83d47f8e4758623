"""Starts the confirmation's workers in the search's tail (a Ray Tune callback).

The workers (panel_workers.py) import torch and the engine for seconds before they can
walk a pack; started when the search has no lineage left to start, that import overlaps
the search's last lineages instead of following them, and the selection runs already
certain start on them ahead of their panel.
"""

from __future__ import annotations

from typing import Any, Callable

from ray import tune

from lth_search.search.panel_workers import Panel, PanelWorkers

AheadPanel = Callable[[list[str], int], "Panel | None"]
"""(ended trial ids, lineages still running) -> the runs of the next panel known already."""


class WarmPanels(tune.Callback):
    """Starts the confirmation's workers in the search's tail, and on them the selection runs
    already certain; stops them if a lineage must run again.

    The tail: every lineage of the budget has started and one has ended, so a slot is free
    and no new lineage will want it. The runs started then are the default recipe's and
    those of the recipes that stay among the candidates whatever the running lineages do
    (runs/confirmation.py `certain_candidates`): on the quickstart's two slots, the default
    and the two best while the last lineage runs. They used to wait for that lineage, one
    slot idle meanwhile (only the selection seeds' dense stages were trained ahead). A trial
    that Tune recovers after a failure wants a slot again: the workers are stopped until the
    tail comes back.
    """

    def __init__(self, workers: PanelWorkers, budget: int, search_id: str, ahead: AheadPanel) -> None:
        self.workers = workers
        self.budget = budget
        self.search_id = search_id
        self.ahead = ahead
        self.tail = False

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if len(trials) >= self.budget and not any(t.status == "PENDING" for t in trials):
            self.tail = True
            self.workers.warm()
            self._start_ahead(trials, trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """A worker that has started since the last step takes runs ahead now. It used to wait for
        the next round a running lineage reported: seconds of a free core on the quickstart, a
        round's length, between the worker's imports and its first run ahead."""
        if self.tail:
            self._start_ahead(trials, None)

    def _start_ahead(self, trials: list, ended_now: Any) -> None:
        if not self.workers.started_idle():
            return
        ended = [t.trial_id for t in trials if t is ended_now or t.status in ("TERMINATED", "ERROR")]
        panel = self.ahead(ended, len(trials) - len(ended))
        if panel is not None:
            self.workers.start_ahead(panel, self.search_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tail = False
        self.workers.close()
