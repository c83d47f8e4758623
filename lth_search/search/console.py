"""What a person sees of a search: a few lines on stderr, Ray's tables only when asked.

By default (verbosity 0) a search prints its header, one line when a lineage starts
(its choices) and one when it ends (its score), a one-line status every few seconds
(done / running / pending, best so far), and the summary. A search of more than
`EACH_TRIAL_UP_TO` lineages prints no line per start and end: its status line counts them
(started, finished, stopped, failed since the last status), and only the first
`FAILURES_SHOWN` failures get a line of their own, so the console stays about a page long
at any number of trials. `-v` (1) brings back Ray's
own trial tables and the INFO logs of MLflow and Optuna; `-vv` (2) Ray's most verbose
tables; `-q` (-1) prints errors only. Everything human goes to stderr, so `--json` owns
stdout.

`use_console` sets the process up (library loggers, Tune's automatic loggers) and
returns the printer for the verbosity; `SearchConsole` prints through it. Ray pickles
callbacks into its experiment state, so the console holds nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from ray import tune

from lth_search.engine.lineage.metric import metric_named
from lth_search.runs.record import TrialStatus
from lth_search.search.ray_leases import waiting_trials
from lth_search.search.space import PRIMARY_METRIC, choices_of
from lth_search.search.trial_failure import error_text, reason

STATUS_EVERY_S = 10.0
"""Seconds between status lines at first; the gap grows with the search's age (a sixth of it) up
to a minute, so a 1-minute search prints ~6 and an hour-long one ~70; an unchanged status waits
the full minute."""
EACH_TRIAL_UP_TO = 50
"""Up to this many lineages a search prints a line per lineage start and end; above, counts in its status."""
FAILURES_SHOWN = 10
"""Failure lines a large search prints (each says why); later ones are counted in the status line."""
QUIET_LOGGERS = ("mlflow", "alembic", "optuna", "ray", "ray.tune", "ray.train", "filelock")
"""Libraries whose INFO lines are noise on a search's console (shown again with -v)."""


def use_console(verbosity: int, line: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """Set up the driver's console for `verbosity`; returns the function that prints a human line.

    Quietens library loggers and Tune's automatic loggers (their TensorBoard hint and CSV
    files nobody reads; search/result_file.py keeps result.json), here and in
    the local Ray's workers, which inherit this process's environment.
    """
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Ray's new reporter prints its experiment box even when silent; its old one does not.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbosity > 0 else "0"
    # A failed trial's 20-line traceback: the console's own line says why (search/trial_failure.py).
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "1" if verbosity > 0 else "0"
    if verbosity <= 0:  # the same error again, from a result of the stopped trial nobody asked for
        os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
    else:
        os.environ.pop("RAY_IGNORE_UNHANDLED_ERRORS", None)
    _quiet_worker_deaths(verbosity <= 0)
    level = logging.INFO if verbosity > 0 else logging.WARNING
    if verbosity <= 0:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow in trial processes
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("ray.tune.tune").addFilter(_NO_TUNE_HINT)  # added once: filters are a set
    slow = logging.getLogger("ray.tune.utils.util")
    (slow.addFilter if verbosity <= 0 else slow.removeFilter)(_NO_SLOW_LOOP_HINT)
    # Ray's note that a new local cluster enabled token auth: lth-search's own Ray is on loopback
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR if verbosity <= 0 else logging.INFO)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbosity > 0 else optuna.logging.WARNING)
    return (line or _stderr) if verbosity >= 0 else _silent


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _silent(text: str) -> None:
    pass


def ray_verbose(verbosity: int) -> int:
    """Ray Tune's `RunConfig(verbose=...)` for our verbosity: its tables only with -v."""
    return max(0, min(2, verbosity))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _matching_val(result: dict) -> str:
    """"val 61.2%" at the matching round, or "val perplexity 12.3" for a lineage judged on a loss."""
    metric = metric_named(result.get("metric"))
    if metric.name == "accuracy":
        return f"val {_pct(result.get('matching_val_accuracy', 0.0))}"
    return f"val {metric.name} {metric.format(result.get(f'matching_{metric.val_key}'))}"


def _val_score(result: dict) -> float:
    """The matching round's val metric, signed so that higher is better (the tie-break among equal sparsities)."""
    metric = metric_named(result.get("metric"))
    if metric.name == "accuracy":
        return result.get("matching_val_accuracy", 0.0)
    value = result.get(f"matching_{metric.val_key}")
    return -value if value is not None else -float("inf")


def _choices(trial: Any) -> str:
    choices = choices_of(trial.config or {})
    return ", ".join(f"{k}={v}" for k, v in sorted(choices.items())) or "the config's prune values"


def _elapsed(seconds: float) -> str:
    """`0:10`, `12:05`, `1:02:03`: a clock (`[0m10s]` read as a stray colour code)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_TUNE_NOISE = ("Stop signal received", "Trials did not complete")


class _NoTuneRestoreHint(logging.Filter):
    """Ray Tune's "Resume experiment with: Tuner.restore(...)", its "Stop signal received" on an
    interrupt and its list of unfinished trials: lth-search prints its own resume command, its
    reason for stopping and which trials did not finish."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tuner.restore(" not in message and not message.startswith(_TUNE_NOISE)


