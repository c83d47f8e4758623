"""MLflow tracking (interface stub: the implementation is being written).

The search driver opens a `SearchTracker` (experiment + parent run) before trials start;
each trial opens a `TrialTracker` (child run). No method ever raises into a lineage:
MLflow failures are retried, then reported and left for `lth-search sync`.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import ExperimentConfig


class SearchTracker:
    def __init__(self, cfg: ExperimentConfig, parent_run_id: str | None = None):
        self.cfg = cfg
        self.parent_run_id = parent_run_id

    @classmethod
    def start(cls, cfg: ExperimentConfig, ray_results_path: str | None = None, parent_run_id: str | None = None) -> "SearchTracker":
        return cls(cfg, parent_run_id)

    def finish(self, records: list[dict[str, Any]]) -> None:
        pass


class TrialTracker:
    def __init__(self, cfg: ExperimentConfig, parent_run_id: str | None, trial_id: str, choices: dict[str, Any]):
        self.cfg = cfg

    @classmethod
    def start(cls, cfg: ExperimentConfig, parent_run_id: str | None, trial_id: str, choices: dict[str, Any]) -> "TrialTracker":
        return cls(cfg, parent_run_id, trial_id, choices)

    def log_dense(self, result: Any, dense_entry: Any) -> None:
        pass

    def log_round(self, round_result: Any, entry: Any) -> None:
        pass

    def finish(self, result: Any) -> None:
        pass


def log_lineage(cfg: ExperimentConfig, lineage: Any, result: Any, progress: Callable[[str], None] = print) -> None:
    pass


def sync_search(name: str, output_dir: str = "./lth_runs", tracking_uri: str | None = None, progress: Callable[[str], None] = print) -> None:
    pass
