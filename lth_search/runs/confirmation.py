"""Confirmation on fresh seeds: which recipes to re-run, which one wins, and the gain it brings.

A search picks its best recipe on one seed, and one seed of IMP is a lottery. So after
the search, two panels of fresh seeds, neither used by the search:

1. selection: the search's top recipes and the default recipe are re-run on the
   selection seeds and scored by geometric-mean compression 1/(1 - sparsity) (a ratio
   scale: 80 % -> 90 % is the same step as 90 % -> 95 %). All run on the same seeds, so
   the comparison is paired. The best searched recipe replaces the default only when the
   evidence says so: its paired ratio to the default is at least `search.confirm_margin`
   and the one-sided lower bound of that ratio at `search.confirm_confidence` is above 1.
2. reporting: the chosen recipe and the default are re-run on the reporting seeds, which
   took no part in any choice, and the gain printed to the user is their paired ratio
   there, with a 95 % interval (t on per-seed log ratios). The best of several
   challengers on the seeds that chose it is a maximum, biased upward; this is not.

When the default is kept, there is nothing to report: the gain is 1.00x by construction,
and the console says the search found nothing better than the config's own recipe. Pure: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.engine.lineage.metric import metric_named
from lth_search.runs.record import MatchingRecord, TrialRecord

SELECTION_SEED_BASE = 1_100_000
REPORT_SEED_BASE = 1_200_000
SEEDS_PER_SEARCH = 100
"""Panels of a search with seed s: selection seeds 1_100_000 + 100 s + i, reporting seeds
1_200_000 + 100 s + i. Each search seed gets its own panels (a fixed panel shared by every
search becomes a development set once people look at it), far from seeds users type."""


def _panel(cfg: ExperimentConfig, base: int, count: int) -> list[int]:
    own = set(range(cfg.seed, cfg.seed + cfg.prune.dense_replicates))  # the search's seed and its replicates
    seeds = [s for s in range(base + SEEDS_PER_SEARCH * cfg.seed, base + SEEDS_PER_SEARCH * (cfg.seed + 1))
             if s not in own]
    return seeds[:count]


def confirm_seeds(cfg: ExperimentConfig) -> list[int]:
    """The selection seeds: where the top recipes and the default are compared (never the search's own)."""
    return _panel(cfg, SELECTION_SEED_BASE, cfg.search.confirm_seeds)


def report_seeds(cfg: ExperimentConfig) -> list[int]:
    """The reporting seeds: where the chosen recipe's gain over the default is measured; they
    take part in no choice of the search."""
    return _panel(cfg, REPORT_SEED_BASE, cfg.search.report_seeds if cfg.search.confirm_seeds else 0)


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
        key=lambda r: (r.matching.sparsity, _rank_value(r.matching)),
        reverse=True,
    )
    chosen = [dict(default)]
    for record in ranked:
        if len(chosen) > top_k:
            break
        if not any(_same(record.choices, c) for c in chosen):
            chosen.append(dict(record.choices))
    return chosen


def certain_candidates(ended: list[TrialRecord], running: int, default: dict[str, Any], top_k: int
                       ) -> list[dict[str, Any]]:
    """The candidates that `candidates` will return whatever the `running` lineages still do:
    the default and the best `top_k - running` distinct recipes of the `ended` records.

    A running lineage ends with one recipe at one place in the ranking (a new recipe, or a
    better score for one already ranked), so it pushes every recipe below that place down by
    one at most; a recipe ranked within `top_k - running` now stays within `top_k`. The
    selection panel starts these runs in the search's tail (search/panel_workers.py). Ties are
    broken by trial id, as in the records `candidates` is given (`TrialRecord.load_all`)."""
    return candidates(sorted(ended, key=lambda r: r.trial_id), default, max(top_k - running, 0))


def _rank_value(matching: MatchingRecord) -> float:
    """The val value of the search's metric at the score, larger is better (runs/best.py `rank_value`)."""
    value = matching.val_accuracy if matching.val_metric is None else matching.val_metric
    return value if metric_named(matching.metric).higher_is_better else -value


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


