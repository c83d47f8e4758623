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
from lth_search.errors import ConfigError
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.engine.data import load_dataset
from lth_search.engine.models import check_parts
from lth_search.engine.lineage.results import LineageResult
from lth_search.runs.trial import run_trial

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def open_store(cfg: ExperimentConfig, lease_service: Any = None) -> Any:
    """The stage store of `cfg` (created on first use)."""
    from lth_search.store.stage_store import StageStore

    return StageStore.from_config(cfg, lease_service=lease_service)


def run_lineage_command(
    config: str | Path | ExperimentConfig,
    overrides: Sequence[str] = (),
    use_store: bool = True,
    track: bool = True,
    progress: Progress = _quiet,
    round_line: Callable[[dict[str, Any], int], str] | None = None,
) -> LineageResult:
    """`lth-search lineage`: one lineage of `prune.kind` through the store, a progress line per round.

    It runs the same trial runner as a search trial (runs/trial.py), with no Ray, no
    trial record and, when tracking is on, its own MLflow run. Everything is validated
    (config, data files, model/data fit) before anything is written, so bad input
    leaves no output folder behind.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    cfg = cfg.absolute()
    check_parts(cfg)  # names, model/data fit, device: before any file (the data cache included) is written
    dataset = load_dataset(cfg.data, cfg.seed)  # bad or missing data files fail here, nothing written
    total = cfg.prune.rounds
    store = open_store(cfg) if use_store else MemoryStages()
    tracker = None
    if track and cfg.tracking.enabled:
        from lth_search.tracking.lineage_run import lineage_tracker

        tracker = lineage_tracker(cfg)

    def report(round_index: int, _: str, metrics: dict[str, Any]) -> None:
        if round_line is not None and round_index > 0:
            progress(round_line(metrics, total))

    def on_dense(result: LineageResult) -> None:
        dense = result.dense
        named = "  ".join(f"{key} {value:.4g}" for key, value in result.metric_values(dense).items())
        progress(
            f"dense   {dense.steps} steps  "
            + (named or f"val {100 * dense.val_accuracy:5.2f}%  test {100 * dense.test_accuracy:5.2f}%")
            + ("  (reused)" if dense.reused else "")
        )

    kind = "" if cfg.prune.kind == "imp" else f" ({cfg.prune.kind})"
    progress(f"lineage {cfg.name}{kind}: {total} rounds, stages in {cfg.store_uri() if use_store else 'memory'}")
    result = run_trial(cfg, store, report, observer=tracker, dataset=dataset, on_dense=on_dense)
    if tracker is not None:
        from lth_search.tracking.lineage_run import lineage_run_line

        progress(lineage_run_line(tracker))
    return result


def compare(
    config: str | Path | ExperimentConfig,
    kinds: Sequence[str],
    seeds: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    use_store: bool = True,
    track: bool = True,
    progress: Progress = _quiet,
    structures: Sequence[str] = (),
) -> Any:
    """`lth-search compare`: lineage kinds at the IMP lineage's sparsities, no Ray.

    `structures` (prune.structure values) adds IMP pruned with each, tabled against
    unstructured IMP at equal parameter counts.

    Writes the table, the plot (the judged metric vs remaining weights, a line per kind, seeds as
    bands), compare.json and compare.csv to `out` (default <output_dir>/compare/<name>)
    and logs one MLflow run. Returns the compare.CompareResult.
    """
    from lth_search.compare import run_compare, write_outputs
    from lth_search.config.prune import check_structure
    from lth_search.engine.lineage.kinds import check_kinds
    from lth_search.runs.trial import limit_resources
    from lth_search.tracking.plots import compare_plot

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    cfg = cfg.absolute()
    check_kinds(list(kinds))
    seeds = list(seeds) if seeds else [cfg.seed]
    limit_resources(cfg)
    store = open_store(cfg) if use_store else None
    progress(f"compare {cfg.name}: kinds {','.join(kinds)}; seeds {','.join(map(str, seeds))}; "
             f"{cfg.prune.rounds} IMP rounds; stages in {cfg.store_uri() if use_store else 'memory'}")
    for structure in structures:
        try:
            check_structure(structure)
        except ValueError as error:
            raise ConfigError(f"--structures: {error}") from None
    result = run_compare(cfg, kinds, seeds, store, progress, structures)
    summary = [vars(row) for row in result.summary()]
    png = compare_plot(summary, result.dense_mean(), f"{cfg.name}: {len(seeds)} seed(s)", result.metric)
    folder = write_outputs(result, out or cfg.output_path() / "compare" / cfg.name, png)
    progress(f"table, plot, compare.json and compare.csv in {folder}")
    if track and cfg.tracking.enabled:
        from lth_search.tracking.comparison_run import log_compare

        log_compare(cfg, result, png, progress=progress)
    return result


def _tracking(cfg: ExperimentConfig) -> Any:
    from lth_search.tracking.mlflow_observers import search_tracking

    return search_tracking(cfg)


def run_search(
    cfg: ExperimentConfig, address: str | None = None, progress: Progress = print, verbosity: int = 0
) -> dict[str, Any]:
    """Run a search on a local Ray, or on the cluster at `address` / $RAY_ADDRESS; returns its summary."""
    from lth_search.search.driver import run_search as _run

    check_parts(cfg)
    return _run(cfg, address=address, progress=progress, tracking=_tracking(cfg), verbosity=verbosity)


def resume_search(
    name: str, output_dir: str | None = None, address: str | None = None, progress: Progress = print,
    store_uri: str | None = None, verbosity: int = 0,
) -> dict[str, Any]:
    """Continue an interrupted search by name (Tuner.restore + the persisted Optuna study).

    The search is found beside its store: `store_uri`, else `<output_dir>/store`.
    """
    from lth_search.runs.state import SearchState
    from lth_search.search.driver import resume_search as _resume

    cfg = SearchState.load(name, store_uri=store_uri, output_dir=output_dir).cfg()
    return _resume(name, output_dir=output_dir, address=address, progress=progress, tracking=_tracking(cfg),
                   store_uri=store_uri, verbosity=verbosity)


def sync_search(
    name: str, output_dir: str | None = None, tracking_uri: str | None = None, progress: Progress = print,
    store_uri: str | None = None,
) -> dict[str, int]:
    """Log to MLflow what the store holds for a search and MLflow lacks."""
    from lth_search.tracking.sync import sync_search as _sync

    return _sync(name, output_dir=output_dir, tracking_uri=tracking_uri, progress=progress, store_uri=store_uri)


def best_ticket(experiment: str | None = None, search_run_id: str | None = None, max_accuracy_drop: float | None = None,
                min_sparsity: float | None = None, tracking_uri: str | None = None) -> Any:
    """The best ticket of a search, from MLflow alone: see `lth_search.tracking.ticket_reader.best_ticket`."""
    from lth_search.tracking.ticket_reader import best_ticket as _best

    return _best(experiment, search_run_id, max_accuracy_drop, min_sparsity, tracking_uri)


def list_tickets(experiment: str | None = None, tracking_uri: str | None = None,
                 search_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every ticket (trial-round) of a search, from MLflow alone."""
    from lth_search.tracking.ticket_reader import list_tickets as _list

    return _list(experiment, tracking_uri, search_run_id)


__all__ = [
    "best_ticket", "compare", "list_tickets", "load_config", "open_store", "resume_search", "run_lineage_command",
    "run_search", "sync_search",
]
