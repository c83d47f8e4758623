"""The Python API behind the CLI: load a config, run a lineage or a search, fetch tickets.

Functions that need Ray or MLflow import them when called, so importing `lth_search`
stays light and the engine runs where neither is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from lth_search.config import ExperimentConfig, load_config
from lth_search.engine.lineage import Lineage, LineageResult, RoundResult, run_lineage

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def use_cpus(cpus: float) -> None:
    """Train on as many torch threads as the config gives a trial (`resources.cpu`).

    A lineage run from the CLI then computes exactly what a search trial computes (CPU
    float results depend on the thread count), and two lineages on two cores do not
    oversubscribe them.
    """
    import torch

    torch.set_num_threads(max(1, int(cpus)))


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
    round_line: Callable[[RoundResult, int], str] | None = None,
) -> LineageResult:
    """`lth-search lineage`: one IMP lineage through the store, a progress line per round.

    Everything is validated (config, data files, model/data fit) before anything is
    written, so bad input leaves no output folder behind.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config, overrides)
    cfg = cfg.absolute()
    use_cpus(cfg.resources.cpu)
    lineage = Lineage(cfg)
    if use_store:
        lineage.store = open_store(cfg)
    total = cfg.prune.rounds

    def on_round(round_result: RoundResult, _: LineageResult) -> None:
        if round_line is not None:
            progress(round_line(round_result, total))

    def on_dense(result: LineageResult) -> None:
        progress(
            f"dense   {result.dense['steps']} steps  val {100 * result.dense['val_accuracy']:5.2f}%  "
            f"test {100 * result.dense['test_accuracy']:5.2f}%" + ("  (reused)" if result.dense["reused"] else "")
        )

    progress(f"lineage {cfg.name}: {total} rounds, stages in {cfg.store_uri() if use_store else 'memory'}")
    result = lineage.run(on_round, on_dense)
    if track and cfg.tracking.enabled:
        from lth_search.tracking.runs import log_lineage

        log_lineage(cfg, lineage, result, progress=progress)
    return result


def run_search(cfg: ExperimentConfig, address: str | None = None, progress: Progress = print) -> Any:
    """Run a search on a local Ray (address None) or a Ray cluster; returns its summary."""
    from lth_search.search.driver import run_search as _run

    return _run(cfg, address=address, progress=progress)


def resume_search(name: str, output_dir: str = "./lth_runs", address: str | None = None, progress: Progress = print) -> Any:
    """Continue an interrupted search by name (Tuner.restore + the persisted Optuna study)."""
    from lth_search.search.driver import resume_search as _resume

    return _resume(name, output_dir=output_dir, address=address, progress=progress)


def sync_search(name: str, output_dir: str = "./lth_runs", tracking_uri: str | None = None, progress: Progress = print) -> Any:
    """Log to MLflow what the store holds for a search and MLflow lacks."""
    from lth_search.tracking.runs import sync_search as _sync

    return _sync(name, output_dir=output_dir, tracking_uri=tracking_uri, progress=progress)


def best_ticket(experiment: str | None = None, search_run_id: str | None = None, max_accuracy_drop: float | None = None,
                min_sparsity: float | None = None, tracking_uri: str | None = None) -> Any:
    """The best ticket of a search, from MLflow alone: see `lth_search.tracking.tickets.best_ticket`."""
    from lth_search.tracking.tickets import best_ticket as _best

    return _best(experiment, search_run_id, max_accuracy_drop, min_sparsity, tracking_uri)


def list_tickets(experiment: str | None = None, tracking_uri: str | None = None,
                 search_run_id: str | None = None) -> list[dict[str, Any]]:
    """Every ticket (trial-round) of a search, from MLflow alone."""
    from lth_search.tracking.tickets import list_tickets as _list

    return _list(experiment, tracking_uri, search_run_id)


__all__ = ["load_config", "run_lineage", "run_search", "resume_search", "sync_search", "run_lineage_command",
           "best_ticket", "list_tickets"]
