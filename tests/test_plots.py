"""The lineage and search plots draw the metric the search is judged on (accuracy, loss, perplexity)."""

from __future__ import annotations

import math

import pytest

from lth_search.engine.lineage.metric import METRICS
from lth_search.tracking.plots import lineage_figure, lineage_plot, pareto_front, search_figure, search_plot


def _lines(figure) -> dict[str, list[float]]:
    """Every labelled line of the figure's axes: label -> its y values."""
    return {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()
            if not line.get_label().startswith("_")}


def _round(number: int, sparsity: float, val_loss: float, test_loss: float) -> dict[str, float]:
    return {"round": number, "sparsity": sparsity, "val_accuracy": 0.0, "test_accuracy": 0.0,
            "val_loss": val_loss, "test_loss": test_loss}


def test_a_perplexity_lineage_is_drawn_in_perplexity_with_its_matching_line() -> None:
    # A language model's sequence accuracy is ~0 at every round: an accuracy plot says nothing of its tickets.
    rounds = [_round(1, 0.2, 2.0, 2.1), _round(2, 0.36, 2.05, 2.12), _round(3, 0.49, math.nan, math.nan)]
    dense_val, dense_test, tolerance = math.exp(1.98), math.exp(2.08), 0.05
    figure = lineage_figure(rounds, dense_val, dense_test, tolerance, "t", matching_round=2,
                            metric=METRICS["perplexity"])
    lines = _lines(figure)
    assert lines["val perplexity"] == pytest.approx([math.exp(2.0), math.exp(2.05)])  # the failed round 3 is left out
    assert lines["test perplexity"] == pytest.approx([math.exp(2.1), math.exp(2.12)])
    [threshold] = [values for label, values in lines.items() if label.startswith("matching threshold")]
    assert threshold == pytest.approx([dense_val * math.exp(tolerance)] * 2)
    assert lines["matching ticket"] == pytest.approx([math.exp(2.05)])
    assert figure.axes[0].get_ylabel() == "perplexity"
    assert lineage_plot(rounds, dense_val, dense_test, tolerance, "t", 2, METRICS["perplexity"])[:4] == b"\x89PNG"


def test_an_accuracy_lineage_is_drawn_in_percent_below_dense() -> None:
    rounds = [{"round": 1, "sparsity": 0.2, "val_accuracy": 0.9, "test_accuracy": 0.0},
              {"round": 2, "sparsity": 0.36, "val_accuracy": 0.88, "test_accuracy": 0.87}]
    lines = _lines(lineage_figure(rounds, 0.91, 0.9, 0.01, "t", matching_round=1))
    assert lines["val accuracy"] == pytest.approx([90.0, 88.0])
    assert lines["test accuracy"] == pytest.approx([0.0, 87.0])  # a test accuracy of 0 is a value, not a gap
    assert [v for label, v in lines.items() if label.startswith("matching threshold")] == [pytest.approx([90.0, 90.0])]


def test_a_loss_search_plots_val_loss_and_its_pareto_front_keeps_the_lowest() -> None:
    common = {"metric": "loss", "direction": "minimize", "dense_val_loss": 2.0, "tolerance": 0.1, "val_accuracy": 0.0}
    rows = [{"trial_id": "a", "round": 1, "sparsity": 0.2, "val_loss": 2.05, **common},
            {"trial_id": "a", "round": 2, "sparsity": 0.36, "val_loss": 2.3, **common},
            {"trial_id": "b", "round": 1, "sparsity": 0.36, "val_loss": 2.08, **common},
            {"trial_id": "b", "round": 2, "sparsity": 0.5, "val_loss": math.inf, **common}]
    figure = search_figure(rows, "t", best=rows[2])
    lines = _lines(figure)
    assert lines["a"] == pytest.approx([2.05, 2.3]) and lines["b"] == pytest.approx([2.08])
    assert lines["Pareto front (sparsity, val)"] == pytest.approx([2.05, 2.08])
    assert lines["best ticket"] == pytest.approx([2.08])
    assert figure.axes[0].get_ylabel() == "val loss"
    assert search_plot(rows, "t", rows[2])[:4] == b"\x89PNG"


def test_pareto_fronts_in_either_direction() -> None:
    points = [(0.2, 0.9), (0.5, 0.8), (0.5, 0.85), (0.7, 0.7)]
    assert pareto_front(points) == [(0.2, 0.9), (0.5, 0.85), (0.7, 0.7)]
    losses = [(0.2, 1.0), (0.5, 1.2), (0.5, 1.1), (0.7, 1.3)]
    assert pareto_front(losses, higher_is_better=False) == [(0.2, 1.0), (0.5, 1.1), (0.7, 1.3)]
    assert pareto_front(losses) == [(0.7, 1.3)]  # read as accuracies, the sparsest point beats them all
