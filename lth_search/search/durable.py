"""Where a search's results go, and the refusal to put them where Ray deletes them.

`ray job submit --working-dir REPO -- lth-search run CONFIG` runs the command in a copy
of REPO under Ray's session folder (`.../runtime_resources/working_dir_files/_ray_pkg_*`),
which Ray deletes with the session. A search there with the default `output_dir`
(`./lth_runs`, relative to that copy) would write its MLflow database, its store and its
resume state into that folder and lose them without a word. So, before anything is
written:

- inside a Ray job (Ray sets `RAY_JOB_CONFIG_JSON_ENV_VAR` for a job's entrypoint), a
  relative `output_dir` (the quickstart's `./lth_runs`) resolves against the job's
  working folder, so what would go there must be placed elsewhere: the stages (and with
  them the resume state and Ray's results, which live beside the store) by `store.uri`,
  MLflow by `tracking.uri` or `$MLFLOW_TRACKING_URI`; an absolute `output_dir` (a
  folder on the head) places both;
- anywhere, a local location under Ray's own folders (its temporary root, a session's
  runtime resources) is refused.

Either failure is one line naming the setting to give (exit 2). Every search's header
prints `result_places`, so where results go is never a guess.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lth_search.config import ExperimentConfig
from lth_search.config.names import scheme_of
from lth_search.errors import ConfigError
from lth_search.store.uri import beside

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray for the entrypoint of a job (`ray job submit`, a KubeRay RayJob)."""
RAY_RUNTIME_FOLDER = "runtime_resources"
"""The folder of a Ray session that holds jobs' working directories and packages."""
ADVICE = (
    "give --set output_dir=/a/durable/folder (on the head), or --set store.uri=s3://BUCKET/lth/store with "
    "tracking.uri or $MLFLOW_TRACKING_URI set to an MLflow server (cluster/README.md)"
)


@dataclass(frozen=True)
class ResultPlaces:
    """Where a search writes: the stages, MLflow, the resume state and Ray's results."""

    stages: str
    tracking: str | None
    """The tracking URI, None when tracking is off."""
    state: str
    ray_results: str

    def line(self) -> str:
        """The header's line: every place, so a user knows what to keep (and what to resume from)."""
        tracking = self.tracking or "off"
        return (f"  results: stages {self.stages}; MLflow {tracking}; resume state {self.state}; "
                f"Ray results {self.ray_results}")


def result_places(cfg: ExperimentConfig) -> ResultPlaces:
    """The places of `cfg` (paths resolved as the search will resolve them)."""
    store = cfg.store_uri() if cfg.store.uri and "://" in cfg.store.uri else str(Path(cfg.store_uri()).expanduser().resolve())
    return ResultPlaces(
        stages=store,
        tracking=cfg.tracking_uri() if cfg.tracking.enabled else None,
        state=beside(store, "searches"),
        ray_results=beside(store, "ray"),
    )


def in_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def ray_temp_roots() -> list[Path]:
    """Ray's temporary roots on this machine: $RAY_TMPDIR, else `<tmp>/ray` (Ray's default)."""
    roots = [Path(tempfile.gettempdir()) / "ray"]
    if os.environ.get("RAY_TMPDIR"):
        roots.insert(0, Path(os.environ["RAY_TMPDIR"]) / "ray")
    return [root.resolve() for root in roots]


def local_path(location: str) -> Path | None:
    """The local folder a store or tracking location names (None for a remote one)."""
    scheme = scheme_of(location)
    if scheme is None:
        return Path(location).expanduser().resolve()
    if scheme in ("file", "local"):
        return Path(location.split("://", 1)[1]).resolve()
    if location.startswith("sqlite:///"):
        return Path(location[len("sqlite:///"):]).resolve()
    return None


def rays_folder(path: Path) -> str | None:
    """Why `path` is Ray's to delete (a job's runtime folder, Ray's temporary root), or None."""
    if RAY_RUNTIME_FOLDER in path.parts:
        return "a Ray job's working folder, deleted with the Ray session"
    for root in ray_temp_roots():
        if path == root or root in path.parents:
            return f"Ray's temporary folder {root}, deleted with the Ray session"
    return None


def check_durable(cfg: ExperimentConfig) -> None:
    """Refuse (ConfigError, one line) a search whose results would land where Ray deletes them.

    `cfg` is the config as given (before `absolute()`): whether `output_dir` was relative
    is what tells a job's own folder from one the user chose.
    """
    places = result_places(cfg)
    tracking_key = "tracking.uri" if cfg.tracking.uri else (
        "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "output_dir")
    for key, what, location in (("store.uri" if cfg.store.uri else "output_dir", "stages", places.stages),
                                (tracking_key, "MLflow", places.tracking)):
        path = local_path(location) if location else None
        why = rays_folder(path) if path is not None else None
        if why:
            raise ConfigError(f"{key}: the search's {what} would go to {location}, {why}; {ADVICE}")
    if not in_ray_job():
        return
    relative = not Path(cfg.output_dir).expanduser().is_absolute()  # resolved against the job's folder
    missing = []
    store_relative = cfg.store.uri is not None and scheme_of(cfg.store.uri) is None and not (
        Path(cfg.store.uri).expanduser().is_absolute())
    if store_relative:
        raise ConfigError(f"store.uri: inside a Ray job the relative path {cfg.store.uri} lands in the job's "
                          f"working folder, which Ray may delete; {ADVICE}")
    if relative and not cfg.store.uri:
        missing.append("store.uri")
    if relative and cfg.tracking.enabled and not cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        missing.append("tracking.uri (or $MLFLOW_TRACKING_URI)")
    if missing:
        raise ConfigError(
            f"output_dir: inside a Ray job the relative output_dir {cfg.output_dir} lands in the job's working "
            f"folder, which Ray may delete, and no {' nor '.join(missing)} is given; {ADVICE}"
        )
