"""The search driver: Ray Tune runs IMP lineages, Optuna proposes choices, ASHA stops laggards.

`run_search(cfg)` starts (or joins) Ray, builds the data set once and shares it through
the object store, starts the search's lease actor and MLflow parent run, and runs a
`tune.Tuner` whose trials are lineages (trial.py). Everything needed to continue lives
beside the store, on the same storage (runs/state.py): `searches/<name>/search.json`
(config, Ray results path, parent run id, status), `optuna.journal` (the study) and
Ray's results, so `resume_search(name)` restores the Tuner after a killed driver, from
any machine that reaches the store, and Optuna continues the same study.

Which Ray it runs on is search/ray_session.py; the trial records' final statuses
search/trial_status.py; what a person sees of the search search/console.py.

One driver at a time drives a search (runs/search_lease.py): a second `run` of a name
that is running, or a second `resume`, is refused before it writes anything.

Each `run` is a new search with its own id (`<name>-<timestamp>`): its Ray results
folder and Optuna study are its own, while stages come from the shared store, so
running the quickstart twice reuses every stage instead of mixing two studies.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import ray
import torch
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import load_dataset, resolve_device
from lth_search.errors import ConfigError, RuntimeFailure
from lth_search.runs.confirmation import confirm_seeds
from lth_search.runs.observers import SearchObserver, SearchTracking
from lth_search.runs.record import TrialRecord
from lth_search.runs.search_lease import SearchLease
from lth_search.runs.state import SearchState, SearchStatus, new_state
from lth_search.runs.summary import chosen_record, emit, summarize, summary_lines
from lth_search.runs.trial import cuda_memory_fraction
from lth_search.search.confirm import SelectionAhead, run_confirmation
from lth_search.search.console import SearchConsole, ray_verbose, use_console
from lth_search.search.driver_heap import cap_malloc_arenas
from lth_search.search.durable import check_durable, result_places
from lth_search.search.ended_trials import ForgetEnded, release_results
from lth_search.search.journal import journal_storage
from lth_search.search.panel_runs import train_dense
from lth_search.search.panel_workers import PanelWorkers
from lth_search.search.warm_panels import WarmPanels
from lth_search.search.ray_leases import start_lease_actor
from lth_search.search.relocation import relocated_search
from lth_search.search.ray_storage import ray_storage
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
from lth_search.search.ray_session import check_reachable, check_resources, cluster_address, ray_session
from lth_search.search.result_file import result_files
from lth_search.search.shared_data import SharedDataset
from lth_search.search.trainable import PROGRESS_METRICS, lineage_trial
from lth_search.search.trial_failure import SearchFailure
from lth_search.search.trial_status import TrialEvents, abandon_orphans, ended_orphans, ended_trials, ray_trials, settle
from lth_search.store.stage_store import StageStore

Progress = Callable[[str], None]


# Tune pieces ---------------------------------------------------------------------------------
def _trainable(cfg: ExperimentConfig, state: SearchState, tracking: SearchTracking | None) -> Any:
    """The lineage trial with the data set (via the object store, fetched once per process) and the
    search context bound."""
    dataset = SharedDataset(load_dataset(cfg.data, cfg.seed, "cpu"))
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


def _callbacks(cfg: ExperimentConfig, progress: Progress, workers: PanelWorkers, search_id: str,
               ) -> list[tune.Callback]:
    """Trial statuses with their console lines, the console's own events, a failure that stops
    the search (search/trial_failure.py), Tune's result.json, the confirmation's workers started
    in the search's tail with the selection runs already certain (search/panel_workers.py), and
    what an ended trial no longer needs dropped (search/ended_trials.py)."""
    console = SearchConsole(trial_budget(cfg), progress, search_name=cfg.name)
    warm = ([WarmPanels(workers, trial_budget(cfg), search_id, SelectionAhead(cfg, search_id))]
            if confirm_seeds(cfg) else [])
    # ForgetEnded last: the others read an ended trial first (search/ended_trials.py)
    return [TrialEvents(cfg, console), console, SearchFailure(), *result_files(), *warm, ForgetEnded()]


def _search_failure(tuner: tune.Tuner) -> str | None:
    """The message of the failure that stopped this run of the Tuner, if one did."""
    callbacks = tuner._local_tuner.get_run_config().callbacks or []
    return next((c.message for c in callbacks if isinstance(c, SearchFailure) and c.message), None)


def _tuner(
    cfg: ExperimentConfig, state: SearchState, tracking: SearchTracking | None, progress: Progress, verbosity: int,
    workers: PanelWorkers,
) -> tune.Tuner:
    storage, name = state.results_path.rsplit("/", 1)
    storage_path, filesystem = ray_storage(storage)
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
            # Ray snapshots the search on its own clock (every max(10 s, 19 x a snapshot's time)),
            # not at every trial checkpoint as num_to_keep=1 made it: a snapshot copies every
            # trial's files, so per checkpoint it was half the driver's time at 100 tiny trials
            # and, on S3, ~1,400 requests a trial at 100 (issue 24). A driver killed between
            # snapshots is resumed from an older state: the lineages that ended since run again,
            # each stage from the store, and the searcher does not tell the study twice
            # (scheduler.py `_told_before`). Checkpoints are a few bytes and all kept.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=_callbacks(cfg, progress, workers, state.search_id),
            verbose=ray_verbose(verbosity),
        ),
    )


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
    check_durable(cfg)  # before anything is written: not into a folder Ray deletes
    progress = use_console(verbosity, progress)
    cap_malloc_arenas()
    cfg.check_search_space()
    cfg = cfg.absolute()
    state = new_state(cfg)
    check_resources(cfg, address)
    check_reachable(address)
    with SearchLease(StageStore.from_config(cfg), cfg.name, "run"), ThreadPoolExecutor(2) as pool:
        # Tracking's setup (seconds for a new MLflow database) overlaps the start of a local
        # Ray; joining a cluster comes first, so a wrong --address leaves no run behind.
        local = not cluster_address(address) and not ray.is_initialized()
        early = pool.submit(_start_tracking, cfg, state, tracking) if local else None
        dense = pool.submit(_dense_ahead, cfg) if local and _dense_ahead_fits(cfg) else None
        if local:
            pool.submit(_preload_tune_imports)
        with ray_session(address, verbosity):
            observer = early.result() if early is not None else _start_tracking(cfg, state, tracking)
            state.save()
            _announce(cfg, state, progress)
            leases = start_lease_actor(cfg.name)  # held here: the actor lives while the driver does
            workers = PanelWorkers(cfg)
            try:
                if dense is not None:
                    dense.result()  # before Tune: the trials' leases (Ray's lease actor) do not see its own
                tuner = _tuner(cfg, state, tracking, progress, verbosity, workers)
                return _fit(cfg, state, tuner, observer, progress, address, workers)
            finally:
                workers.close()
                del leases


def resume_search(
    name: str, output_dir: str | None = None, address: str | None = None, progress: Progress = print,
    tracking: SearchTracking | None = None, store_uri: str | None = None, verbosity: int = 0,
) -> dict[str, Any]:
    """Continue an interrupted search by name: Tuner.restore, same Optuna study, same tracking run.

    The search is found beside its store (`store_uri`, default `<output_dir>/store`), so
    it resumes from any machine or folder that reaches that storage.
    """
    progress = use_console(verbosity, progress)
    cap_malloc_arenas()
    state = SearchState.load(name, output_dir, store_uri=store_uri)
    cfg = state.cfg().absolute()
    check_durable(cfg)
    results, filesystem = ray_storage(state.results_path)
    if not tune.Tuner.can_restore(results, storage_filesystem=filesystem):
        raise ConfigError(
            f"search {name}: Ray saved no state under {state.results_path} yet; start it again with `lth-search run`"
        )
    check_resources(cfg, address)
    check_reachable(address)
    with SearchLease(StageStore.from_config(cfg), cfg.name, "resume"), ray_session(address, verbosity):
        observer = _start_tracking(cfg, state, tracking)
        state.status, state.failure = SearchStatus.RUNNING, None
        state.save()
        progress(f"resuming search {state.search_id} from {state.results_path}")
        progress(_places(cfg, state))
        leases = start_lease_actor(cfg.name)
        tuner = tune.Tuner.restore(
            results, trainable=_trainable(cfg, state, tracking), resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
        # Tuner.restore brings back the first run's pickled RunConfig and has no public way to
        # change it; this run's console (its printer, -v/-q) replaces the pickled one.
        workers = PanelWorkers(cfg)
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = _callbacks(cfg, progress, workers, state.search_id)
        run_config.verbose = ray_verbose(verbosity)
        relocated_search(tuner, cfg, state.journal, state.search_id)  # a copied or moved folder continues where it is now
        try:
            return _fit(cfg, state, tuner, observer, progress, address, workers)
        finally:
            workers.close()
            del leases


def _preload_tune_imports() -> None:
    """Import now what Tune's `fit()` imports before its first trial: its usage tagging
    (ray/air/_internal/usage.py `_count_callbacks`, run whatever the telemetry setting) loads
    every logger integration Ray ships, and the MLflow one imports mlflow: 1.3 s of the
    quickstart's start on 2 cores when tracking had not loaded it. Run in the thread that
    waits for a local Ray to start, it costs no wall time."""
    try:
        from ray.air._internal.usage import _count_callbacks
    except ImportError:  # another Ray: its fit() imports what it imports
        return
    _count_callbacks(None)


DENSE_AHEAD_STEPS = 6000
"""At most this many dense steps (train.steps x the replicates) are trained ahead in the
driver: the quickstart's 3 x 1,500 MLP steps take ~3 s of one core, about a local Ray's
start. More would hold Tune's start (and Ctrl-C, which waits for the stage in hand) for the
whole dense training, and gain nothing past the start's idle cores."""