def _quiet_worker_deaths(quiet: bool) -> None:
    """Drop the raylet's paragraph on a dead worker (its pid, exit type, OOM advice) from the console.

    The console prints one line for the same event ("trial X failed (its worker process died:
    ...); Ray retries it"). Ray prints the raylet's error messages from a thread of the driver
    through `ray._private.worker.print_to_stdstream`, with no setting to turn them off (Ray
    2.60), so that function is wrapped once; every other raylet message still prints, and -v
    shows these too. Without the private function (another Ray), nothing is changed.
    """
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        return
    original = getattr(original, "_lth_original", original)

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if quiet and data.get("pid") == "raylet" and any("A worker died or was killed" in line for line in lines):
            return
        original(data, ignore_prefix)

    print_to_stdstream._lth_original = original  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


_NO_TUNE_HINT = _NoTuneRestoreHint()


class _NoSlowLoopHint(logging.Filter):
    """Tune's "The `callbacks.on_step_end` operation took 1.466 s, which may be a performance
    bottleneck": on a loaded machine its own loop is slow, which is no news to the user and
    nothing they can act on; -v shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("The `") and "which may be a performance bottleneck" in message)


_NO_SLOW_LOOP_HINT = _NoSlowLoopHint()


class SearchConsole(tune.Callback):
    """One line per lineage start and end, and a status line every few seconds.

    Why a trial ended (finished by itself, stopped by the scheduler) is the driver's to
    decide from the trial record; it tells the console through `ended` and `failed`.
    """

    def __init__(self, num_trials: int, line: Callable[[str], None], status_every_s: float = STATUS_EVERY_S,
                 search_name: str | None = None) -> None:
        self.num_trials, self.line, self.status_every_s = num_trials, line, status_every_s
        self.search_name = search_name
        """Whose lease actor to ask how many trials wait for a stage (their workers print nothing)."""
        self.began = time.time()
        self.last_status_at = self.began
        self.last_status = ""
        self.each_trial = num_trials <= EACH_TRIAL_UP_TO
        """A line per lineage start and end; else they are counted (`events`) in the status line."""
        self.events: dict[str, int] = {}
        self.failures = 0

    def _count(self, event: str) -> None:
        self.events[event] = self.events.get(event, 0) + 1

    def _failure(self, text: str) -> None:
        self.failures += 1
        if self.each_trial or self.failures <= FAILURES_SHOWN:
            self.line(text)
        else:
            self._count("failed")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.each_trial:
            self.line(f"trial {trial.trial_id} started: {_choices(trial)}")
        else:
            self._count("started")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        why = reason(error_text(trial))
        self._failure(f"trial {trial.trial_id} failed ({why}); Ray retries it, stored stages are reused")

    def ended(self, trial: Any, status: TrialStatus) -> None:
        result = trial.last_result or {}
        if result.get("lineage_failed"):
            self._failure(f"trial {trial.trial_id} has no ticket: its {result['lineage_failed']}; try a lower "
                          "train.lr (or a warmup), and check the data for NaN or inf")
            return
        if not self.each_trial:
            self._count("finished" if status is TrialStatus.FINISHED else "stopped by ASHA")
            return
        how = "finished" if status is TrialStatus.FINISHED else f"stopped by ASHA after round {result.get('round', 0)}"
        self.line(
            f"trial {trial.trial_id} {how}: matching sparsity {_pct(result.get(PRIMARY_METRIC, 0.0))} "
            f"(round {result.get('matching_round', 0)}, {_matching_val(result)})"
        )

    def failed(self, trial: Any) -> None:
        self._failure(f"trial {trial.trial_id} failed after its retries ({reason(error_text(trial))}); see {trial.path}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.time()
        if now - self.last_status_at < min(60.0, max(self.status_every_s, (now - self.began) / 6)):
            return
        status = self.status(trials)
        if status == self.last_status and now - self.last_status_at < 60:
            return
        self.last_status, self.last_status_at = status, now
        since = ", ".join(f"{count} {event}" for event, count in self.events.items())
        self.events = {}
        self.line(f"[{_elapsed(now - self.began)}] {status}" + (f" ({since} since the last status)" if since else ""))

    def status(self, trials: list) -> str:
        """'3/12 done, 2 running; best so far 87.0% sparsity (trial X, val 61.2%)'."""
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        scored = [t.last_result for t in trials
                  if (t.last_result or {}).get(PRIMARY_METRIC) is not None and not t.last_result.get("lineage_failed")]
        text = f"{done}/{self.num_trials} done, {running} running"
        waiting = waiting_trials(self.search_name) if self.search_name and running else None
        if waiting:
            text += f" ({waiting} waiting for a stage another trial is computing)"
        if scored:
            best = max(scored, key=lambda r: (r[PRIMARY_METRIC], _val_score(r)))
            text += (
                f"; best so far {_pct(best[PRIMARY_METRIC])} sparsity "
                f"(trial {best.get('trial_id')}, {_matching_val(best)})"
            )
        return text
