"""The search objective: matching sparsity, selected on the validation split.

A round "matches" when its validation accuracy is within `tolerance` of the dense
network's. A lineage's score is the highest sparsity among its matching rounds so far
(ties: higher val accuracy), 0.0 when none matches (the dense network trivially does).
Because the score only ever looks at completed rounds, it is fair at any round: ASHA
can compare lineages stopped at equal compute, and a lineage stopped early is told to
Optuna with a value it really earned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol


class _RoundLike(Protocol):
    round: int
    sparsity: float
    val_accuracy: float


@dataclass(frozen=True)
class Matching:
    """The best matching round so far (round 0 stands for the dense network)."""

    sparsity: float
    val_accuracy: float
    round: int


def is_matching(val_accuracy: float, dense_val_accuracy: float, tolerance: float) -> bool:
    # The epsilon absorbs float noise in accuracies that are ratios of the same split size.
    return val_accuracy >= dense_val_accuracy - tolerance - 1e-12


def matching(dense_val_accuracy: float, rounds: Iterable[_RoundLike], tolerance: float) -> Matching:
    """The sparsest round whose val accuracy is within `tolerance` of dense (ties: better val)."""
    best = Matching(0.0, dense_val_accuracy, 0)
    for item in rounds:
        if not is_matching(item.val_accuracy, dense_val_accuracy, tolerance):
            continue
        if (item.sparsity, item.val_accuracy) > (best.sparsity, best.val_accuracy):
            best = Matching(item.sparsity, item.val_accuracy, item.round)
    return best
