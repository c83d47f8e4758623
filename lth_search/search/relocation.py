"""A search resumed from a copied or moved folder continues there, never in the old one.

`Tuner.restore(path)` follows a moved experiment folder for the trials it restores, but
two pickles it brings back still name the folder the search started in: the search
generator's `Experiment` (every *new* trial's storage: Ray would create their folders
and checkpoints in the old place) and the Optuna searcher (its journal, and the config
it reads trial records with). `RelocatedSearchGenerator` is the search algorithm of a
resumed Tuner: right after Ray restores its state it points both at the folder the
search is resumed in, the one search.json was found in (runs/saved_paths.py).

It also lowers the number of trials left by the trials that ended after Ray's last
snapshot (trial_status.py `ended_orphans`): Ray's restored count never had them, and
without this a resumed search ran and counted more lineages than its budget.
"""

from __future__ import annotations

import copy
from typing import Any

import optuna
from ray.train._internal.storage import StorageContext
from ray.tune.search import SearchGenerator, Searcher

from lth_search.config import ExperimentConfig
from lth_search.search.journal import journal_storage


class RelocatedSearchGenerator(SearchGenerator):
    """Ray's SearchGenerator whose restored state is pointed at `storage` and `journal`."""

    def __init__(self, searcher: Searcher, storage: StorageContext, cfg: ExperimentConfig, journal: str,
                 search_id: str) -> None:
        super().__init__(searcher)
        self._where, self._cfg, self._journal, self._search_id = storage, cfg, journal, search_id

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        experiment = self._experiment
        if experiment is not None:
            moved = copy.copy(experiment.storage)
            moved.storage_filesystem = self._where.storage_filesystem
            moved.storage_fs_path = self._where.storage_fs_path
            moved.experiment_dir_name = self._where.experiment_dir_name
            experiment.storage = moved
            experiment.spec["storage"] = moved
        relocate = getattr(self.searcher, "relocate", None)
        if relocate is not None:
            relocate(self._cfg, self._journal)
        adopt = getattr(self.searcher, "adopt_ended_orphans", None)
        if adopt is not None:  # trials that ended after the snapshot count against the budget
            self._total_samples = max(self._counter, self._total_samples - adopt(self._search_id))


def relocate_study(study: Any, journal: str) -> None:
    """Point a restored Optuna study (and the trials sharing its storage) at the journal `journal`."""
    storage = getattr(study, "_storage", None)
    if isinstance(storage, optuna.storages.JournalStorage):
        storage._backend = journal_storage(journal)._backend  # one storage object, shared by its trials


def relocated_search(tuner: Any, cfg: ExperimentConfig, journal: str, search_id: str) -> None:
    """Give a restored Tuner a search algorithm that continues in the folder it was restored from."""
    internal = tuner._local_tuner  # Tuner.restore has no public way to change what it restored
    run_config, tune_config = internal.get_run_config(), internal._tune_config
    searcher = tune_config.search_alg
    if isinstance(searcher, Searcher):
        where = StorageContext(storage_path=run_config.storage_path, experiment_dir_name=run_config.name,
                               storage_filesystem=run_config.storage_filesystem)
        tune_config.search_alg = RelocatedSearchGenerator(searcher, where, cfg, journal, search_id)