@dataclass(frozen=True)
class PairedRatio:
    """Recipe a over recipe b on the seeds both finished: geometric-mean compression ratio and
    an interval from the t distribution of the per-seed log ratios."""

    gain: float
    low: float
    high: float
    wins: int
    seeds: int
    confidence: float
    two_sided: bool

    @classmethod
    def of(cls, a: RecipeScore, b: RecipeScore, confidence: float, two_sided: bool = True) -> "PairedRatio":
        from scipy.stats import t

        paired = {seed: ca for seed, ca in zip(a.seeds, a.compressions)}
        logs = [math.log(paired[seed] / cb) for seed, cb in zip(b.seeds, b.compressions) if seed in paired]
        n = len(logs)
        if n == 0:
            return cls(1.0, 0.0, math.inf, 0, 0, confidence, two_sided)
        mean = sum(logs) / n
        if n == 1:
            return cls(math.exp(mean), 0.0, math.inf, int(logs[0] > 0), 1, confidence, two_sided)
        sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
        quantile = t.ppf(1 - (1 - confidence) / (2 if two_sided else 1), n - 1) * sd / math.sqrt(n)
        high = math.exp(mean + quantile) if two_sided else math.inf
        return cls(math.exp(mean), math.exp(mean - quantile), high, sum(x > 0 for x in logs), n, confidence, two_sided)

    def to_json(self) -> dict[str, Any]:
        return {"gain": self.gain, "low": self.low, "high": None if math.isinf(self.high) else self.high,
                "wins": self.wins, "seeds": self.seeds, "confidence": self.confidence, "two_sided": self.two_sided}


REPORT_CONFIDENCE = 0.95
"""The reported gain's interval: two-sided 95 %."""


@dataclass
class Confirmation:
    """Selection scores (default first), the choice, and the out-of-sample report."""

    seeds: list[int]
    scores: list[RecipeScore]
    margin: float
    confidence: float = 0.8
    report_seeds: list[int] = field(default_factory=list)
    report: list[RecipeScore] = field(default_factory=list)
    """[default, chosen] on the reporting seeds (empty when the default is kept or not yet run)."""

    @property
    def default(self) -> RecipeScore:
        return next(s for s in self.scores if s.is_default)

    @property
    def best_challenger(self) -> RecipeScore | None:
        challengers = [s for s in self.scores if not s.is_default and s.seeds]
        return max(challengers, key=lambda s: (s.compression, -s.mean_test_drop)) if challengers else None

    @property
    def selection(self) -> PairedRatio | None:
        """The best challenger over the default on the selection seeds (one-sided bound)."""
        best = self.best_challenger
        return None if best is None else PairedRatio.of(best, self.default, self.confidence, two_sided=False)

    @property
    def chosen(self) -> RecipeScore:
        """The best searched recipe if the selection evidence says it beats the default, else the default."""
        ratio = self.selection
        if ratio is not None and ratio.gain >= self.margin and ratio.low > 1.0:
            return self.best_challenger  # type: ignore[return-value]
        return self.default

    @property
    def reported(self) -> PairedRatio | None:
        """The chosen recipe over the default on the reporting seeds (None: default kept, or no report)."""
        if len(self.report) != 2 or not self.report[0].seeds:
            return None
        default, chosen = self.report
        return PairedRatio.of(chosen, default, REPORT_CONFIDENCE)

    @property
    def gain(self) -> float:
        """The gain printed to the user: out of sample (1.0 when the default is kept)."""
        reported = self.reported
        return reported.gain if reported is not None else 1.0

    def to_json(self) -> dict[str, Any]:
        reported, selection = self.reported, self.selection
        return {
            "seeds": self.seeds, "margin": self.margin, "confidence": self.confidence,
            "chosen": self.chosen.to_json(), "default": self.default.to_json(),
            "scores": [s.to_json() for s in self.scores],
            "selection": selection.to_json() if selection is not None else None,
            "report_seeds": self.report_seeds, "report": [s.to_json() for s in self.report],
            "gain": self.gain, "gain_ci": [reported.low, reported.high] if reported is not None else [1.0, 1.0],
            "reported": reported.to_json() if reported is not None else None,
        }


