"""What one round logs as metrics: its results, what its sparsity buys at inference, and its
sparsity per layer group (tracking/layout.py names them).

Kept apart from the run (trial_run.py) because it is measurement, not logging: the inference
gains time the round's network (engine/sparsity_gains.py) and the group sparsity needs the
model's layer sizes. Both use one network per process (`network`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lth_search.config import ExperimentConfig
from lth_search.config.runtime import TrackingConfig
from lth_search.engine.data import data_signature
from lth_search.engine.lineage.metric import Metric
from lth_search.engine.lineage.results import RoundResult
from lth_search.engine.models import build_model, layer_sizes
from lth_search.engine.sparsity_gains import SparsityGains, measure_gains, stage_gains
from lth_search.errors import LthError
from lth_search.store.entry import StageEntry
from lth_search.tracking.layout import round_metrics, sparsity_series, sparsity_step

log = logging.getLogger(__name__)


def inference_budget(tracking: TrackingConfig, round_result: RoundResult) -> float:
    """Seconds the round's latency timing may take: `inference_share` of the round's training time,
    at most `inference_budget_s`. At 0.2 s a round, the timing was most of a tiny lineage's time
    (a 2-round MLP trial trains in ~0.15 s); a network that trains for seconds gets the full budget."""
    training_s = round_result.steps / round_result.train_steps_per_s if round_result.train_steps_per_s > 0 else 0.0
    return min(tracking.inference_budget_s, tracking.inference_share * training_s) or tracking.inference_budget_s


_NETWORK: dict[str, tuple[Any, tuple[int, ...]]] = {}
"""The last network `network` built and its input shape, by its model config and data signature."""


def network(cfg: ExperimentConfig) -> tuple[Any, tuple[int, ...]]:
    """A network of `cfg`'s model for its data, built once per process while the model stays the
    same (a trial actor walks lineage after lineage of one model): the rounds load their weights
    into it, the group sparsity reads its layers' sizes. Two builds a trial were ~1 % of a tiny
    lineage's fixed cost. Built-in and plug-in models only (a pretrained one is never built here)."""
    shape, classes = data_signature(cfg.data)
    key = json.dumps([cfg.model.model_dump(mode="json"), list(shape), classes], sort_keys=True)
    if key not in _NETWORK:
        _NETWORK.clear()
        _NETWORK[key] = build_model(cfg.model, shape, classes, cfg.seed), tuple(shape)
    return _NETWORK[key]


class RoundMetrics:
    """The metrics of a trial's rounds, one round at a time (`of`)."""

    def __init__(self, cfg: ExperimentConfig, metric: Metric, trial_id: str, gains_live: bool = True) -> None:
        self.cfg, self.metric, self.trial_id = cfg, metric, trial_id
        self.gains_live = gains_live
        """Whether `of` times the round's inference gains; else only the best trials of a large search
        have them, timed at its finish (trial_run.py `trials_detailed_live`)."""
        self._layer_groups: dict[str, tuple[str, int]] | None = None

    def of(self, round_result: RoundResult, entry: StageEntry | None) -> list[tuple[int, dict[str, float]]]:
        """The round's metrics at step = round, and its by-sparsity series at step = sparsity."""
        metrics = round_metrics(round_result, self.metric)
        if self.gains_live:
            metrics.update(self.inference_gains(round_result, entry))
        metrics.update({f"group_sparsity/{group}": value for group, value in self._group_sparsity(round_result).items()})
        return [(round_result.round, metrics), (sparsity_step(round_result.sparsity), sparsity_series(round_result))]

    def inference_gains(self, round_result: RoundResult, entry: StageEntry | None) -> dict[str, float]:
        """`inference/*` (engine/sparsity_gains.py) of the round's trained weights, when measured
        (tracking.measure_inference) and the stage is at hand; {} for a pretrained model or a failed round."""
        tracking = self.cfg.tracking
        if (not tracking.measure_inference or entry is None or "end" not in entry.weights
                or round_result.failed is not None or self.cfg.model.is_pretrained):
            return {}

        def measure() -> SparsityGains:
            model, shape = network(self.cfg)
            model.load_state_dict(entry.weights["end"])
            return measure_gains(model, shape, tracking.serve_batch,
                                 inference_budget(tracking, round_result), vocab_size=self.cfg.model.vocab_size)

        try:
            gains = stage_gains(entry.key, tracking.serve_batch, measure)
        except (LthError, RuntimeError, ValueError) as error:  # measuring never costs a lineage its metrics
            log.warning("trial %s round %d: inference gains not measured (%s)", self.trial_id,
                        round_result.round, error)
            return {}
        return {f"inference/{name}": value for name, value in gains.metrics().items()}

    def _group_sparsity(self, round_result: RoundResult) -> dict[str, float]:
        """Sparsity per layer group (attn, mlp, embed, output, ...), weighted by the layers' sizes.

        The groups and sizes come from the process's network (`network`); a pretrained hf: model
        is not loaded again for this: its per-layer sparsity is logged alone."""
        if self._layer_groups is None:
            try:
                self._layer_groups = {} if self.cfg.model.is_pretrained else layer_sizes(network(self.cfg)[0])
            except LthError:  # the lineage reports a model or data set it cannot build; logging goes on
                self._layer_groups = {}
        totals: dict[str, list[float]] = {}
        for layer, fraction in round_result.layer_sparsity.items():
            if layer in self._layer_groups:
                group, size = self._layer_groups[layer]
                pruned_and_size = totals.setdefault(group, [0.0, 0.0])
                pruned_and_size[0] += fraction * size
                pruned_and_size[1] += size
        return {group: pruned / size for group, (pruned, size) in sorted(totals.items()) if size}
