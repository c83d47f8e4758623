"""Confirmation on fresh seeds: which recipes to re-run, how to score them, which one wins.

A search picks its best recipe on one seed, and one seed of IMP is a lottery (the same
recipe's matching sparsity moved 49-89 % across three seeds on the quickstart). So
after the search, its top recipes and the default recipe are re-run on seeds the search
never used, and scored by their geometric-mean compression 1/(1 - sparsity) over those
seeds (a ratio scale: 80 % -> 90 % sparsity is the same step as 90 % -> 95 %). All
recipes run on the same seeds, so the comparison is paired. A searched recipe replaces
the default only when it beats it by `search.confirm_margin`: a small win on a few
seeds is selection noise, and noise must not choose a recipe. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.runs.record import TrialRecord

CONFIRM_SEED_BASE = 1_000_003
"""Confirmation seeds: a fixed panel far from any seed a user types (search seeds stay below it)."""


def confirm_seeds(cfg: ExperimentConfig) -> list[int]:
    """The fresh seeds of a search's confirmation (never the search's own seed).

    The same panel for every search: confirmed scores of two searches (other seeds,
    other spaces) are then measured on the same lineages' seeds, a paired comparison,
    like a fixed test set; a search seed inside the panel is skipped.
    """
    seeds = [s for s in range(CONFIRM_SEED_BASE, CONFIRM_SEED_BASE + cfg.search.confirm_seeds + 1) if s != cfg.seed]
    return seeds[: cfg.search.confirm_seeds]


def pack_runs(runs: list[tuple[int, int]], slots: int, size: int) -> list[list[tuple[int, int]]]:
    """The confirmation runs (recipe index, seed) dealt into packs of at most `size`.

    At least `slots` packs (the concurrent workers), so no worker idles while another
    trains a big pack; the runs are dealt round-robin, so every pack mixes recipes and
    seeds and the packs shrink alike as lineages stop. `size` 1: one run per pack.
    """
    if not runs:
        return []
    count = max(min(slots, len(runs)), math.ceil(len(runs) / size))
    return [runs[j::count] for j in range(count)]


def recipe_text(recipe: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(recipe.items())) or "(the config's prune values)"


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: a[k] for k in sorted(a)} == {k: b[k] for k in sorted(b)}


def candidates(records: list[TrialRecord], default: dict[str, Any], top_k: int) -> list[dict[str, Any]]:
    """The default recipe, then the search's `top_k` best distinct recipes (by score, then val)."""
    ranked = sorted(
        (r for r in records if r.matching is not None),
        key=lambda r: (r.matching.sparsity, r.matching.val_accuracy),
        reverse=True,
    )
    chosen = [dict(default)]
    for record in ranked:
        if len(chosen) > top_k:
            break
        if not any(_same(record.choices, c) for c in chosen):
            chosen.append(dict(record.choices))
    return chosen


@dataclass
class RecipeScore:
    """One recipe's results on the confirmation seeds."""

    recipe: dict[str, Any]
    is_default: bool
    seeds: list[int] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)
    test_drops: list[float] = field(default_factory=list)
    """Dense test accuracy minus test accuracy at the matching round, per seed (reported, not selected on)."""

    @property
    def compressions(self) -> list[float]:
        return [1.0 / max(1e-12, 1.0 - s) for s in self.sparsities]

    @property
    def compression(self) -> float:
        """Geometric-mean compression over the seeds (0 before any seed finished)."""
        values = self.compressions
        return math.exp(sum(math.log(c) for c in values) / len(values)) if values else 0.0

    @property
    def mean_test_drop(self) -> float:
        return sum(self.test_drops) / len(self.test_drops) if self.test_drops else 0.0

    def add(self, seed: int, record: TrialRecord) -> None:
        if record.matching is None or record.dense is None:
            return
        self.seeds.append(seed)
        self.sparsities.append(record.matching.sparsity)
        self.test_drops.append(record.dense.test_accuracy - record.matching.test_accuracy)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "is_default": self.is_default, "seeds": self.seeds,
            "sparsities": self.sparsities, "compression": self.compression,
            "compression_range": [min(self.compressions, default=0.0), max(self.compressions, default=0.0)],
            "mean_test_drop": self.mean_test_drop, "test_drops": self.test_drops,
        }


@dataclass
class Confirmation:
    """The confirmed scores of the candidates and the verdict."""

    seeds: list[int]
    scores: list[RecipeScore]
    margin: float

    @property
    def default(self) -> RecipeScore:
        return next(s for s in self.scores if s.is_default)

    @property
    def chosen(self) -> RecipeScore:
        """The best searched recipe if it beats the default by the margin, else the default."""
        default = self.default
        challengers = [s for s in self.scores if not s.is_default and s.seeds]
        if not challengers:
            return default
        best = max(challengers, key=lambda s: (s.compression, -s.mean_test_drop))
        return best if best.compression >= self.margin * default.compression else default

    @property
    def gain(self) -> float:
        """Chosen over default confirmed compression (1.0 when the default is chosen)."""
        default = self.default.compression
        return self.chosen.compression / default if default else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds, "margin": self.margin, "chosen": self.chosen.to_json(),
            "default": self.default.to_json(), "gain": self.gain, "scores": [s.to_json() for s in self.scores],
        }


def confirmation_of(
    cfg: ExperimentConfig, recipes: list[dict[str, Any]], runs: list[tuple[int, int, TrialRecord]]
) -> Confirmation:
    """Score `recipes` (the default first) from confirmation runs (recipe index, seed, record)."""
    scores = [RecipeScore(recipe, is_default=(i == 0)) for i, recipe in enumerate(recipes)]
    for index, seed, record in sorted(runs, key=lambda run: (run[0], run[1])):
        scores[index].add(seed, record)
    return Confirmation(confirm_seeds(cfg), scores, cfg.search.confirm_margin)


def confirmation_lines(confirmation: dict[str, Any]) -> list[str]:
    """Human lines from `Confirmation.to_json()`: the chosen recipe beside the default, both
    with confirmed scores."""

    def score(s: dict[str, Any]) -> str:
        per_seed = ", ".join(f"{100 * x:.1f}%" for x in s["sparsities"])
        return (f"{s['compression']:.2f}x compression ({per_seed} sparse), "
                f"test drop {100 * s['mean_test_drop']:+.2f} pp")

    chosen, default = confirmation["chosen"], confirmation["default"]
    lines = [f"confirmed on {len(confirmation['seeds'])} fresh seeds {confirmation['seeds']}:"]
    if chosen["is_default"]:
        lines.append(f"  chosen recipe: the default ({recipe_text(default['recipe'])}): {score(default)}")
        others = [s for s in confirmation["scores"] if not s["is_default"] and s["seeds"]]
        if others:
            best = max(others, key=lambda s: s["compression"])
            lines.append(f"  best searched recipe ({recipe_text(best['recipe'])}): {score(best)}; "
                         f"not {confirmation['margin']:g}x the default's, so the default stays")
    else:
        lines.append(f"  chosen recipe: {recipe_text(chosen['recipe'])}: {score(chosen)}")
        lines.append(f"  default recipe: {recipe_text(default['recipe'])}: {score(default)}")
    lines.append(f"  gain of the search over the default recipe: {confirmation['gain']:.2f}x compression")
    return lines
