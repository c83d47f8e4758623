"""The search driver: Ray Tune runs IMP lineages, Optuna proposes choices, ASHA stops laggards.

`run_search(cfg)` starts (or joins) Ray, builds the data set once and shares it through
the object store, starts the search's lease actor and MLflow parent run, and runs a
`tune.Tuner` whose trials are lineages (trial.py). Everything needed to continue lives
beside the store, on the same storage (runs/state.py): `searches/<name>/search.json`
(config, Ray results path, parent run id, status), `optuna.journal` (the study) and
Ray's results, so `resume_search(name)` restores the Tuner after a killed driver, from
any machine that reaches the store, and Optuna continues the same study.

Ray: `--address` wins; else `RAY_ADDRESS` (what `ray job submit` sets for its
entrypoint) joins that cluster, as Ray's own default does; else a local Ray starts on
loopback. What a person sees of the search is search/console.py.

Each `run` is a new search with its own id (`<name>-<timestamp>`): its Ray results
folder and Optuna study are its own, while stages come from the shared store, so
running the quickstart twice reuses every stage instead of mixing two studies.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import load_dataset
from lth_search.errors import ConfigError, LthError
from lth_search.runs.observers import SearchObserver, SearchTracking
from lth_search.runs.record import TrialRecord, TrialStatus
from lth_search.runs.state import SearchState, SearchStatus, new_state
from lth_search.runs.summary import chosen_record, emit, summarize, summary_lines
from lth_search.search.confirm import run_confirmation
from lth_search.search.console import SearchConsole, ray_verbose, result_files, use_console
from lth_search.search.journal import journal_storage
from lth_search.search.ray_leases import start_lease_actor
from lth_search.search.scheduler import PruningAwareOptunaSearch, make_scheduler
from lth_search.search.space import (
    DefineByRunSpace,
    close_orphans,
    make_sampler,
    objectives,
    sampler_name,
    space_size,
    trial_budget,
)
from lth_search.search.trainable import PROGRESS_METRICS, lineage_trial
from lth_search.store.stages import StageStore
from lth_search.store.uri import pyarrow_location

Progress = Callable[[str], None]


# Ray session ---------------------------------------------------------------------------------
def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `--address`, else $RAY_ADDRESS (set by `ray job submit`), else None (local)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(address: str | None, verbosity: int = 0) -> Iterator[None]:
    """Reuse an initialised Ray, join `address` or $RAY_ADDRESS, or start a local Ray on loopback.

    Ray started or joined here is shut down on exit; a Ray already up is left alone.
    Workers of a cluster do not share the driver's environment: the MLflow variables
    the driver sees (credentials, timeouts) go to them through the job's runtime env,
    unless this driver is itself a `ray job submit` entrypoint, whose runtime env
    (`--runtime-env-json`) already reaches every worker and may not be given twice.
    """
    if ray.is_initialized():
        yield
        return
    quiet = {"logging_level": logging.INFO if verbosity > 0 else logging.WARNING}
    joined = cluster_address(address)
    if joined:
        what = "--address" if address else "RAY_ADDRESS"
        unreachable = _unreachable(joined)
        if unreachable:
            raise ConfigError(f"{what} {joined}: cannot join a Ray cluster there ({unreachable})")
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for a job's entrypoint
        mlflow_env = {} if in_job else {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        try:
            ray.init(address=joined, runtime_env={"env_vars": mlflow_env} if mlflow_env else None, **quiet)
        except ConnectionError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"{what} {joined}: cannot join a Ray cluster there ({reason})") from None
    else:
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", **quiet
        )
    try:
        yield
    finally:
        ray.shutdown()


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why HOST:PORT takes no TCP connection, or None if it does.

    Ray itself retries an address that does not answer for minutes before it gives up;
    a wrong --address should fail in seconds. `auto` and other forms are left to Ray.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        return f"nothing answers at {host}:{port}: {error.strerror or type(error).__name__}"
    return None


def _check_resources(cfg: ExperimentConfig, address: str | None) -> None:
    """Fail in one line, before anything starts, when a local Ray could never fit one trial.

    Only for the local Ray this process would start: a cluster may scale up to fit.
    """
    if cluster_address(address) or ray.is_initialized():
        return
    import torch

    available = {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for key, need in (("CPU", cfg.resources.cpu), ("GPU", cfg.resources.gpu)):
        if need > available[key]:
            fits = available[key] if key == "CPU" else 0  # resources.cpu must stay > 0; gpu=0 trains on CPU
            raise ConfigError(
                f"resources.{key.lower()}: a trial needs {need:g} {key}s but this machine has "
                f"{available[key]:g}; lower it (e.g. --set resources.{key.lower()}={fits:g}) or pass --address"
            )


# Tune pieces ---------------------------------------------------------------------------------
def _trainable(cfg: ExperimentConfig, state: SearchState, tracking: SearchTracking | None) -> Any:
    """The lineage trial with the data set (via the object store) and the search context bound."""
    dataset = load_dataset(cfg.data, cfg.seed, "cpu")
    context = {"search_id": state.search_id, "parent_run_id": state.parent_run_id}
    observer_factory = tracking.trial_observer if tracking is not None else None
    bound = tune.with_parameters(
        lineage_trial, base=state.config, dataset=dataset, context=context, observer_factory=observer_factory
    )
    trainable = tune.with_resources(bound, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    trainable._progress_metrics = PROGRESS_METRICS  # read by Ray's console reporter
    return trainable


def _searcher(cfg: ExperimentConfig, state: SearchState) -> OptunaSearch:
    """Optuna over the space, the default recipe enqueued first (the baseline is always in the race)."""
    metric, mode = objectives(cfg)
    default = cfg.default_recipe()
    return PruningAwareOptunaSearch(
        space=DefineByRunSpace(cfg),
        metric=metric,
        mode=mode,
        sampler=make_sampler(cfg),
        study_name=state.search_id,
        storage=journal_storage(state.journal),
        points_to_evaluate=[default] if default else None,
        cfg=cfg,
    )


class TrialEvents(tune.Callback):
    """Final trial statuses into the trial records (the lines a person reads: console.py).

    Only the driver knows why a trial ended: a trial the scheduler stops and one cut short
    by an interrupted search both end inside `tune.report`, but only the first gets
    `on_trial_complete`. Ray pickles callbacks into its experiment state and restores
    copies of them on resume, so all state is the config and the console (the store is
    reopened lazily).
    """

    def __init__(self, cfg: ExperimentConfig, console: SearchConsole) -> None:
        self.cfg, self.console = cfg, console
        self._store: StageStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> StageStore:
        if self._store is None:
            self._store = StageStore.from_config(self.cfg)
        return self._store

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = TrialRecord.load(self.store, self.cfg.name, trial.trial_id)
        ended = record is not None and record.status is TrialStatus.FINISHED
        status = TrialStatus.FINISHED if ended else TrialStatus.STOPPED
        self._set_status(trial.trial_id, status)
        self.console.ended(trial, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._set_status(trial.trial_id, TrialStatus.ERROR)
        self.console.failed(trial)

    def _set_status(self, trial_id: str, status: TrialStatus) -> None:
        try:
            _save_status(self.store, self.cfg.name, trial_id, status)
        except (LthError, OSError, ValueError) as error:  # raised in a Tune callback, it would kill the driver
            self.console.line(f"trial {trial_id}: cannot record status {status.value} now ({error}); "
                          "settled from Ray's state at the end of the search or on resume")


def _save_status(store: StageStore, search: str, trial_id: str, status: TrialStatus) -> None:
    record = TrialRecord.load(store, search, trial_id)
    if record is not None and record.status is not status:
        record.status = status
        record.save(store)


def _settle(store: StageStore, cfg: ExperimentConfig, records: dict[str, TrialRecord], ended: set[str]) -> None:
    """Final statuses for trials Ray saw end (result `done`) whose record does not say so.

    The callback's write may have failed (disk full) or its driver been killed before it
    ran; Ray's saved state still knows the trial ended. The trial writes FINISHED itself
    when its lineage ends, so an ended trial still marked running was stopped by the
    scheduler. Interrupted trials are never `done` (Ray snapshots before it stops them).
    """
    for trial_id in sorted(ended):
        record = records.get(trial_id)
        if record is not None and not record.status.final:
            _save_status(store, cfg.name, trial_id, TrialStatus.STOPPED)
            record.status = TrialStatus.STOPPED


def _callbacks(cfg: ExperimentConfig, progress: Progress) -> list[tune.Callback]:
    """Trial statuses with their console lines, the console's own events, and Tune's result.json."""
    console = SearchConsole(trial_budget(cfg), progress)
    return [TrialEvents(cfg, console), console, *result_files()]


def _tuner(
    cfg: ExperimentConfig, state: SearchState, tracking: SearchTracking | None, progress: Progress, verbosity: int
) -> tune.Tuner:
    storage, name = state.results_path.rsplit("/", 1)
    storage_path, filesystem = pyarrow_location(storage)
    return tune.Tuner(
        _trainable(cfg, state, tracking),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(cfg, state),
            scheduler=make_scheduler(cfg),
            num_samples=trial_budget(cfg),
            max_concurrent_trials=cfg.search.max_concurrent,
            reuse_actors=True,  # a new lineage starts in a warm process (torch imported, data fetched)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=_callbacks(cfg, progress),
            verbose=ray_verbose(verbosity),
        ),
    )


def _ray_trials(grid: tune.ResultGrid) -> dict[str, bool]:
    """Every trial Ray knows at the end, by id, with whether it errored.

    A trial that never reported has no `trial_id` metric; its folder name carries the id.
    """
    trials: dict[str, bool] = {}
    for result in grid:
        trial_id = result.metrics.get("trial_id")
        if trial_id is None:
            found = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", Path(result.path).name)
            trial_id = found.group(1) if found else Path(result.path).name
        trials[trial_id] = result.error is not None
    return trials


def _ended_trials(grid: tune.ResultGrid) -> dict[str, bool]:
    """Trial id -> whether Ray saw it end (`done`: finished or stopped by the scheduler, not interrupted)."""
    return {r.metrics["trial_id"]: bool(r.metrics.get("done")) for r in grid if "trial_id" in r.metrics}


def _save_quietly(state: SearchState) -> None:
    try:
        state.save()
    except OSError:
        pass  # the disk that failed the search: its last saved status stands


# Driver --------------------------------------------------------------------------------------
def run_search(
    cfg: ExperimentConfig, address: str | None = None, progress: Progress = print,
    tracking: SearchTracking | None = None, verbosity: int = 0,
) -> dict[str, Any]:
    """Run a new search on a local Ray, or on the cluster at `address` / $RAY_ADDRESS; returns its summary.

    `tracking` (from api: MLflow, or None) opens the search's run and the trials' runs.
    `verbosity`: -1 errors only, 0 lth-search's lines, 1 also Ray's tables and library INFO logs.
    """
    progress = use_console(verbosity, progress)
    cfg = cfg.absolute()
    state = new_state(cfg)
    _check_resources(cfg, address)
    with ThreadPoolExecutor(1) as pool:
        # Tracking's setup (seconds for a new MLflow database) overlaps the start of a local
        # Ray; joining a cluster comes first, so a wrong --address leaves no run behind.
        local = not cluster_address(address) and not ray.is_initialized()
        early = pool.submit(_start_tracking, cfg, state, tracking) if local else None
        with ray_session(address, verbosity):
            observer = early.result() if early is not None else _start_tracking(cfg, state, tracking)
            state.save()
            _announce(cfg, state, progress)
            leases = start_lease_actor(cfg.name)  # held here: the actor lives while the driver does
            summary = _fit(cfg, state, _tuner(cfg, state, tracking, progress, verbosity), observer, progress, address)
            del leases
            return summary


def resume_search(
    name: str, output_dir: str | None = None, address: str | None = None, progress: Progress = print,
    tracking: SearchTracking | None = None, store_uri: str | None = None, verbosity: int = 0,
) -> dict[str, Any]:
    """Continue an interrupted search by name: Tuner.restore, same Optuna study, same tracking run.

    The search is found beside its store (`store_uri`, default `<output_dir>/store`), so
    it resumes from any machine or folder that reaches that storage.
    """
    progress = use_console(verbosity, progress)
    state = SearchState.load(name, output_dir, store_uri=store_uri)
    cfg = state.cfg().absolute()
    results, filesystem = pyarrow_location(state.results_path)
    if not tune.Tuner.can_restore(results, storage_filesystem=filesystem):
        raise ConfigError(
            f"search {name}: Ray saved no state under {state.results_path} yet; start it again with `lth-search run`"
        )
    _check_resources(cfg, address)
    with ray_session(address, verbosity):
        observer = _start_tracking(cfg, state, tracking)
        state.status = SearchStatus.RUNNING
        state.save()
        progress(f"resuming search {state.search_id} from {state.results_path}")
        leases = start_lease_actor(cfg.name)
        tuner = tune.Tuner.restore(
            results, trainable=_trainable(cfg, state, tracking), resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
        # Tuner.restore brings back the first run's pickled RunConfig and has no public way to
        # change it; this run's console (its printer, -v/-q) replaces the pickled one.
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks, run_config.verbose = _callbacks(cfg, progress), ray_verbose(verbosity)
        summary = _fit(cfg, state, tuner, observer, progress, address)
        del leases
        return summary


def _start_tracking(cfg: ExperimentConfig, state: SearchState, tracking: SearchTracking | None) -> SearchObserver | None:
    """The search's tracking run (created, or the saved one on resume); trials log under it."""
    if tracking is None:
        return None
    observer = tracking.start(cfg, state.results_path, state.parent_run_id)
    state.parent_run_id = observer.parent_run_id
    return observer


