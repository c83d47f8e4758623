"""The `prune` section: the lineage kind, what each round removes, where the survivors rewind to.

`choices()` is what enters a round's stage key, and the fields a search may vary
(search.space) are these same fields: a searched recipe is this section with some
values replaced (ExperimentConfig.with_choices), so a default recipe and a searched
one that agree share their stages.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from lth_search.config.names import check_name, quote
from lth_search.config.section import MAX_LIST, MAX_STEPS, Section

KINDS = ("imp", "lr_rewind", "finetune", "oneshot", "random_prune", "random_reinit", "snip", "grasp", "synflow")
"""Lineage kinds (engine/lineage/kinds.py): IMP with weight rewinding and the baselines it is compared with."""
RESCALE_MODES = ("measured", "calibrated")
InitScale = Union[float, Literal[RESCALE_MODES]]


STRUCTURE_RE = re.compile(r"^(unstructured|channel|block:([1-9][0-9]{0,2})|([1-9][0-9]?):([1-9][0-9]?))$")


def check_structure(value: Any) -> str:
    """The one rule for `prune.structure`: unstructured, channel, block:N (N in 1..999) or n:m (n < m <= 99)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        value = f"{value // 60}:{value % 60}"  # YAML 1.1 (PyYAML) reads an unquoted 2:4 as sexagesimal 124
    match = STRUCTURE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or (match.group(3) and int(match.group(3)) >= int(match.group(4))):
        raise ValueError(f"must be unstructured, channel, block:N (a square block side, e.g. block:4) or n:m "
                         f"(n of every m consecutive weights kept, n < m, e.g. 2:4), got {quote(value)}")
    return value


def check_init_scale(value: Any) -> InitScale:
    """The one rule for a rescale mode: an exponent alpha in [0, 2], 'measured' or 'calibrated'."""
    if value in RESCALE_MODES:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a number (the rescale exponent alpha), 'measured' or 'calibrated', got {quote(value)}")
    if not 0 <= value <= 2:
        raise ValueError(f"must lie in [0, 2] (0 plain rewind, 1 full 1/sqrt(density)), got {value}")
    return float(value)


class PruneConfig(Section):
    """Iterative magnitude pruning: what each round removes and where survivors rewind to."""

    kind: Literal[KINDS] = Field(
        "imp",
        description="lineage kind: imp (weight rewinding), lr_rewind (retrain the end weights with the schedule "
        "rewound to rewind_step), finetune (retrain the end weights at the final learning rate), oneshot "
        "(magnitude-prune the dense end weights once per sparsity, rewind), random_prune / random_reinit (the "
        "controls of each IMP round), snip / grasp / synflow (prune at theta_k, train); every kind other than "
        "imp and the iterative lr_rewind / finetune is trained at the IMP lineage's sparsities",
    )
    rounds: int = Field(
        20, ge=0, le=200, description="the most pruning rounds after the dense stage (a cap: a lineage stops earlier "
        "when its matching run ends, see patience, or when it reaches target_sparsity)"
    )
    patience: int = Field(
        2, ge=1, le=200, description="consecutive rounds a lineage may fail to match dense before it stops: a pass "
        "after fewer misses continues its unbroken matching run, after this many it does not count. 1 = stop at the "
        "first miss"
    )
    target_sparsity: float | None = Field(
        None, gt=0, lt=1, description="stop once a round reaches this sparsity (null: prune until the run ends or the cap)"
    )
    dense_replicates: int = Field(
        3, ge=1, le=64, description="dense networks (the lineage's own seed, then seed+1, ...) trained on the same "
        "split; a round matches when its val accuracy, example by example, is within search.tolerance of their mean. "
        "Each is a normal dense stage, stored and shared through the store"
    )
    rate: float = Field(0.2, gt=0, lt=1, description="fraction of the remaining weights pruned per round")
    scope: Literal["global", "layerwise"] = "global"
    structure: str = Field(
        "unstructured", description="what a round removes: unstructured (single weights), channel (whole neurons or "
        "conv filters by the magnitude of their weights, with the weights that read them: a ticket that exports as a "
        "smaller dense network; chain models mlp, lenet_300_100, conv2/4/6), block:N (N x N blocks of the weight "
        "matrix by their mean magnitude), n:m (unstructured, then at most n of every m consecutive weights kept, "
        "e.g. 2:4 for GPUs' semi-structured sparsity)",
    )
    layer_ratios: dict[str, float] = Field(
        {}, max_length=MAX_LIST, description="rate multiplier per layer group (conv, fc, output, shortcut, ...)"
    )
    output_ratio: float = Field(
        1.0, gt=0, le=100, description="rate multiplier of the output layer (0.5 in Frankle & Carbin)"
    )
    rewind_step: int = Field(0, ge=0, le=MAX_STEPS, description="iteration k the survivors rewind to")
    rewind_steps: list[int] = Field(
        [0], max_length=MAX_LIST,
        description="rewind steps the dense stage keeps (theta_k for each); the search picks among them",
    )
    init_scale: InitScale = Field(
        0.0,
        description="rescale at rewind: a number alpha gives w *= density^(-alpha/2) (0 plain rewind, 1 "
        "variance correction for random masks); 'measured' restores each layer's sum of squares; 'calibrated' "
        "restores each layer's pre-activation variance on a batch of training inputs, layer by layer",
    )

    @field_validator("init_scale", mode="before")
    @classmethod
    def _init_scale(cls, value: Any) -> InitScale:
        return check_init_scale(value)

    @field_validator("structure", mode="before")
    @classmethod
    def _structure(cls, value: Any) -> str:
        return check_structure(value)

    @field_validator("layer_ratios")
    @classmethod
    def _ratios(cls, ratios: dict[str, float]) -> dict[str, float]:
        for group, ratio in ratios.items():
            check_name(group, "layer group", ValueError, max_len=32)
            if not 0 < ratio <= 100:
                raise ValueError(f"ratio of group {group!r} must be in (0, 100], got {ratio}")
        return ratios

    @field_validator("rewind_steps")
    @classmethod
    def _rewind_steps(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 <= s <= MAX_STEPS for s in steps):
            raise ValueError(f"must be a non-empty list of iterations in [0, {MAX_STEPS}]")
        return sorted(set(steps))

    @model_validator(mode="after")
    def _rewind_kept(self) -> "PruneConfig":
        if self.rewind_step not in self.rewind_steps:
            raise ValueError(
                f"prune.rewind_step: {self.rewind_step} is not a kept rewind step "
                f"(prune.rewind_steps = {self.rewind_steps}); add it to prune.rewind_steps"
            )
        return self

    def choices(self) -> dict[str, Any]:
        """The per-round pruning choices that enter a round's stage key."""
        fields = {"rate", "scope", "layer_ratios", "output_ratio", "rewind_step", "init_scale"}
        if self.structure != "unstructured":  # absent by default: unstructured choices keep their keys' shape
            fields.add("structure")
        return self.model_dump(include=fields)