def _dense_ahead_fits(cfg: ExperimentConfig) -> bool:
    """Whether `_dense_ahead` pays: on CPU, and little enough work to end with Ray's start.

    Not when the trials hold GPUs or a CUDA memory cap, even with the device on CPU: the
    trial's `limit_resources` would then open a CUDA context in the driver to set the cap."""
    return (resolve_device(cfg.train.device).type == "cpu"
            and cfg.resources.gpu == 0 and cuda_memory_fraction(cfg) is None
            and cfg.train.steps * max(cfg.prune.dense_replicates, 1) <= DENSE_AHEAD_STEPS)


def _dense_ahead(cfg: ExperimentConfig) -> None:
    """The default recipe's dense stages (its seed's and the replicates: the first trial's own,
    every trial's baseline), trained in the driver while a local Ray starts and cores sit idle
    (~4 core-s of the quickstart's start; then the first trial trained them while the second
    waited). On the store's own leases, so it ends before Tune starts. CPU only: on a GPU the
    driver would take memory that Ray gives the trials. A failure is the trials' to meet and
    report, in their records and on the console. Trained on the trial's thread count
    (`train_dense`), so the bytes are a trial's; the driver's own count is put back after."""
    threads = torch.get_num_threads()
    try:
        train_dense(cfg.model_dump(mode="json"), [cfg.seed], owner=None)
    except Exception as error:  # noqa: BLE001 - the first trial trains (and reports) the same stages
        logging.getLogger(__name__).debug("dense stages ahead of the search: %s", error)
    finally:
        torch.set_num_threads(threads)


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
    progress(_places(cfg, state))


