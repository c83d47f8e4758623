"""The metric a lineage is judged on: its name, its direction, and where its values come from.

The verdict (objective.py `paired_verdict`) compares a ticket with the dense replicates
example by example on the validation split. What an example contributes depends on the
metric (`search.metric`):

- `accuracy` (higher is better): 1 if the example is right, else 0 (a class; for
  next-token targets, every target token right). Its mean is the val accuracy.
- `loss` (lower is better): the example's share of the split's token-weighted mean
  cross-entropy (a class: its cross-entropy; next-token targets: the sum of its tokens'
  losses times N / the split's target tokens), so the mean of the values is the split's
  mean loss per target token, the number language models report, and ticket and dense
  pair exactly because they are scored on the same tokens.
- `perplexity` (lower is better): judged on the same per-example losses (perplexity is
  exp of the mean loss, so "lower loss" and "lower perplexity" are one order), reported
  as exp(val_loss). A tolerance t in nats lets the ticket's perplexity be up to exp(t)
  times dense's (0.01: ~1 % higher).

Every stage stores both the correctness bits and the per-example losses, so the metric
is not a stage key input: one stored stage serves lineages judged on any metric.
The default follows the data: accuracy for classification, perplexity for causal language
modelling; the one place that decides it is the config (`ExperimentConfig.verdict_metric`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class Metric:
    """A metric the verdict judges and the reports name (`val_<name>`, `test_<name>`)."""

    name: str
    higher_is_better: bool

    @property
    def direction(self) -> str:
        """Optuna's and MLflow's word: "maximize" or "minimize"."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def judges_loss(self) -> bool:
        """Paired on per-example losses (loss, perplexity), else on correctness bits."""
        return not self.higher_is_better

    @property
    def val_key(self) -> str:
        return f"val_{self.name}"

    @property
    def test_key(self) -> str:
        return f"test_{self.name}"

    def reported(self, accuracy: float | None, loss: float | None) -> float | None:
        """The metric's value from a stage's accuracy and mean loss (None: not measured)."""
        if self.name == "accuracy":
            return accuracy
        if loss is None:
            return None
        if self.name == "perplexity":
            return math.exp(loss) if loss < 700 else math.inf
        return loss

    def val(self, result: Any) -> float | None:
        """The val value of a stage result (results.py StageResult: val_accuracy, val_loss)."""
        return self.reported(result.val_accuracy, getattr(result, "val_loss", None))

    def test(self, result: Any) -> float | None:
        return self.reported(result.test_accuracy, getattr(result, "test_loss", None))

    def threshold(self, dense: float, tolerance: float) -> float:
        """The worst value within `tolerance` of dense's, on this metric's scale: the matching line a
        plot draws (the verdict itself is paired and allows for its noise, objective.py). Accuracy:
        dense - t; loss: dense + t nats; perplexity: dense x exp(t), the same t on exp's scale."""
        if self.name == "accuracy":
            return dense - tolerance
        if self.name == "perplexity":
            return dense * math.exp(tolerance)
        return dense + tolerance

    def format_tolerance(self, tolerance: float) -> str:
        """The tolerance as the matching line's legend says it: -1 pp, +0.01 nats, x1.01."""
        if self.name == "accuracy":
            return f"-{100 * tolerance:g} pp"
        return f"x{math.exp(tolerance):.4g}" if self.name == "perplexity" else f"+{tolerance:g} nats"

    def format(self, value: float | None) -> str:
        """A value as the tables print it: accuracy in %, loss and perplexity as numbers."""
        if value is None:
            return ""
        return f"{100 * value:.2f}%" if self.name == "accuracy" else f"{value:.4g}"

    def format_margin(self, margin: float | None) -> str:
        """A verdict margin (signed so that positive is better) in the tolerance's units."""
        if margin is None:
            return ""
        return f"{100 * margin:+.2f}pp" if self.name == "accuracy" else f"{margin:+.3f}"


METRICS = {
    "accuracy": Metric("accuracy", higher_is_better=True),
    "loss": Metric("loss", higher_is_better=False),
    "perplexity": Metric("perplexity", higher_is_better=False),
}
ACCURACY = METRICS["accuracy"]


def metric_named(name: str | None) -> Metric:
    """The metric called `name` (None or unknown, e.g. a run logged before metrics had names: accuracy)."""
    return METRICS.get(name or "accuracy", ACCURACY)

