"""The `diagnostics` section: why a ticket wins, measured beside the accuracies.

The cheap diagnostics need no training and are on by default; the probes that train
(stability, perturbation) are stages of their own, off unless asked for, because each
costs about as much as the round it probes.
"""

from __future__ import annotations

from pydantic import Field

from lth_search.config.section import Section


class DiagnosticsConfig(Section):
    """Why a ticket wins (engine/diagnostics.py): computed per round, logged beside the accuracies."""

    enabled: bool = Field(
        True, description="sign preservation, trajectory alignment and layer health per round (cheap: no training)"
    )
    probe_size: int = Field(1024, ge=1, description="training examples of the fixed probe batch (gradient at theta_k)")
    stability: bool = Field(
        False, description="linear-mode-connectivity instability per round: trains a second copy from theta_k "
        "with another data order (doubles a round)",
    )
    stability_points: int = Field(5, ge=2, le=101, description="interpolation points on the line between the copies")
    stability_steps: list[int] = Field(
        [], description="rewind steps k (kept ones, prune.rewind_steps) for the dense instability probe of "
        "`lth-search compare`: two dense copies from theta_k with different data orders, their error barrier"
    )
    perturbation: float | None = Field(
        None, gt=0, description="retrain from theta_k plus Gaussian noise of this scale (relative to each layer's "
        "kept-weight std) on the kept weights; off when null",
    )
    collapse_ratio: float = Field(0.05, gt=0, lt=1, description="a layer keeping less than this share of the "
                                  "network's kept fraction is reported as collapsed")
    deviation_bound: float = Field(0.25, gt=0, le=1, description="warn when a layer's sparsity is further than this "
                                   "from the target")
