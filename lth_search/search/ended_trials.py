"""What the driver keeps of a trial that has ended: what resume and the summary need, not its history.

Ray Tune keeps every trial it ever ran in the driver, and with each its running metric
windows (`metric_analysis`: max/min/avg/last and two last-n averages of every numeric
metric; `metric_n_steps`: a deque per metric and window), serialised again into every
snapshot of the search's state. Measured on the quickstart's trials (38 reported keys): a
trial's snapshot entry was 27 KB, 12 KB of it these windows, and the driver's Python heap
grew 116 KB per ended trial, ~55 KB of it these windows. Each snapshot (at every trial
checkpoint then, on Ray's clock now: driver.py) serialised every ended trial's windows again:
memory and CPU per trial that grew with the number of trials. With them (and the checkpoint's
copy of the result) dropped, an ended trial's entry is ~11 KB and the heap grows ~40 KB per
trial (the rest: Ray's cached JSON of the entry, `last_result`, Optuna's study).

Nothing reads the windows of an ended trial here: the console and the summary read
`last_result` and the trial records, the searcher has been told (`on_trial_complete` runs
before the callbacks), and a trial Ray restarts (an errored one on resume) starts its
windows afresh. `ForgetEnded` empties them when a trial completes or errors, and the copy of
the result kept beside a finished trial's checkpoint (`forget_checkpoint_metrics`); Ray marks the
trial for its next snapshot right after (`_schedule_trial_stop`), so the snapshot carries
the small state. Checked against Ray 2.60 (`ray/tune/trainable/metadata.py`,
`ray/tune/execution/tune_controller.py` `stop_trial` / `_process_trial_failure`,
`ray/train/_internal/checkpoint_manager.py`); on a Ray
without these attributes nothing is changed.

After the search, `release_results` lets go of what the Tuner keeps of every trial once the
driver has read the trial ids it needs (driver.py).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from lth_search.search.driver_heap import give_back_free_memory

WINDOWS = ("metric_analysis", "metric_n_steps")
"""Tune's per-metric windows on a trial's `run_metadata` (Ray 2.60)."""


def forget_windows(trial: Any) -> None:
    """Empty an ended trial's metric windows."""
    metadata = getattr(trial, "run_metadata", None)
    for name in WINDOWS:
        if getattr(metadata, name, None):
            setattr(metadata, name, {})  # its __setattr__ drops its cached JSON as well


def forget_checkpoint_metrics(trial: Any) -> None:
    """Empty the metrics stored beside a finished trial's checkpoints (Ray keeps a copy of the
    result that came with each kept checkpoint, ~4 KB a trial in each snapshot). A trial that
    finished is never restored from its checkpoint; an errored one may be (resume restarts it
    from its checkpoint, its last result taken from these metrics), so it keeps them."""
    metadata = getattr(trial, "run_metadata", None)
    manager = getattr(metadata, "checkpoint_manager", None)
    kept = [*getattr(manager, "_checkpoint_results", []), getattr(manager, "_latest_checkpoint_result", None)]
    for result in kept:
        if getattr(result, "metrics", None):
            result.metrics = {}
    if metadata is not None and hasattr(metadata, "invalidate_cache"):
        metadata.invalidate_cache()


TRIM_EVERY = 50
"""Ended trials between two hand-backs of the driver's freed heap (`give_back_free_memory`) during a search."""


class ForgetEnded(tune.Callback):
    """Tune callback: what an ended trial no longer needs is dropped (see the module's docstring), and
    every `TRIM_EVERY` ended trials the freed heap goes back to the system (a trim takes ~3 ms; what a
    snapshot and the dropped windows freed would otherwise stay resident). Measured once each at 1,000
    trials (bench/scale.py, loaded machine): the driver's RSS at 75 % of the search 709 MB with it, 732
    MB without; the peak, at the finish, did not move (768 / 770 MB)."""

    def __init__(self) -> None:
        self.ended = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forget_windows(trial)
        forget_checkpoint_metrics(trial)
        self._count()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        forget_windows(trial)
        self._count()

    def _count(self) -> None:
        self.ended += 1
        if self.ended % TRIM_EVERY == 0:
            give_back_free_memory(collect=False)


def release_results(tuner: tune.Tuner) -> None:
    """Let go of Ray's results and trials once the driver has read what it needs of them.

    The Tuner keeps the ExperimentAnalysis behind the ResultGrid it returned, and with it every
    trial and a DataFrame of each trial's results (~20 KB a trial in the quickstart's searches):
    memory that grows with the number of trials, held while the summary and tracking's finish,
    which peaks, run (issue 24). Ray 2.60 keeps it in `TunerInternal._experiment_analysis`, read
    again only by `Tuner.get_results`, which lth-search does not call; elsewhere nothing changes.
    """
    local = getattr(tuner, "_local_tuner", None)
    if local is not None and hasattr(local, "_experiment_analysis"):
        local._experiment_analysis = None
    if local is not None and hasattr(local, "get_run_config"):
        forget_callbacks(local.get_run_config())
    give_back_free_memory()


def forget_callbacks(run_config: Any) -> None:
    """Empty a finished Tuner's callbacks. Tune adds its console callback (`TrialProgressCallback`)
    to the run config's list, and it, like Ray's JSON writer (result_file.py), keeps every trial Tune
    ran, by trial, after `fit` returns: all of them stayed in the driver through the summary and
    tracking's finish, where its memory peaks. A 1,000-trial search of bench/scale.py's trials (one
    run each): RSS after this call 622 -> 613 MB, the peak at the finish 667 -> 648 MB. Read the
    callbacks (driver.py `_search_failure`) before this."""
    callbacks = getattr(run_config, "callbacks", None)
    if isinstance(callbacks, list):
        callbacks.clear()
