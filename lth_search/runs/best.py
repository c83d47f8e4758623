"""THE best ticket of a search: one definition, used by everything that names one.

The console and search.json (runs/summary.py), the confirmation's chosen trial, `lth-search
best`, `best_ticket()`, the parent run's `best_*` metrics and the registered `@best` model
(tracking/) all call `best_trial_ticket`, so they cannot name different tickets.

A trial's ticket is the last round of its unbroken matching run (the score the search
optimised, engine/lineage/objective.py), never the luckiest round on its own. The best
ticket is the trial ticket of highest sparsity (ties: the better val value of the search's
metric, higher accuracy or lower loss, then trial id, so every reader breaks ties alike), among the trials of the confirmed recipe when there
is one. A lineage whose dense network did not train has no ticket at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class TrialTicket:
    """A trial's ticket as the search judged it."""

    trial_id: str
    round: int
    """The last round of the unbroken matching run; 0 when no round matched (the dense network)."""
    sparsity: float
    val_accuracy: float
    choices: dict[str, Any] = field(default_factory=dict)
    failed: bool = False
    """The lineage's dense network did not train: never a ticket."""
    val_value: float | None = None
    """The val value of the lineage's metric (engine/lineage/metric.py); None: `val_accuracy`."""
    higher_is_better: bool = True
    """The metric's direction: accuracy up; loss and perplexity down."""

    @property
    def rank_value(self) -> float:
        """The val value as a tie-break where larger is better, whatever the metric's direction."""
        value = self.val_accuracy if self.val_value is None else self.val_value
        return value if self.higher_is_better else -value


def best_trial_ticket(tickets: Iterable[TrialTicket], recipe: dict[str, Any] | None = None,
                      trial_id: str | None = None) -> TrialTicket | None:
    """The best ticket among `tickets` (None when every lineage failed).

    `trial_id` (the confirmed trial a search recorded) or `recipe` (the confirmed recipe)
    narrows the pool to that trial or that recipe's trials when any of them is there.
    """
    pool = [t for t in tickets if not t.failed]
    if trial_id is not None:
        pool = [t for t in pool if t.trial_id == trial_id] or pool
    elif recipe is not None:
        pool = [t for t in pool if t.choices == recipe] or pool
    if not pool:
        return None
    return max(pool, key=_rank)


def ranked_trial_tickets(tickets: Iterable[TrialTicket], count: int) -> list[TrialTicket]:
    """The `count` best trial tickets, best first, in `best_trial_ticket`'s order (failed lineages left out)."""
    return sorted((t for t in tickets if not t.failed), key=_rank, reverse=True)[:count]


def _rank(ticket: TrialTicket) -> tuple[float, float, str]:
    return ticket.sparsity, ticket.rank_value, ticket.trial_id
