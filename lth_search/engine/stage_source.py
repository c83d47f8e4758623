"""What the engine needs of a stage store: `get_or_compute`, and an in-memory one.

The engine never imports a concrete store backend's machinery beyond the `StageEntry`
record: a lineage takes any object with `get_or_compute` (store/stages.py `StageStore`
on a filesystem, `MemoryStages` when none is given), so the engine runs and is tested
without a filesystem, Ray or MLflow.
"""

from __future__ import annotations

from typing import Callable, Protocol

from lth_search.store.entry import Check, StageEntry


class StageSource(Protocol):
    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Check | None = None
    ) -> tuple[StageEntry, bool]: ...


class MemoryStages:
    """The store used when none is given: stages are kept for this process only."""

    def __init__(self) -> None:
        self._entries: dict[str, StageEntry] = {}

    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Check | None = None
    ) -> tuple[StageEntry, bool]:
        if key in self._entries:
            return self._entries[key], True
        self._entries[key] = compute()
        return self._entries[key], False


DENSE_METRICS = ("val_accuracy", "test_accuracy", "train_loss", "train_steps_per_s", "steps")
ROUND_METRICS = (*DENSE_METRICS, "sparsity", "layer_sparsity")


def needs(weights: list[str], masks: list[str], metrics: tuple[str, ...]) -> Check:
    """A store check for a stage of which the caller reads these weights, masks and metrics."""

    def check(entry: StageEntry) -> str | None:
        missing = [f"weights {w}" for w in weights if w not in entry.weights]
        missing += [f"mask {m}" for m in masks if m not in entry.masks]
        missing += [f"metric {m}" for m in metrics if m not in entry.metrics]
        return f"lacks {', '.join(missing)}" if missing else None

    return check