def _places(cfg: ExperimentConfig, state: SearchState) -> str:
    """The header's line of where this search's results go (search/durable.py)."""
    folder = state.journal.rsplit("/", 1)[0]
    return replace(result_places(cfg), state=folder, ray_results=state.results_path).line()


def _fit(
    cfg: ExperimentConfig, state: SearchState, tuner: tune.Tuner, observer: SearchObserver | None,
    progress: Progress, address: str | None, workers: PanelWorkers,
) -> dict[str, Any]:
    """Run the Tuner, settle every trial's status, finish tracking, print the summary."""
    began = time.time()
    try:
        grid = tuner.fit()
    except BaseException:  # a crash leaves a resumable state, not "running"
        state.status = SearchStatus.INTERRUPTED
        _save_quietly(state)
        raise
    failure = _search_failure(tuner)
    if failure is not None:  # resumable: Tune snapshotted every trial as it was (trial_failure.py)
        state.status, state.failure = SearchStatus.FAILED, failure
        _save_quietly(state)
        raise RuntimeFailure(f"search {cfg.name} stopped: {failure} (for this search: "
                             f"`{_resume_command(cfg, address)}`)")
    trials, ended = ray_trials(grid), ended_trials(grid)
    del grid
    release_results(tuner)
    store = StageStore.from_config(cfg)
    damaged: list[str] = []
    records = {r.trial_id: r for r in TrialRecord.load_all(store, cfg.name, state.search_id, unreadable=damaged)}
    if damaged:
        progress(f"trial record(s) {', '.join(sorted(damaged)[:5])} in {cfg.store_uri()} cannot be read; left out")
    settle(store, cfg, records, {t for t, done in ended.items() if done and not trials.get(t)})
    lineages = len(trials) + len(ended_orphans(list(records.values()), set(trials)))  # and those Ray never saw
    complete = lineages >= trial_budget(cfg) and all(
        errored or (trial_id in records and records[trial_id].status.final) for trial_id, errored in trials.items()
    )
    if complete:
        abandon_orphans(store, records, set(trials))
        close_orphans(state.journal, state.search_id)
    state.status = SearchStatus.FINISHED if complete else SearchStatus.INTERRUPTED
    state.finished_at = time.time() if complete else None
    state.save()
    confirmation = None
    if complete:
        confirmation = run_confirmation(cfg, state.search_id, list(records.values()), progress, workers)
    workers.close()  # their slots go back to Ray (they started in the search's tail, maybe for nothing)
    if complete:
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
    if not complete:  # a trial writes its record after its first stage: count the ones Ray ran too
        cut = sum(1 for t, errored in trials.items() if not errored and not ended.get(t))
        summary["unfinished"] = max(summary["unfinished"], cut)
        summary["trials"] = max(summary["trials"], len(trials))
    emit(summary_lines(summary), progress)
    if not complete:
        done = summary["finished"] + summary["stopped_by_asha"] + summary["errored"]
        progress(f"search interrupted with {done} of {trial_budget(cfg)} lineages done and {summary['unfinished']} "
                 f"cut short (what they stored is kept): continue it with `{_resume_command(cfg, address)}`")
    return summary


def _resume_command(cfg: ExperimentConfig, address: str | None) -> str:
    """The command that continues this search, wherever it was started from."""
    where = f"--store-uri {cfg.store.uri}" if cfg.store.uri else f"--output-dir {cfg.output_dir}"
    return f"lth-search resume {cfg.name} {where}" + (f" --address {address}" if address else "")
