"""What a search keeps so that it can be resumed by name, from any machine that reaches its store.

Everything lives on the store's storage, beside the store root (store/uri.py `beside`),
written relative to that folder (runs/saved_paths.py) so that a copy resumes as itself:
`<store parent>/searches/<name>/search.json` (config, Ray results path, MLflow parent run
id, status), `optuna.journal` beside it (the study), and Ray's results in
`<store parent>/ray/<search id>`. With the default store (`<output_dir>/store`) that is
`<output_dir>/searches/<name>/`; with `store.uri=s3://b/lth/store` it is
`s3://b/lth/searches/<name>/`, so `lth-search resume NAME --store-uri s3://b/lth/store`
works after `ray down`, from a laptop or another head.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lth_search.config import ExperimentConfig, default_output_dir, validate_config
from lth_search.config.names import check_name
from lth_search.errors import ConfigError, StoreError
from lth_search.runs.saved_paths import CONFIG_PATHS, from_saved, state_root, to_saved
from lth_search.store.uri import beside, read_file, write_file


class SearchStatus(str, Enum):
    """Where a search is (the words stored in search.json)."""

    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    """Stopped before its end (Ctrl-C, a killed driver): `lth-search resume` continues it."""
    FAILED = "failed"
    """Stopped by a failure every trial would hit (the store, the data, the config; `failure`
    says which): once it is fixed, `lth-search resume` continues it."""


@dataclass
class SearchState:
    """What `search.json` holds: enough to restore the Tuner and its study by name."""

    name: str
    search_id: str
    config: dict[str, Any]
    results_path: str
    journal: str
    parent_run_id: str | None = None
    status: SearchStatus = SearchStatus.RUNNING
    started_at: float = 0.0
    finished_at: float | None = None
    confirmation: dict[str, Any] | None = None
    """The confirmation's scores and chosen trial (runs/confirmation.py), once it ran."""
    failure: str | None = None
    """Why a FAILED search stopped, in one line."""

    def __post_init__(self) -> None:
        self.status = SearchStatus(self.status)

    @staticmethod
    def folder(store_uri: str, name: str) -> str:
        """Where search `name` keeps search.json and its journal (a path or URI beside the store);
        `name` is checked (names.py), so it never leaves that folder."""
        return f"{beside(store_uri, 'searches')}/{check_name(name, 'search name')}"

    SAVED_PATHS = ("results_path", "journal", *CONFIG_PATHS)
    """Fields written relative to the state's root (runs/saved_paths.py) when they lie under it."""

    def save(self) -> None:
        store_uri = self.cfg().store_uri()
        path = f"{self.folder(store_uri, self.name)}/search.json"
        saved = to_saved(asdict(self), state_root(store_uri), self.SAVED_PATHS)
        write_file(path, json.dumps(saved, indent=2).encode())

    @classmethod
    def load(cls, name: str, output_dir: str | Path | None = None, store_uri: str | None = None) -> "SearchState":
        """The state of search `name` beside `store_uri` (default: the store of `output_dir`, default the schema's)."""
        store_uri = store_uri or ExperimentConfig(output_dir=str(output_dir or default_output_dir())).store_uri()
        path = f"{cls.folder(store_uri, name)}/search.json"
        try:
            data = read_file(path)
        except (OSError, StoreError) as error:
            raise ConfigError(f"search {name}: cannot read {path} ({str(error).splitlines()[0]})") from None
        if data is None:
            raise ConfigError(
                f"no search named {name} beside the store {store_uri} (no {path}); run `lth-search run CONFIG` "
                "first, or pass the search's --store-uri / --output-dir"
            )
        try:
            parsed = from_saved(json.loads(data), state_root(store_uri))
        except ValueError as error:
            raise ConfigError(f"{path}: not valid JSON or a path that leaves its folder ({error}); "
                              "the search cannot be resumed") from None
        return cls.from_json(parsed, path)

    @classmethod
    def from_json(cls, data: Any, path: str) -> "SearchState":
        """The state a `search.json` holds, or ConfigError naming the file and what is wrong with it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {"name", "search_id", "config", "results_path", "journal"}
        if not isinstance(data, dict) or not required <= set(data):
            raise ConfigError(f"{path}: not a search state (needs {', '.join(sorted(required))}); the search cannot be resumed")
        kinds = {"config": dict, "name": str, "search_id": str, "results_path": str, "journal": str, "status": str}
        wrong = sorted(k for k, kind in kinds.items() if k in data and not isinstance(data[k], kind))
        if "status" not in wrong and data.get("status", "running") not in {s.value for s in SearchStatus}:
            wrong.append("status")
        if not isinstance(data.get("confirmation") or {}, dict):
            wrong.append("confirmation")
        if wrong or not isinstance(data["config"].get("output_dir", ""), str):
            raise ConfigError(f"{path}: damaged search state (field(s) {', '.join(wrong) or 'config'}); cannot resume")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def cfg(self) -> ExperimentConfig:
        return validate_config(self.config, source=f"search {self.name}")


def results_root(cfg: ExperimentConfig) -> str:
    """Where Ray keeps trial results and checkpoints: beside the store, on the same storage.

    Every node must reach it (a head-local path does not work across nodes), and a
    resumed search must find it from wherever it is resumed.
    """
    return beside(cfg.store_uri(), "ray")


def new_state(cfg: ExperimentConfig) -> SearchState:
    search_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return SearchState(
        name=cfg.name,
        search_id=search_id,
        config=cfg.model_dump(mode="json"),
        results_path=f"{results_root(cfg)}/{search_id}",
        journal=f"{SearchState.folder(cfg.store_uri(), cfg.name)}/optuna.journal",
        started_at=time.time(),
    )
