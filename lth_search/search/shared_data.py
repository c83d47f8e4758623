"""The search's data set: put in Ray's object store once, fetched once per worker process.

`tune.with_parameters` fetches every value it binds at every trial start. A `Dataset` holds
torch tensors, which Ray deserialises by copying them out of the object store: ~5 ms a
trial on MNIST-1D (1.7 % of a trial actor's samples in a 1,000-trial search of tiny
lineages, issue 24), and a fresh copy of every CIFAR-10 image for each of the hundreds of
trials one reused actor runs. Bound as a `SharedDataset` (the object's reference in a small
wrapper), the data set is fetched at a process's first trial and held for the next ones.

Safe to share because nothing writes into a data set's tensors: a lineage moves a split
with `Dataset.to` (a copy on another device) and reads batches by indexing (new tensors).
"""

from __future__ import annotations

import ray

from lth_search.engine.data import Dataset

_HELD: tuple[str, Dataset] | None = None
"""The data set this process fetched last, by its object's id: one search's trials share a
process (Ray's reused actors), so one is enough, and a new search's replaces it."""


class SharedDataset:
    """A data set in Ray's object store; `get()` fetches it once per process."""

    def __init__(self, dataset: Dataset) -> None:
        self.ref = ray.put(dataset)

    def get(self) -> Dataset:
        global _HELD
        key = self.ref.hex()
        if _HELD is None or _HELD[0] != key:
            _HELD = None  # the last search's data set goes before this one arrives
            _HELD = (key, ray.get(self.ref))
        return _HELD[1]