def _announce(cfg: ExperimentConfig, state: SearchState, progress: Progress) -> None:
    resources = ray.cluster_resources()
    space = DefineByRunSpace(cfg).categorical
    progress(
        f"search {state.search_id}: {trial_budget(cfg)} lineages of up to {cfg.prune.rounds} rounds, "
        f"{cfg.search.max_concurrent} at a time, on Ray with {resources.get('CPU', 0):g} CPUs / "
        f"{resources.get('GPU', 0):g} GPUs"
    )
    progress(f"  searching {', '.join(f'{k} in {v}' for k, v in space.items()) or 'nothing (fixed choices)'}: "
             f"{space_size(cfg)} recipes, {sampler_name(cfg)} sampler, the default recipe first")
    progress(f"  stages: {cfg.store_uri()}   Ray results: {state.results_path}")


def _fit(
    cfg: ExperimentConfig, state: SearchState, tuner: tune.Tuner, observer: SearchObserver | None,
    progress: Progress, address: str | None,
) -> dict[str, Any]:
    """Run the Tuner, settle every trial's status, finish tracking, print the summary."""
    # One snapshot per trial checkpoint keeps a killed driver's state at most a round behind;
    # Ray warns about that frequency by default.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    began = time.time()
    try:
        grid = tuner.fit()
    except BaseException:  # a crash leaves a resumable state, not "running"
        state.status = SearchStatus.INTERRUPTED
        _save_quietly(state)
        raise
    trials = _ray_trials(grid)
    store = StageStore.from_config(cfg)
    damaged: list[str] = []
    records = {r.trial_id: r for r in TrialRecord.load_all(store, cfg.name, state.search_id, unreadable=damaged)}
    if damaged:
        progress(f"trial record(s) {', '.join(sorted(damaged)[:5])} in {cfg.store_uri()} cannot be read; left out")
    _settle(store, cfg, records, {t for t, done in _ended_trials(grid).items() if done and not trials.get(t)})
    complete = len(trials) >= trial_budget(cfg) and all(
        errored or (trial_id in records and records[trial_id].status.final) for trial_id, errored in trials.items()
    )
    if complete:
        _abandon_orphans(store, records, set(trials))
        close_orphans(state.journal, state.search_id)
    state.status = SearchStatus.FINISHED if complete else SearchStatus.INTERRUPTED
    state.finished_at = time.time() if complete else None
    state.save()
    confirmation = None
    if complete:
        confirmation = run_confirmation(cfg, state.search_id, state.results_path, list(records.values()), progress)
        if confirmation is not None:
            chosen = chosen_record(list(records.values()), confirmation)
            state.confirmation = {**confirmation.to_json(), "trial_id": chosen.trial_id if chosen else None}
            state.save()
    if observer is not None and complete:
        observer.finish(list(records.values()), state.confirmation)
    links = {"wall_s": time.time() - began, "results_path": state.results_path}
    links.update(observer.links() if observer is not None else {})
    summary = summarize(list(records.values()), state.search_id, cfg.prune.rounds, links, confirmation)
    summary["status"] = state.status.value
    emit(summary_lines(summary), progress)
    if not complete:
        progress(f"search interrupted: continue it with `{_resume_command(cfg, address)}`")
    return summary


def _resume_command(cfg: ExperimentConfig, address: str | None) -> str:
    """The command that continues this search, wherever it was started from."""
    where = f"--store-uri {cfg.store.uri}" if cfg.store.uri else f"--output-dir {cfg.output_dir}"
    return f"lth-search resume {cfg.name} {where}" + (f" --address {address}" if address else "")


def _abandon_orphans(store: StageStore, records: dict[str, TrialRecord], known: set[str]) -> None:
    """Mark trials Ray does not know: started by a killed driver after Ray's last snapshot.

    Ray's restored state never had them, so the search ran replacements; their stages
    stay in the store (and were reused), their records say what happened.
    """
    for trial_id, record in records.items():
        if trial_id not in known and not record.status.final:
            record.status = TrialStatus.ABANDONED
            record.save(store)