def confirmation_of(
    cfg: ExperimentConfig, recipes: list[dict[str, Any]], runs: list[tuple[int, int, TrialRecord]]
) -> Confirmation:
    """Score `recipes` (the default first) from selection runs (recipe index, seed, record)."""
    scores = [RecipeScore(recipe, is_default=(i == 0)) for i, recipe in enumerate(recipes)]
    for index, seed, record in sorted(runs, key=lambda run: (run[0], run[1])):
        scores[index].add(seed, record)
    return Confirmation(confirm_seeds(cfg), scores, cfg.search.confirm_margin, cfg.search.confirm_confidence,
                        report_seeds(cfg))


def add_report(confirmation: Confirmation, runs: list[tuple[int, int, TrialRecord]]) -> None:
    """Fill the report from reporting runs (0 = the default, 1 = the chosen recipe; seed; record)."""
    chosen = confirmation.chosen
    report = [RecipeScore(confirmation.default.recipe, True), RecipeScore(chosen.recipe, False)]
    for index, seed, record in sorted(runs, key=lambda run: (run[0], run[1])):
        report[index].add(seed, record)
    confirmation.report = report


def confirmation_lines(confirmation: dict[str, Any]) -> list[str]:
    """Human lines from `Confirmation.to_json()`: the choice on the selection seeds, then the gain
    measured on the reporting seeds."""

    def score(s: dict[str, Any]) -> str:
        per_seed = ", ".join(f"{100 * x:.1f}%" for x in s["sparsities"])
        return (f"{s['compression']:.2f}x compression ({per_seed} sparse), "
                f"test drop {100 * s['mean_test_drop']:+.2f} pp")

    chosen, default, selection = confirmation["chosen"], confirmation["default"], confirmation.get("selection")
    lines = [f"selection on {len(confirmation['seeds'])} fresh seeds {confirmation['seeds']}:",
             f"  default recipe ({recipe_text(default['recipe'])}): {score(default)}"]
    best = max((s for s in confirmation["scores"] if not s["is_default"] and s["seeds"]),
               key=lambda s: s["compression"], default=None)
    if best is not None and selection is not None:
        verdict = ("chosen" if not chosen["is_default"] else
                   f"not enough evidence (needs >= {confirmation['margin']:g}x and a lower bound above 1): the default stays")
        lines.append(f"  best searched recipe ({recipe_text(best['recipe'])}): {score(best)}")
        lines.append(f"  paired ratio {selection['gain']:.2f}x, {100 * selection['confidence']:.0f}% lower bound "
                     f"{selection['low']:.2f}, better on {selection['wins']} of {selection['seeds']} seeds: {verdict}")
    reported = confirmation.get("reported")
    if chosen["is_default"]:
        lines.append("the search found nothing better than the config's own recipe (on the quickstart, plain IMP): gain 1.00x")
    elif reported is not None:
        default_r, chosen_r = confirmation["report"]
        high = "inf" if reported["high"] is None else f"{reported['high']:.2f}"
        lines.append(f"reported on {reported['seeds']} more fresh seeds {confirmation['report_seeds']}, which took no "
                     f"part in any choice:")
        lines.append(f"  chosen {recipe_text(chosen['recipe'])}: {score(chosen_r)}")
        lines.append(f"  default: {score(default_r)}")
        lines.append(f"  gain of the search over the config's own recipe: {reported['gain']:.2f}x compression "
                     f"(95% CI {reported['low']:.2f}-{high}), better on {reported['wins']} of {reported['seeds']} seeds")
    else:
        lines.append("  (no reporting seeds: search.report_seeds is 0, so no out-of-sample gain is claimed)")
    return lines
