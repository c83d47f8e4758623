"""Readers for what a finished search left on disk: Ray results, stage manifests, the study.

The search tests judge a search by its files (Ray's per-trial result.json, the store's
manifests and trial records, the Optuna journal), not by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from conftest import tiny_overrides

from lth_search.config import ExperimentConfig, load_config


def search_config(data_root: Path, output_dir: Path, settings: dict[str, Any]) -> ExperimentConfig:
    """A tiny search (see conftest.tiny_overrides) with `settings` as extra dotted overrides."""
    return load_config(None, search_overrides(data_root, output_dir, settings)).absolute()


def search_overrides(data_root: Path, output_dir: Path, settings: dict[str, Any]) -> list[str]:
    """`--set` overrides of a tiny search: 4 lineages of 3 rounds, 2 at a time, rewind 0 or 20 and
    rate 0.2 or 0.5 (4 recipes: the exhaustive sampler tries each once), no confirmation."""
    base = {"search.max_concurrent": 2, "search.num_trials": 4, "search.space.rewind_step": "[0, 20]",
            "search.space.rate": "[0.2, 0.5]", "search.confirm_seeds": 0}
    base.update(settings)
    return tiny_overrides(data_root, output_dir) + [f"{k}={v}" for k, v in base.items()]


def trial_results(results_path: str) -> dict[str, list[dict[str, Any]]]:
    """trial id -> every result Ray recorded for it, in order (from each trial's result.json).

    `results_path` is a local path or a `local://` URI (fsspec's local filesystem).
    """
    histories: dict[str, list[dict[str, Any]]] = {}
    for path in Path(results_path.removeprefix("local://")).glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            histories[rows[0]["trial_id"]] = rows
    return histories


def manifests(store_root: Path) -> list[dict[str, Any]]:
    """Every published stage manifest in a local store."""
    return [json.loads(p.read_text()) for p in (store_root / "stages").glob("*/*/manifest.json")]


def trial_records(store_root: Path, search_name: str) -> dict[str, dict[str, Any]]:
    from lth_search.store.stage_store import StageStore

    return StageStore(str(store_root)).records(f"search-{search_name}")


def load_study(output_dir: Path, search_name: str, search_id: str) -> optuna.Study:
    journal = output_dir / "searches" / search_name / "optuna.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=search_id, storage=storage)


def expected_matching(dense_val: float, rounds: list[tuple[float, float]], tolerance: float) -> float:
    """Matching sparsity written out independently: the sparsest round within tolerance of dense."""
    best = 0.0
    for sparsity, val in rounds:
        if val >= dense_val - tolerance - 1e-12:
            best = max(best, sparsity)
    return best
