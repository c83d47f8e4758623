"""The `search` section: how many recipes are tried, how they are sampled, stopped and confirmed.

The space (`search.space`) lists values of `prune` fields; a key left null stays at its
`prune` value. Early stopping (`search.asha`) compares lineages at equal sparsity, and
confirmation re-runs the best recipes on fresh seeds, so that neither the pruning rate
nor selection noise decides which recipe wins.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lth_search.config.names import check_name
from lth_search.config.prune import KINDS, InitScale, check_init_scale, check_structure
from lth_search.config.section import MAX_LIST, Section


class AshaConfig(Section):
    """Early stopping that is fair across pruning rates.

    ASHA compares lineages at equal *sparsity*, not at equal round: its clock is the
    sparsity level (how many 20 % prunes the remaining weights amount to, so 48.8 % is
    level 3 whatever the rate), and its yardstick is the val accuracy margin over dense
    there. A slow pruner is never cut for being slow, only for being worse at the
    sparsity both reached. A stopped lineage is told to Optuna as pruned.
    """

    enabled: bool = True
    grace_period: int = Field(
        3, ge=1, le=200,
        description="sparsity level (20 %-prunes: 3 = 48.8 %) every lineage reaches before it can be stopped",
    )
    reduction_factor: float = Field(2.0, gt=1, le=100)


class SearchSpace(Section):
    """Values the search may pick; a key left out (null) is fixed at its `prune` value."""

    kind: list[Literal[KINDS]] | None = Field(
        None, max_length=MAX_LIST, description="lineage kinds to choose among (prune.kind), e.g. [imp, lr_rewind]"
    )
    rewind_step: list[int] | None = Field(None, max_length=MAX_LIST)
    rate: list[float] | None = Field(None, max_length=MAX_LIST)
    scope: list[Literal["global", "layerwise"]] | None = None
    layer_ratios: dict[str, list[float]] | None = Field(None, max_length=MAX_LIST)
    init_scale: list[InitScale] | None = None
    structure: list[Any] | None = Field(None, max_length=MAX_LIST, description="prune.structure values to choose "
                                        "among, e.g. [unstructured, channel]")

    @field_validator("structure", mode="before")
    @classmethod
    def _structures(cls, values: list[str] | None) -> list[str] | None:
        if values is not None and not values:
            raise ValueError("must be a non-empty list (or null to keep it fixed)")
        return None if values is None else [check_structure(v) for v in values]

    @field_validator("init_scale", mode="before")
    @classmethod
    def _scales(cls, values: Any) -> Any:
        if values is None:
            return None
        if not isinstance(values, list) or not 0 < len(values) <= MAX_LIST:
            raise ValueError(f"must be a non-empty list (at most {MAX_LIST}) of exponents, 'measured' or 'calibrated'")
        return [check_init_scale(v) for v in values]

    @field_validator("rate")
    @classmethod
    def _rates(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and (not values or any(not 0 < v < 1 for v in values)):
            raise ValueError("must be a non-empty list of rates in (0, 1)")
        return values

    @field_validator("kind", "rewind_step", "scope")
    @classmethod
    def _non_empty(cls, values: list | None) -> list | None:
        if values is not None and not values:
            raise ValueError("must be a non-empty list (or null to keep it fixed)")
        return values

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios(cls, ratios: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for group, values in (ratios or {}).items():
            check_name(group, "layer group", ValueError, max_len=32)
            if not 0 < len(values) <= MAX_LIST or any(not 0 < v <= 100 for v in values):
                raise ValueError(f"group {group!r} needs a non-empty list of multipliers in (0, 100]")
        return ratios


class SearchConfig(Section):
    num_trials: int = Field(12, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=10_000)
    sampler: Literal["auto", "exhaustive", "tpe", "nsga2", "random"] = Field(
        "auto",
        description="auto: exhaustive (every recipe once) when num_trials covers the space, else TPE with its "
        "random start-up sized to the budget; nsga2 for two objectives; all seeded",
    )
    objectives: int = Field(1, ge=1, le=2, description="1: matching sparsity; 2: plus val accuracy at it")
    metric: Literal["auto", "accuracy", "loss", "perplexity"] = Field(
        "auto",
        description="what the verdict judges: accuracy (higher is better; per-example correctness), loss or "
        "perplexity (lower is better; per-example mean token cross-entropy, perplexity = exp of the mean loss, "
        "judged on the loss); auto: accuracy for classification data, perplexity for causal-LM data (text_lm)",
    )
    tolerance: float = Field(
        0.01, ge=0, lt=1, description="a round matches when the lower confidence bound of its margin (its val metric "
        "minus the dense replicates' mean on the same examples, signed so that positive is better) is >= -tolerance, "
        "in the metric's units: accuracy a fraction (0.01 = 1 pp); loss and perplexity nats of mean token loss "
        "(0.01: ~1 % higher perplexity; below 1, since 1 nat is e times the perplexity); see confidence"
    )
    confidence: float = Field(
        0.9, ge=0.5, lt=1, description="confidence of the verdict's one-sided lower bound: a round truly worse than "
        "dense by more than the tolerance is called matching with probability at most 1 - confidence "
        "(0.5: the point estimate alone, no allowance for noise); bench/verdict_calibration.py measures it"
    )
    max_failures: int = Field(2, ge=0, le=100, description="Ray retries of a failed trial")
    confirm_seeds: int = Field(
        3, ge=0, le=20,
        description="after the search, the top recipes and the default recipe are re-run on this many seeds the "
        "search never used (the selection seeds), and the best replaces the default only when the evidence says so "
        "(confirm_margin, confirm_confidence); 0: no confirmation",
    )
    report_seeds: int = Field(
        3, ge=0, le=20,
        description="when a searched recipe replaces the default, it and the default are re-run on this many more "
        "fresh seeds, which took no part in any choice: the gain printed is measured there, with a 95 % interval "
        "(0: no out-of-sample gain is claimed)",
    )
    confirm_confidence: float = Field(
        0.8, ge=0.5, lt=1,
        description="a searched recipe replaces the default only when the one-sided lower bound of its paired "
        "compression ratio on the selection seeds, at this confidence, is above 1",
    )
    confirm_top_k: int = Field(3, ge=1, le=20, description="how many of the search's best recipes are confirmed")
    confirm_margin: float = Field(
        1.1, ge=1.0, le=10.0,
        description="a searched recipe replaces the default only when its confirmed geometric-mean compression "
        "is at least this many times the default's (selection noise must not pick a recipe)",
    )
    asha: AshaConfig = AshaConfig()
    space: SearchSpace = SearchSpace()
