"""The parent run of a search: created (or found again) once, before any trial starts.

Tag ``lth.role=search``; the config as params (dotted keys) and as ``config.json``; tags
``lth.search_name``, ``lth.store_uri``, ``lth.ray_results_path``. A resumed search finds
its parent run again by the Ray results path, so it continues one run instead of
starting another. What the parent run shows at the end (tickets table, summary plot and
metrics, the registered best ticket) is parent.py.

The experiment is created here, once, before any trial starts: trials creating it at
once race on the sqlite schema.
"""

from __future__ import annotations

import json
from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.tracking.client import MlflowIO, flatten
from lth_search.tracking.describe import run_description, source_tags
from lth_search.tracking.layout import CONFIG, RAY_RESULTS, ROLE, SEARCH_NAME
from lth_search.tracking.links import sync_hint


class SearchTracker:
    """The parent run of a search, opened by the driver before any trial starts."""

    def __init__(self, cfg: ExperimentConfig, io: MlflowIO | None = None, experiment: str | None = None,
                 parent_run_id: str | None = None, ray_results_path: str | None = None) -> None:
        self.cfg, self.io, self.experiment = cfg, io, experiment
        self.parent_run_id = parent_run_id
        self.ray_results_path = ray_results_path

    @classmethod
    def start(
        cls, cfg: ExperimentConfig, ray_results_path: str | None = None, parent_run_id: str | None = None
    ) -> "SearchTracker":
        """Create the experiment (once, here: sqlite schema races otherwise) and the parent run."""
        if not cfg.tracking.enabled:
            return cls(cfg)
        io = MlflowIO(cfg.tracking_uri(), sync_hint(cfg))
        tracker = cls(cfg, io, None, parent_run_id, ray_results_path)
        tracker.open()
        return tracker

    @property
    def missed(self) -> list[str]:
        return self.io.missed if self.io is not None else []

    def open(self) -> bool:
        """Whether experiment and parent run are known; creates (or finds) what is missing."""
        io = self.io
        if io is None:
            return False
        if self.experiment is None:
            ok, self.experiment = io.call("create the experiment", lambda: io.experiment_id(self.cfg.experiment_name()))
            if not ok:
                return False
        if self.parent_run_id is None and self.ray_results_path:  # created by an earlier start or sync
            ok, run = io.call("find the search run", lambda: io.find_run(self.experiment, {RAY_RESULTS: self.ray_results_path}))
            self.parent_run_id = run.info.run_id if ok and run is not None else None
        if self.parent_run_id is None:
            ok, run = io.call("create the search run", self._create)
            if not ok:
                return False
            self.parent_run_id = run.info.run_id
            io.call("log the search config", self._log_config)
        return True

    def _create(self) -> Any:
        tags = {
            ROLE: "search", SEARCH_NAME: self.cfg.name, "lth.store_uri": self.cfg.store_uri(),
            "lth.output_dir": str(self.cfg.output_path()), RAY_RESULTS: self.ray_results_path or "",
            **source_tags(), "mlflow.note.content": run_description(self.cfg, "search"),
        }
        return self.io.client.create_run(self.experiment, tags=tags, run_name=f"{self.cfg.name} search")

    def _log_config(self) -> None:
        self.io.log_values(self.parent_run_id, params=flatten(self.cfg.model_dump(mode="json")))
        config = json.dumps(self.cfg.model_dump(mode="json"), indent=2).encode()
        self.io.log_bytes(self.parent_run_id, config, CONFIG)

    def end(self, status: str = "FINISHED") -> None:
        if self.io is not None and self.parent_run_id is not None:
            self.io.call("end the search run", lambda: self.io.client.set_terminated(self.parent_run_id, status))

    def ensure_config(self) -> None:
        """Log the search config if the parent run lacks it (a run created by an outage-era sync)."""
        def log_if_missing() -> None:
            if CONFIG not in self.io.artifact_names(self.parent_run_id):
                self._log_config()

        self.io.call("log the search config", log_if_missing)
