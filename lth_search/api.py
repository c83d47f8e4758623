"""The Python API behind the CLI: load a config, run a lineage or a search, fetch tickets.

It composes the layers: the search driver (Ray, Optuna) gets its tracking (MLflow) from
here, so neither adapter imports the other. Functions that need Ray or MLflow import
them when called, so importing `lth_search` stays light and the engine runs where
neither is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from lth_search.config import ExperimentConfig, load_config
from lth_search.engine.lineage import MemoryStages, preflight
from lth_search.engine.results import LineageResult
from lth_search.runs.trial import run_trial

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def open_store(cfg: ExperimentConfig, lease_service: Any = None) -> Any:
    """The stage store of `cfg` (created on first use)."""
    from lth_search.store.stages import StageStore

    return StageStore.from_config(cfg, lease_service=lease_service)


def run_lineage_command(
    config: str | Path | ExperimentConfig,
    overrides: Sequence[str] = (),
    use_store: bool = True,
    track: bool = True,
    progress: Progress = _quiet,
    round_line: Callable[[dict[str, Any], int], str] | None = None,
) -> LineageResult:
    """`lth-search lineage`: one IMP lineage through the store, a progress line per round.

    It runs the same trial runner as a search trial (runs/trial.py), with no Ray, no
    trial record and, when tracking is on, its own MLflow run. Everything is validated
    (config, data files, model/data fit) before anything is written, so bad input
    leaves no output folder behind.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    cfg = cfg.absolute()
    total = cfg.prune.rounds
    preflight(cfg)
    from lth_search.engine.data import load_dataset, resolve_device

    dataset = load_dataset(cfg.data, cfg.seed, resolve_device(cfg.train.device))  # data files and device, checked
    store = open_store(cfg) if use_store else MemoryStages()
    tracker = None
    if track and cfg.tracking.enabled:
        from lth_search.tracking.runs import lineage_tracker

        tracker = lineage_tracker(cfg)

    def report(round_index: int, _: str, metrics: dict[str, Any]) -> None:
        if round_line is not None and round_index > 0:
            progress(round_line(metrics, total))

    def on_dense(result: LineageResult) -> None:
        dense = result.dense
        progress(
            f"dense   {dense.steps} steps  val {100 * dense.val_accuracy:5.2f}%  test {100 * dense.test_accuracy:5.2f}%"
            + ("  (reused)" if dense.reused else "")
        )

    progress(f"lineage {cfg.name}: {total} rounds, stages in {cfg.store_uri() if use_store else 'memory'}")
    result = run_trial(cfg, store, report, observer=tracker, on_dense=on_dense, dataset=dataset)
    if tracker is not None:
        from lth_search.tracking.runs import lineage_run_line

        progress(lineage_run_line(tracker))
    return result


def _tracking(cfg: ExperimentConfig) -> Any:
    from lth_search.tracking.observers import search_tracking

    return search_tracking(cfg)


def run_search(cfg: ExperimentConfig, address: str | None = None, progress: Progress = print) -> dict[str, Any]:
    """Run a search on a local Ray (address None) or a Ray cluster; returns its summary."""
    from lth_search.search.driver import run_search as _run

    preflight(cfg)  # before Ray starts: a model that cannot take the data fails here, not in every trial
    return _run(cfg, address=address, progress=progress, tracking=_tracking(cfg))


def resume_search(
    name: str, output_dir: str | None = None, address: str | None = None, progress: Progress = print
) -> dict[str, Any]:
    """Continue an interrupted search by name (Tuner.restore + the persisted Optuna study)."""
    from lth_search.runs.state import SearchState
    from lth_search.search.driver import resume_search as _resume

    cfg = SearchState.load(name, output_dir).cfg()
    return _resume(name, output_dir=output_dir, address=address, progress=progress, tracking=_tracking(cfg))


def sync_search(
    name: str, output_dir: str | None = None, tracking_uri: str | None = None, progress: Progress = print
) -> dict[str, int]:
    """Log to MLflow what the store holds for a search and MLflow lacks."""
    from lth_search.tracking.sync import sync_search as _sync

    return _sync(name, output_dir=output_dir, tracking_uri=tracking_uri, progress=progress)


def best_ticket(*args: Any, **kwargs: Any) -> Any:
    """The best ticket of a search (see `lth_search.tickets.best_ticket`)."""
    from lth_search.tickets import best_ticket as _best

    return _best(*args, **kwargs)


def list_tickets(*args: Any, **kwargs: Any) -> Any:
    """Every ticket (trial-round) of a search (see `lth_search.tickets.list_tickets`)."""
    from lth_search.tickets import list_tickets as _list

    return _list(*args, **kwargs)


__all__ = [
    "best_ticket", "list_tickets", "load_config", "open_store", "resume_search", "run_lineage_command",
    "run_search", "sync_search",
]
