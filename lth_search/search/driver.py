"""The search driver: Ray Tune runs IMP lineages, Optuna proposes choices, ASHA stops laggards.

`run_search(cfg)` starts (or joins) Ray, builds the data set once and shares it through
the object store, starts the search's lease actor and MLflow parent run, and runs a
`tune.Tuner` whose trials are lineages (trial.py). Everything needed to continue lives
on disk: `<output_dir>/searches/<name>/search.json` (config, Ray results path, parent
run id, status) and `optuna.journal` (the study), so `resume_search(name)` restores the
Tuner after a killed driver and Optuna continues the same study.

Each `run` is a new search with its own id (`<name>-<timestamp>`): its Ray results
folder and Optuna study are its own, while stages come from the shared store, so
running the quickstart twice reuses every stage instead of mixing two studies.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import load_dataset
from lth_search.errors import ConfigError, LthError
from lth_search.search.ray_leases import start_lease_actor
from lth_search.store.records import records_namespace
from lth_search.search.space import PRIMARY_METRIC, DefineByRunSpace, close_orphans, journal_storage, make_sampler, objectives
from lth_search.runs.state import SearchState, new_state
from lth_search.store.stages import StageStore
from lth_search.runs.summary import emit, summarize, summary_lines
from lth_search.search.trainable import PROGRESS_METRICS, lineage_trial

Progress = Callable[[str], None]
_session: dict[str, Any] = {"progress": print, "store": None, "namespace": "", "pending": {}}
"""What the driver's Tune callback needs (see `_TrialEvents`)."""
FINAL = ("finished", "stopped", "error", "abandoned")


