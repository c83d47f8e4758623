"""Confirmation on Ray: the candidates x fresh seeds, on warm workers after the search.

The runs (panel_runs.py: each a whole lineage of a candidate recipe on a fresh seed) are
dealt into packs (runs/confirmation.py `pack_runs`: at least one per concurrent worker, at
most `resources.pack` lineages each); a worker (panel_workers.py: one Ray actor per slot,
kept for both panels) walks one pack as one batched network per step. A run's record goes
to the search's `confirm-<name>` records, not MLflow's child runs: the parent run shows the
confirmation table (runs/confirmation.py scores it). A driver killed during confirmation
reruns it on resume, and every stored stage is reused.
"""

from __future__ import annotations

from typing import Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.runs.confirmation import (
    Confirmation,
    add_report,
    candidates,
    certain_candidates,
    confirm_seeds,
    confirmation_of,
    recipe_text,
    report_seeds,
)
from lth_search.runs.record import TrialRecord
from lth_search.search.panel_runs import ROLE
from lth_search.search.panel_workers import Panel, PanelWorkers
from lth_search.store.stage_store import StageStore

CONFIRM, REPORT = "confirm", "report"
"""The two panels: selection on fresh seeds, then the chosen recipe's report on others."""


def run_confirmation(
    cfg: ExperimentConfig, search_id: str, records: list[TrialRecord], progress: Callable[[str], None],
    workers: PanelWorkers,
) -> Confirmation | None:
    """Select on fresh seeds (the default and the top recipes), then, when a searched recipe
    won, measure its gain on reporting seeds; None when confirmation is off."""
    seeds = confirm_seeds(cfg)
    if not seeds:
        return None
    recipes = candidates(records, cfg.default_recipe(), cfg.search.confirm_top_k)
    progress(f"confirming {len(recipes)} recipe(s) on {len(seeds)} fresh selection seeds {seeds}:")
    for index, recipe in enumerate(recipes):
        progress(f"  {'default' if index == 0 else f'top {index}'}: {recipe_text(recipe)}")
    selection = _panel(CONFIRM, recipes, seeds)
    confirmation = confirmation_of(cfg, recipes, run_panel(cfg, search_id, workers, selection, progress,
                                                         report_seeds(cfg)))
    chosen = confirmation.chosen
    if chosen.is_default or not confirmation.report_seeds:
        return confirmation
    pair = [confirmation.default.recipe, chosen.recipe]
    progress(f"measuring the chosen recipe against the default on {len(confirmation.report_seeds)} reporting seeds "
             f"{confirmation.report_seeds} (they take part in no choice)")
    report = _panel(REPORT, pair, confirmation.report_seeds)
    add_report(confirmation, run_panel(cfg, search_id, workers, report, progress))
    return confirmation


def run_panel(cfg: ExperimentConfig, search_id: str, workers: PanelWorkers, panel: Panel,
              progress: Callable[[str], None], next_seeds: list[int] | None = None,
              ) -> list[tuple[int, int, TrialRecord]]:
    """Every recipe on every seed, in packs on the warm workers; (recipe index, seed, final record)
    per run. A worker left idle trains ahead the dense stages of `next_seeds` (the next panel's)."""
    workers.run(panel, search_id, progress, next_seeds)
    recipes, seeds = panel.recipes, {seed for _, seed in panel.runs}
    store = StageStore.from_config(cfg)
    done = []
    for record in TrialRecord.load_all(store, cfg.name, search_id, role=ROLE):
        index = next((i for i, r in enumerate(recipes) if r == record.choices), None)
        seed = int(record.config["seed"])
        if index is not None and seed in seeds and record.status.final:
            done.append((index, seed, record))
    if len(done) < len(panel.runs):  # failed packs said so above; the verdict must not hide the seeds it lost
        progress(f"{panel.phase}: {len(panel.runs) - len(done)} of {len(panel.runs)} runs did not end; "
                 f"the verdict pairs only the seeds whose runs did")
    return done


def _panel(phase: str, recipes: list[dict[str, Any]], seeds: list[int]) -> Panel:
    return Panel(phase, recipes, [(index, seed) for index in range(len(recipes)) for seed in seeds])


class SelectionAhead:
    """The selection runs certain before the search has ended (warm_panels.py `WarmPanels`
    starts them in the search's tail): the default's and those of the recipes that stay among
    the candidates whatever the running lineages do.

    The ended trials' records are read once each (from the tail on, not per trial of the search),
    through one store opened at the first call (opening a store makes its folders and sweeps its
    staging area: not work for every round a running lineage reports in the tail)."""

    def __init__(self, cfg: ExperimentConfig, search_id: str) -> None:
        self.cfg = cfg
        self.search_id = search_id
        self._ended: dict[str, TrialRecord | None] = {}
        self._store: StageStore | None = None

    def __call__(self, ended: list[str], running: int) -> Panel | None:
        seeds = confirm_seeds(self.cfg)
        if not seeds:
            return None
        if self._store is None:
            self._store = StageStore.from_config(self.cfg)
        for trial_id in ended:
            if trial_id not in self._ended:
                self._ended[trial_id] = TrialRecord.load(self._store, self.cfg.name, trial_id)
        records = [r for r in self._ended.values() if r is not None and r.search_id == self.search_id]
        recipes = certain_candidates(records, running, self.cfg.default_recipe(), self.cfg.search.confirm_top_k)
        return _panel(CONFIRM, recipes, seeds)
