"""What a search keeps on disk so that it can be resumed by name, and where Ray keeps its part.

`<output_dir>/searches/<name>/search.json` holds the config, the Ray results path, the
MLflow parent run id and the status; `optuna.journal` beside it holds the study.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lth_search.config import ExperimentConfig, default_output_dir, validate_config
from lth_search.config.names import check_name
from lth_search.errors import ConfigError
from lth_search.store.uri import PYARROW_SCHEMES


class SearchStatus(str, Enum):
    """Where a search is (the words stored in search.json)."""

    RUNNING = "running"
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    """Stopped before its end (Ctrl-C, a killed driver): `lth-search resume` continues it."""


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

    def __post_init__(self) -> None:
        self.status = SearchStatus(self.status)

    @staticmethod
    def folder(output_dir: str | Path, name: str) -> Path:
        """`<output_dir>/searches/<name>`; `name` is checked (names.py), so it never leaves that folder."""
        return Path(output_dir).expanduser().resolve() / "searches" / check_name(name, "search name")

    def save(self) -> None:
        path = self.folder(self.config["output_dir"], self.name) / "search.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(asdict(self), indent=2))
        os.replace(staging, path)

    @classmethod
    def load(cls, name: str, output_dir: str | Path | None = None) -> "SearchState":
        """The state of search `name` under `output_dir` (default: the schema's)."""
        folder = cls.folder(output_dir or default_output_dir(), name)
        try:
            data = json.loads((folder / "search.json").read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no search named {name} under {folder.parent}; run `lth-search run CONFIG` first"
            ) from None
        except ValueError:
            raise ConfigError(f"{folder / 'search.json'}: not valid JSON; the search cannot be resumed") from None
        except OSError as error:
            raise ConfigError(f"{folder / 'search.json'}: cannot read ({error.strerror or error})") from None
        return cls.from_json(data, folder / "search.json")

    @classmethod
    def from_json(cls, data: Any, path: Path) -> "SearchState":
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
    """Where Ray keeps trial results and checkpoints.

    `<output_dir>/ray` locally; beside the store when the store is remote (s3://b/x/store
    -> s3://b/x/ray), because every node must reach it and a head-local path will not do.
    """
    uri = cfg.store_uri().rstrip("/")
    if "://" not in uri or uri.split("://", 1)[0].lower() not in PYARROW_SCHEMES - {"file"}:
        return str(cfg.output_path() / "ray")  # Ray opens pyarrow URIs only
    scheme, path = uri.split("://", 1)
    parent = path.rsplit("/", 1)[0] if "/" in path else path  # s3://bucket -> s3://bucket/ray
    return f"{scheme}://{parent}/ray"


def new_state(cfg: ExperimentConfig) -> SearchState:
    search_id = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = SearchState.folder(cfg.output_dir, cfg.name)
    return SearchState(
        name=cfg.name,
        search_id=search_id,
        config=cfg.model_dump(mode="json"),
        results_path=f"{results_root(cfg)}/{search_id}",
        journal=str(folder / "optuna.journal"),
        started_at=time.time(),
    )