# Ray session ---------------------------------------------------------------------------------
@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Reuse an initialised Ray, join `address`, or start a local Ray on loopback.

    Ray started or joined here is shut down on exit; a Ray already up is left alone.
    """
    if ray.is_initialized():
        yield
        return
    if address:
        unreachable = _unreachable(address)
        if unreachable:
            raise ConfigError(f"--address {address}: cannot join a Ray cluster there ({unreachable})")
        try:
            ray.init(address=address)
        except ConnectionError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"--address {address}: cannot join a Ray cluster there ({reason})") from None
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why HOST:PORT (or ray://HOST:PORT) takes no TCP connection, or None if it does.

    Ray itself retries an address that does not answer for minutes before it gives up;
    a wrong --address should fail in seconds. `auto` and other forms are left to Ray.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
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
    if address or ray.is_initialized():
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
def _trainable(cfg: ExperimentConfig, state: SearchState) -> Any:
    """The lineage trial with the data set (via the object store) and the search context bound."""
    dataset = load_dataset(cfg.data, cfg.seed, "cpu")
    context = {"search_id": state.search_id, "parent_run_id": state.parent_run_id}
    bound = tune.with_parameters(lineage_trial, base=state.config, dataset=dataset, context=context)
    trainable = tune.with_resources(bound, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    trainable._progress_metrics = PROGRESS_METRICS  # read by Ray's console reporter
    return trainable


def _scheduler(cfg: ExperimentConfig) -> Any:
    asha = cfg.search.asha
    if not asha.enabled or cfg.prune.rounds < 2:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=PRIMARY_METRIC,
        mode="max",
        max_t=cfg.prune.rounds,
        grace_period=min(asha.grace_period, cfg.prune.rounds),
        reduction_factor=asha.reduction_factor,
    )


def _searcher(cfg: ExperimentConfig, state: SearchState) -> OptunaSearch:
    metric, mode = objectives(cfg)
    Path(state.journal).parent.mkdir(parents=True, exist_ok=True)
    return OptunaSearch(
        space=DefineByRunSpace(cfg),
        metric=metric,
        mode=mode,
        sampler=make_sampler(cfg),
        study_name=state.search_id,
        storage=journal_storage(state.journal),
    )


class _TrialEvents(tune.Callback):
    """Final trial statuses into the trial records, and one readable line per lineage.

    Only the driver knows why a trial ended: a trial ASHA stops and one cut short by an
    interrupted search both end inside `tune.report`, but only the first gets
    `on_trial_complete`. State lives in the module (`_session`): Ray pickles callbacks
    into the experiment and restores copies of them on resume.
    """

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        done = result.get("round", 0)
        status = "finished" if done >= self.rounds else "stopped"
        _set_status(trial.trial_id, status)
        how = "finished" if status == "finished" else f"stopped by ASHA after round {done}"
        _session["progress"](
            f"trial {trial.trial_id} {how}: matching sparsity {100 * result.get(PRIMARY_METRIC, 0.0):.2f}% "
            f"(round {result.get('matching_round', 0)}, val {100 * result.get('matching_val_accuracy', 0.0):.2f}%)"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _set_status(trial.trial_id, "error")
        _session["progress"](f"trial {trial.trial_id} failed after its retries; see {trial.path}")


def _set_status(trial_id: str, status: str) -> bool:
    """Write a trial's final status into its record; a failed write (disk full) is kept pending, never raised:
    an exception in a Tune callback would kill the driver mid-search."""
    store, namespace = _session["store"], _session["namespace"]
    _session["pending"][trial_id] = status
    try:
        record = store.record(namespace, trial_id) if store is not None else None
        if record is not None and record.get("status") != status:
            record["status"] = status
            store.put_record(namespace, trial_id, record)
    except (LthError, OSError) as error:
        _session["progress"](f"trial {trial_id}: cannot record status {status} yet ({error}); retried at the end")
        return False
    del _session["pending"][trial_id]
    return True


def _tuner(cfg: ExperimentConfig, state: SearchState) -> tune.Tuner:
    storage, name = state.results_path.rsplit("/", 1)
    return tune.Tuner(
        _trainable(cfg, state),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(cfg, state),
            scheduler=_scheduler(cfg),
            num_samples=cfg.search.num_trials,
            max_concurrent_trials=cfg.search.max_concurrent,
            reuse_actors=True,  # a new lineage starts in a warm process (torch imported, data fetched)
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=[_TrialEvents(cfg.prune.rounds)],
            verbose=1,
        ),
    )


# Driver --------------------------------------------------------------------------------------
def run_search(cfg: ExperimentConfig, address: str | None = None, progress: Progress = print) -> dict[str, Any]:
    """Run a new search on a local Ray (no address) or a cluster; returns its summary."""
    cfg = cfg.absolute()
    state = new_state(cfg)
    _check_resources(cfg, address)
    with ThreadPoolExecutor(1) as pool:
        # MLflow's setup (seconds for a new database) overlaps the start of a local Ray;
        # joining a cluster comes first, so a wrong --address leaves no MLflow run behind.
        local = not address and not ray.is_initialized()
        early = pool.submit(_start_tracking, cfg, state) if local else None
        with ray_session(address):
            tracker = early.result() if early is not None else _start_tracking(cfg, state)
            state.save()
            _announce(cfg, state, progress)
            leases = start_lease_actor(cfg.name)  # held here: the actor lives while the driver does
            summary = _fit(cfg, state, _tuner(cfg, state), tracker, progress)
            del leases
            return summary


def resume_search(
    name: str, output_dir: str = "./lth_runs", address: str | None = None, progress: Progress = print
) -> dict[str, Any]:
    """Continue an interrupted search by name: Tuner.restore, same Optuna study, same MLflow parent."""
    state = SearchState.load(name, output_dir)
    cfg = state.cfg().absolute()
    if not tune.Tuner.can_restore(state.results_path):
        raise ConfigError(
            f"search {name}: Ray saved no state under {state.results_path} yet; start it again with `lth-search run`"
        )
    _check_resources(cfg, address)
    with ray_session(address):
        tracker = _start_tracking(cfg, state)
        state.status = "running"
        state.save()
        progress(f"resuming search {state.search_id} from {state.results_path}")
        leases = start_lease_actor(cfg.name)
        tuner = tune.Tuner.restore(
            state.results_path, trainable=_trainable(cfg, state), resume_unfinished=True, resume_errored=True
        )
        summary = _fit(cfg, state, tuner, tracker, progress)
        del leases
        return summary


def _start_tracking(cfg: ExperimentConfig, state: SearchState) -> Any:
    """The MLflow parent run (created, or the saved one on resume); trials log under it."""
    if not cfg.tracking.enabled:
        return None
    from lth_search.tracking.runs import SearchTracker

    tracker = SearchTracker.start(cfg, ray_results_path=state.results_path, parent_run_id=state.parent_run_id)
    state.parent_run_id = getattr(tracker, "parent_run_id", None)
    return tracker


def _announce(cfg: ExperimentConfig, state: SearchState, progress: Progress) -> None:
    resources = ray.cluster_resources()
    space = DefineByRunSpace(cfg).categorical
    progress(
        f"search {state.search_id}: {cfg.search.num_trials} lineages of up to {cfg.prune.rounds} rounds, "
        f"{cfg.search.max_concurrent} at a time, on Ray with {resources.get('CPU', 0):g} CPUs / "
        f"{resources.get('GPU', 0):g} GPUs"
    )
    progress(f"  searching {', '.join(f'{k} in {v}' for k, v in space.items()) or 'nothing (fixed choices)'}")
    progress(f"  stages: {cfg.store_uri()}   Ray results: {state.results_path}")


def _fit(cfg: ExperimentConfig, state: SearchState, tuner: tune.Tuner, tracker: Any, progress: Progress) -> dict[str, Any]:
    """Run the Tuner, settle every trial's status, finish tracking, print the summary."""
    store = StageStore.from_config(cfg)
    _session.update(progress=progress, store=store, namespace=records_namespace(cfg.name), pending={})
    # One snapshot per trial checkpoint keeps a killed driver's state at most a round behind;
    # Ray warns about that frequency by default.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    began = time.time()
    try:
        grid = tuner.fit()
    except BaseException:  # a crash must leave a resumable state, not "running"
        state.status = "interrupted"
        _save_quietly(state)
        raise
    pending = {t: s for t, s in dict(_session["pending"]).items() if not _set_status(t, s)}
    records = {k: v for k, v in store.records(records_namespace(cfg.name)).items() if v.get("search_id") == state.search_id}
    trials = grid._experiment_analysis.trials  # ResultGrid has no public per-trial status
    complete = len(trials) >= cfg.search.num_trials and all(
        (pending.get(t.trial_id) or records.get(t.trial_id, {}).get("status")) in FINAL or t.status == "ERROR"
        for t in trials
    )
    if complete:
        _abandon_orphans(store, cfg.name, records, {t.trial_id for t in trials})
        close_orphans(state.journal, state.search_id)
    state.status = "finished" if complete else "interrupted"
    state.finished_at = time.time() if complete else None
    state.save()
    if tracker is not None and complete:
        tracker.finish(list(records.values()))
    summary = summarize(list(records.values()), state.search_id, cfg.prune.rounds, _links(cfg, state, began))
    summary["status"] = state.status
    emit(summary_lines(summary), progress)
    if not complete:
        progress(f"search interrupted: continue it with `lth-search resume {cfg.name} --output-dir {cfg.output_dir}`")
    return summary


