"""MLflow calls that never raise into a lineage: retries, backoff, an offline mode.

Trials log to MLflow from Ray workers while they train. A tracking server that is down
or slow must not cost a lineage or a result: the store holds the truth and
`lth-search sync NAME` logs what MLflow missed. So every write goes through
`MlflowIO.call`, which retries transient failures with exponential backoff, then gives
up with one warning, remembers what was missed, and switches to an *offline* mode in
which each later call is tried once (a dead server refuses connections at once, so a
lineage loses no time; a server that comes back is used again).

MLflow's own HTTP client retries 7 times over ~4 minutes per request. The trackers
lower that (only where the user has not set the variables) so this module's backoff is
the one that counts: `MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`, `MLFLOW_HTTP_REQUEST_TIMEOUT=30`
(per socket operation, so large uploads are not cut short).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from lth_search.config.names import check_name
from lth_search.errors import TrackingError
from lth_search.tracking.sqlite_wal import commit_without_fsync, sqlite_path, use_wal

log = logging.getLogger(__name__)

ATTEMPTS = 4
BASE_DELAY_S = 0.5
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ITEMS_PER_BATCH = 1000
"""MLflow's limits on one log_batch request (mlflow/utils/validation.py)."""
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED",
}


def limit_http_retries() -> None:
    """Let our backoff, not MLflow's 4-minute one, decide (unless the user chose otherwise)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    quiet_mlflow_output()


def quiet_mlflow_output() -> None:
    """No per-file download progress bars and no per-run links on the terminal (unless asked for).

    MLflow writes "View run ... at" links to stdout when a run on a server ends; stdout
    belongs to `--json`, and lth-search prints the link to the runs table itself.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def is_permanent(error: BaseException) -> bool:
    """An error that retrying cannot fix (a bad request), as opposed to a server that is away."""
    code = getattr(error, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT_CODES


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: MLflow, the network or the database, not a bad request or a bug of ours.

    SQLAlchemy errors count: two processes creating a new sqlite database at once race
    on its schema ("table ... already exists"), and a locked database frees up.
    """
    from mlflow.exceptions import MlflowException

    if is_permanent(error):
        return False
    return isinstance(error, (MlflowException, OSError)) or type(error).__module__.startswith("sqlalchemy")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def artifact_root_for(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a sqlite database, else the server's choice.

    MLflow's default for a database URI is ./mlruns of whoever creates the experiment;
    an absolute folder beside the database keeps runs and artifacts together.
    """
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        folder = check_name(experiment, "MLflow experiment", TrackingError, max_len=100)  # never a path
        return (database.parent / "mlartifacts" / folder).as_uri()
    return None


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with text values (see `param_text`)."""
    if isinstance(value, dict) and value:
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: param_text(value)}


def param_text(value: Any) -> str:
    """A param value as text that `json.loads` turns back into the value (strings stay bare)."""
    return value if isinstance(value, str) else json.dumps(value)


def new_client(uri: str) -> Any:
    """The MlflowClient of a tracking URI (the registry at the same place), quiet output.

    A sqlite database that was moved (a copied or renamed `lth_runs/`) gets its artifact
    locations pointed at its own folder first (tracking/relocate.py).

    A sqlite database is created (schema and migrations) by whoever opens it first. Two
    processes doing that at once (two first `lineage`s in a fresh folder) saw each other's
    half-built schema ("no such column: spans.dimension_attributes") until their retries
    ran out; so the stores are opened under an exclusive lock file beside the database. The
    database commits through SQLite's write-ahead log (tracking/sqlite_wal.py).
    """
    from mlflow import MlflowClient

    from lth_search.tracking.relocate import reroot_artifacts

    quiet_mlflow_output()
    reroot_artifacts(uri)
    database = sqlite_path(uri)
    if database is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    commit_without_fsync()
    with _first_use_lock(database):
        use_wal(database)  # before MLflow's first connection: each one then commits without fsync
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client._tracking_client.store  # noqa: B018 - opening the store creates or migrates the schema
        client._get_registry_client().store  # noqa: B018
    return client


_SHARED: dict[str, Any] = {}


def shared_client(uri: str) -> Any:
    """One MlflowClient per tracking URI for the trials of this process. A search's worker runs
    trial after trial (Tune reuses its actors), and opening a client per trial ran the first-use
    work (relocation, the write-ahead log, the stores' schema) again each time: ~3 ms a trial.
    A running search's database does not move while its trials log (MLflow itself keeps one
    engine per database URI for the process)."""
    if uri not in _SHARED:
        _SHARED[uri] = new_client(uri)
    return _SHARED[uri]


@contextlib.contextmanager
def _first_use_lock(database: Path) -> Iterator[None]:
    """An exclusive flock on `<database>.lock` (processes and threads alike) for the block;
    no lock where the folder cannot hold one (MLflow then reports the real problem)."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        handle = open(database.with_name(database.name + ".lock"), "a")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowIO:
    """An MlflowClient whose calls retry, warn once and are remembered when they fail.

    `label` names the search in warnings, so the user knows which `sync` to run.
    """

    def __init__(self, uri: str, label: str, attempts: int = ATTEMPTS, base_delay_s: float = BASE_DELAY_S,
                 shared: bool = False) -> None:
        limit_http_retries()
        self.uri, self.label, self.shared = uri, label, shared
        self._client: Any = None
        self.attempts, self.base_delay_s = attempts, base_delay_s
        self.offline = False
        self.missed: list[str] = []

    @property
    def client(self) -> Any:
        """The MlflowClient, created on first use, inside `call`: creating it opens the store
        (a sqlite schema, a bad scheme), which can fail like any other call."""
        if self._client is None:
            self._client = shared_client(self.uri) if self.shared else new_client(self.uri)
        return self._client

    # The one door ---------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, result) or (False, None) after retries; never raises."""
        attempts = 1 if self.offline else self.attempts
        for attempt in range(attempts):
            try:
                result = fn()
            except Exception as error:  # noqa: BLE001 - nothing may reach the lineage
                if not is_transient(error) or attempt == attempts - 1:
                    self._give_up(what, error)
                    return False, None
                time.sleep(self.base_delay_s * 2**attempt)
                continue
            if self.offline:
                self.offline = False
                log.warning("MLflow at %s answers again (%s)", self.uri, what)
            return True, result
        return False, None  # attempts >= 1, so unreachable

    def _give_up(self, what: str, error: Exception) -> None:
        self.missed.append(what)
        if not is_transient(error):
            from lth_search.errors import LthError

            log.warning("MLflow: %s failed: %s", what, first_line(error))
            if not (is_permanent(error) or isinstance(error, LthError)):  # a bug: its traceback, for who asks
                log.debug("MLflow: %s failed", what, exc_info=error)
            return
        if not self.offline:
            log.warning(
                "MLflow at %s: %s failed after %d attempts (%s); results stay in the store, "
                "run `lth-search sync %s` once the server answers",
                self.uri, what, self.attempts, first_line(error), self.label,
            )
        self.offline = True

    # Experiments and runs -------------------------------------------------------------------
    _experiment_ids: dict[tuple[str, str], str] = {}
    """(tracking URI, name) -> id, per process: every trial of a search asked again (~13 ms a query,
    issue 24), while a worker process runs hundreds of trials of one experiment."""

    def experiment_id(self, name: str, cached: bool = False) -> str:
        """The experiment's id, created (beside a sqlite database) or restored when needed. With
        `cached` (a trial's run), the id this process found last: a search's driver looks it up
        (and restores a deleted experiment) before its trials start, and a trial asked again
        only cost time. Raises; call it through `call`."""
        key = (self.uri, name)
        if not cached or key not in MlflowIO._experiment_ids:
            MlflowIO._experiment_ids[key] = self._experiment_id(name)
        return MlflowIO._experiment_ids[key]

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_root_for(self.uri, name))
            except MlflowException as error:
                if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", name)
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> Any:
        """The newest run carrying all `tags`, or None. Raises; call it through `call`."""
        return next(self.tagged_runs(experiment_id, tags, newest_first=True), None)

    def tagged_runs(self, experiment_id: str, tags: dict[str, str], newest_first: bool = False) -> Iterator[Any]:
        """Every run carrying all `tags`, page by page (one query per `RUN_PAGE` runs, not one per run; a
        page in memory at a time). Raises.

        MLflow's filter strings have no escape for quotes, so a value holding both kinds (an
        output_dir with a quote in a tag) is matched here instead of in the filter; when the
        filter holds every tag, the newest run is one row."""
        clauses = [clause for key, value in tags.items() if (clause := _tag_clause(key, value))]
        order = ["attributes.start_time DESC"] if newest_first else None
        page = 1 if newest_first and len(clauses) == len(tags) else RUN_PAGE
        return (run for run in iter_runs(self.client, [experiment_id], " and ".join(clauses), order, page)
                if all(run.data.tags.get(k) == v for k, v in tags.items()))

    # Writing --------------------------------------------------------------------------------
    def log_values(
        self, run_id: str, metrics: dict[str, float] | None = None, step: int = 0, params: dict[str, str] | None = None
    ) -> None:
        """Metrics at one step and params, in as few requests as MLflow allows. Raises."""
        self.log_batch(run_id, [(step, metrics or {})], params)

    def log_batch(self, run_id: str, metrics_by_step: list[tuple[int, dict[str, float]]],
                  params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        """Metrics at several steps, params and tags in as few requests as MLflow allows (at most
        1000 items a request, 100 of them params and 100 tags): every request is a database
        transaction. Raises."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metric_list = [Metric(key, float(value), now, int(step))
                       for step, metrics in metrics_by_step for key, value in metrics.items()]
        param_list = [Param(key, str(value)[:6000]) for key, value in (params or {}).items()]
        tag_list = [RunTag(key, str(value)[:8000]) for key, value in (tags or {}).items()]
        while metric_list or param_list or tag_list:
            params_now, param_list = param_list[:MAX_PARAMS_PER_BATCH], param_list[MAX_PARAMS_PER_BATCH:]
            tags_now, tag_list = tag_list[:MAX_TAGS_PER_BATCH], tag_list[MAX_TAGS_PER_BATCH:]
            room = MAX_ITEMS_PER_BATCH - len(params_now) - len(tags_now)
            metrics_now, metric_list = metric_list[:room], metric_list[room:]
            self.client.log_batch(run_id, metrics=metrics_now, params=params_now, tags=tags_now)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        """Upload `data` as the artifact `artifact_file` (e.g. masks/round_01.parquet). Raises."""
        self.log_files(run_id, {artifact_file: data})

    def log_files(self, run_id: str, files: dict[str, bytes], artifact_uri: str | None = None) -> None:
        """Upload several artifacts ({artifact_file: data}, e.g. a round's mask and weights) in one
        request: each request resolves the run's artifact store again. `artifact_uri`, the run's
        (known since its creation), saves MLflow's look-up of the run (a query of its tags,
        params and metrics) on the first upload. An artifact store on a local path is written in
        place (each file where the repository's `log_artifacts` would copy it, with its path checks),
        not through a temporary folder copied over: a trial's files are written once, not twice. Raises."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        repo = get_artifact_repository(artifact_uri, tracking_uri=self.uri) if artifact_uri is not None else None
        if isinstance(repo, LocalArtifactRepository):
            from mlflow.utils.uri import validate_path_is_safe, validate_path_within_directory

            for artifact_file, data in files.items():  # MLflow's own checks: a safe path inside the run's folder
                local = os.path.join(repo.artifact_dir, os.path.normpath(validate_path_is_safe(artifact_file)))
                validate_path_within_directory(repo.artifact_dir, local)
                Path(local).parent.mkdir(parents=True, exist_ok=True)
                Path(local).write_bytes(data)
            return
        with tempfile.TemporaryDirectory(prefix="lth-mlflow-") as tmp:
            for artifact_file, data in files.items():
                local = Path(tmp) / artifact_file
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
            if repo is None:
                self.client.log_artifacts(run_id, tmp)
            else:
                repo.log_artifacts(tmp)

    def read_artifact(self, run_id: str, artifact_file: str) -> bytes:
        """The bytes of one artifact of a run. Raises."""
        return read_artifact(self.client, run_id, artifact_file)

    def artifact_names(self, run_id: str, folder: str | None = None) -> set[str]:
        """Paths of the files directly in `folder` of a run's artifacts. Raises."""
        return {item.path for item in self.client.list_artifacts(run_id, folder) if not item.is_dir}


RUN_PAGE = 50
"""Runs a query returns at a time. A whole run (its latest metrics, params, tags with their descriptions,
data-set inputs) is ~100 KB of MLflow's objects: a page of 200 held ~20 MB of the driver's peak at the
finish of any search past 200 trials, against ~10 MB at 100 (issue 24); 50 is a few more queries."""


def iter_runs(client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None,
              page_size: int = RUN_PAGE) -> Iterator[Any]:
    """Every run matching the filter, a page at a time (a search's thousands of runs are never all in memory)."""
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=page_size, order_by=order_by, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def _tag_clause(key: str, value: str) -> str | None:
    """`tags.`key` = 'value'` with whichever quote the value lacks; None if it holds both (or a backtick key)."""
    if "`" in key:
        return None
    for quote in ("'", '"'):
        if quote not in value:
            return f"tags.`{key}` = {quote}{value}{quote}"
    return None


def read_artifact(client: Any, run_id: str, artifact_file: str) -> bytes:
    """The bytes of one run artifact, wherever MLflow keeps it (local folder or HTTP proxy)."""
    with tempfile.TemporaryDirectory(prefix="lth-mlflow-") as tmp:
        local = client.download_artifacts(run_id, artifact_file, dst_path=tmp)
        return Path(local).read_bytes()


def metric_history(client: Any, run_id: str, key: str) -> dict[int, float]:
    """step -> value of a metric; of several points at one step the latest logged wins."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {int(m.step): float(m.value) for m in points}


def metric_histories(client: Any, run_ids: list[str], key: str) -> dict[str, dict[int, float]]:
    """`metric_history` of many runs: one query on a database store (MLflow's bulk read, which
    its REST client lacks: there, a query per run). A search's tickets read 9 metrics of every run."""
    bulk = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "get_metric_history_bulk", None)
    if bulk is None or not run_ids:
        return {run_id: metric_history(client, run_id, key) for run_id in run_ids}
    found: dict[str, list[Any]] = {run_id: [] for run_id in run_ids}
    for point in bulk(run_ids, key, max_results=10**9):
        found[point.run_id].append(point)  # a Metric with its run id
    return {run_id: {int(m.step): float(m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))}
            for run_id, points in found.items()}