def _save_quietly(state: SearchState) -> None:
    try:
        state.save()
    except OSError:
        pass  # the disk that failed the search; its last saved status stands


def _abandon_orphans(store: StageStore, name: str, records: dict[str, dict], known: set[str]) -> None:
    """Mark trials Ray does not know: started by a killed driver after Ray's last snapshot.

    Ray's restored state never had them, so the search ran replacements; their stages
    stay in the store (and were reused), their records say what happened.
    """
    for trial_id, record in records.items():
        if trial_id not in known and record.get("status") not in FINAL:
            record["status"] = "abandoned"
            store.put_record(records_namespace(name), trial_id, record)


def _links(cfg: ExperimentConfig, state: SearchState, began: float) -> dict[str, Any]:
    extra: dict[str, Any] = {"wall_s": time.time() - began, "results_path": state.results_path}
    if not cfg.tracking.enabled:
        return extra
    uri = cfg.tracking_uri()
    extra["tracking_uri"] = uri
    extra["parent_run_id"] = state.parent_run_id
    if uri.startswith(("http://", "https://")):
        extra["mlflow_command"] = f"open {uri} (the MLflow server of this search)"
        base = uri.rstrip("/")
    else:
        extra["mlflow_command"] = f"mlflow ui --backend-store-uri {uri} --port 5000"
        base = "http://127.0.0.1:5000"
    from lth_search.tracking.runs import experiment_id as mlflow_experiment_id

    experiment_id = mlflow_experiment_id(cfg)
    if experiment_id is not None:
        extra["mlflow_link"] = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return extra
