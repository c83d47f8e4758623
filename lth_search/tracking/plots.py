"""The two pictures MLflow shows: one lineage, and every lineage of a search.

Both plot the metric the lineages are judged on (accuracy, or a language model's loss or
perplexity) against sparsity with the dense network as a horizontal reference, because
"does the ticket match dense?" is the question a lottery-ticket plot answers. Figures are
drawn on matplotlib's Agg canvas without pyplot, so no display and no global figure state
is involved (trials may plot concurrently).
"""

from __future__ import annotations

import gc
import io
import math
from typing import Any, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from lth_search.engine.lineage.metric import ACCURACY, Metric, metric_named

LINEAGE_MARGINS = {"left": 0.1, "right": 0.97, "bottom": 0.12, "top": 0.92}
"""The lineage plot's axes within its figure: room for the labels and the title, fixed."""
_LOG_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def _png(figure: Figure, margins: dict[str, float] | None = None) -> bytes:
    """The figure as PNG. With fixed `margins` (subplots_adjust's) it is drawn once, not twice as
    `bbox_inches="tight"` draws it, and zlib's fastest level: a search draws one plot per trial
    (0.19 s -> 0.08 s each, measured), and the bytes grow ~6 %.

    The figure is collected once drawn (callers hand it over: `_png(lineage_figure(...))`). A
    Figure and its artists reference each other, so they waited for the garbage collector: the
    20 best trials' plots and the search plot of a search's finish held ~14 MB and ~10 MB of
    figures at the driver's peak (issue 24); a young-generation collection takes no measurable time."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    if margins is None:
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    else:
        figure.subplots_adjust(**margins)
        figure.savefig(buffer, format="png", dpi=110, pil_kwargs={"compress_level": 1})
    del figure
    gc.collect(1)
    return buffer.getvalue()


def _pct(values: Iterable[float]) -> list[float]:
    return [100.0 * v for v in values]


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The (sparsity, value) points no other point beats on both, by increasing sparsity (a value
    is better higher for accuracy, lower for a loss or perplexity)."""
    sign = 1.0 if higher_is_better else -1.0
    front: list[tuple[float, float]] = []
    best = float("-inf")
    for sparsity, value in sorted(set(points), key=lambda p: (-p[0], -sign * p[1])):
        if sign * value > best:
            front.append((sparsity, value))
            best = sign * value
    return front[::-1]


def _scale(metric: Metric) -> float:
    """Accuracy is drawn in %, a loss or a perplexity as it is."""
    return 100.0 if metric.name == "accuracy" else 1.0


def _axis_label(metric: Metric, split: str = "") -> str:
    name = f"{split} {metric.name}".strip()
    return f"{name} (%)" if metric.name == "accuracy" else name


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def lineage_plot(
    rounds: Sequence[dict[str, Any]], dense_val: float | None, dense_test: float | None, tolerance: float,
    title: str, matching_round: int | None = None, metric: Metric = ACCURACY,
) -> bytes:
    """`lineage_figure` as PNG."""
    return _png(lineage_figure(rounds, dense_val, dense_test, tolerance, title, matching_round, metric), LINEAGE_MARGINS)


def lineage_figure(
    rounds: Sequence[dict[str, Any]], dense_val: float | None, dense_test: float | None, tolerance: float,
    title: str, matching_round: int | None = None, metric: Metric = ACCURACY,
) -> Figure:
    """The judged metric on val and test per round vs sparsity, dense lines and the matching line.

    `rounds` are dicts with round, sparsity, val_accuracy, test_accuracy (and val_loss, test_loss,
    from which a loss or perplexity is read); `dense_val` and `dense_test` are dense's values of
    `metric`. A loss- or perplexity-judged lineage (a language model) is drawn in its own metric:
    its accuracy (every token of a sequence right) says nothing of the ticket. A round whose value
    is not finite (a failed one) is left out."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    scale = _scale(metric)
    points = []
    for r in sorted(rounds, key=lambda r: r["round"]):
        val, test = (metric.reported(r[f"{split}_accuracy"], r.get(f"{split}_loss")) for split in ("val", "test"))
        if _finite(val):
            points.append((r["round"], 100 * r["sparsity"], scale * val, math.nan if test is None else scale * test))
    x = [p[1] for p in points]
    axes.plot(x, [p[2] for p in points], "o-", color="C0", label=f"val {metric.name}")
    axes.plot(x, [p[3] for p in points], "s--", color="C1", alpha=0.7, label=f"test {metric.name}")
    if _finite(dense_val):
        axes.axhline(scale * dense_val, color="C0", lw=1, label=f"dense val {metric.format(dense_val)}")
        axes.axhline(scale * metric.threshold(dense_val, tolerance), color="C0", lw=1, ls=":",
                     label=f"matching threshold ({metric.format_tolerance(tolerance)})")
    if _finite(dense_test):
        axes.axhline(scale * dense_test, color="C1", lw=1, alpha=0.6, label=f"dense test {metric.format(dense_test)}")
    for number, sparsity, val, _ in points:
        if number == matching_round:
            axes.plot([sparsity], [val], "*", ms=16, color="C2", label="matching ticket")
    axes.set_xlabel("sparsity (% of prunable weights removed)")
    axes.set_ylabel(_axis_label(metric))
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left" if metric.higher_is_better else "upper left")
    return figure


def search_plot(rows: Sequence[dict[str, Any]], title: str, best: dict[str, Any] | None = None) -> bytes:
    """`search_figure` as PNG."""
    return _png(search_figure(rows, title, best))


def search_figure(rows: Sequence[dict[str, Any]], title: str, best: dict[str, Any] | None = None) -> Figure:
    """Every trial's val metric vs sparsity, dense references, the Pareto front, the best ticket.

    `rows` are ticket rows (trial_id, round, sparsity, val_accuracy, dense_val_accuracy; a search
    judged on loss or perplexity: its `metric`, val_<metric> and dense_val_<metric>, drawn instead
    of accuracy). Rows without a finite value (a failed round) are left out."""
    metric = metric_named(next((row["metric"] for row in rows if row.get("metric")), None))
    val_key = "val_accuracy" if metric.name == "accuracy" else metric.val_key
    scale = _scale(metric)
    figure = Figure(figsize=(7.2, 4.8))
    axes = figure.add_subplot()
    drawn = [row for row in rows if _finite(row.get(val_key))]
    trials: dict[str, list[dict[str, Any]]] = {}
    for row in drawn:
        trials.setdefault(row["trial_id"], []).append(row)
    for index, (trial_id, items) in enumerate(sorted(trials.items())):
        items.sort(key=lambda r: r["round"])
        axes.plot(
            _pct(r["sparsity"] for r in items), [scale * r[val_key] for r in items], ".-", lw=0.8, alpha=0.6,
            color=f"C{index % 10}", label=trial_id if len(trials) <= 12 else None,
        )
    references = {(r[f"dense_{val_key}"], r.get("tolerance")) for r in drawn if _finite(r.get(f"dense_{val_key}"))}
    for dense, tolerance in sorted(references, key=str):
        axes.axhline(scale * dense, color="black", lw=1, ls="--")
        if tolerance is not None:
            axes.axhline(scale * metric.threshold(dense, tolerance), color="black", lw=1, ls=":")
    if references:
        axes.plot([], [], color="black", lw=1, ls="--", label=f"dense val {metric.name}")
        axes.plot([], [], color="black", lw=1, ls=":", label="matching threshold")
    front = pareto_front([(r["sparsity"], r[val_key]) for r in drawn], metric.higher_is_better)
    if front:
        # where="pre": at any sparsity s, the line shows the best val value reached at sparsity >= s.
        axes.step(_pct(p[0] for p in front), [scale * p[1] for p in front], where="pre", color="red", lw=1.8,
                  marker="o", ms=4, label="Pareto front (sparsity, val)")
    if best is not None and _finite(best.get(val_key)):
        axes.plot([100 * best["sparsity"]], [scale * best[val_key]], "*", ms=18, color="gold",
                  markeredgecolor="black", label="best ticket")
    axes.set_xlabel("sparsity (% of prunable weights removed)")
    axes.set_ylabel(_axis_label(metric, "val"))
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # a search with no round yet draws no line to name
        axes.legend(fontsize=7, loc="lower left" if metric.higher_is_better else "upper left", ncol=2)
    return figure


def compare_lines(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(legend label, kind drawn) per line: kinds with identical rows share one line.

    Under a constant learning-rate schedule fine-tuning is learning-rate rewinding (the
    same stages), and a second line drawn exactly over the first would hide it; its
    legend entry reads `lr_rewind = finetune` instead.
    """
    groups: dict[tuple, list[str]] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        values = sorted((r["sparsity"], r["val_mean"], r["test_mean"]) for r in rows if r["kind"] == kind)
        groups.setdefault(tuple(values), []).append(kind)
    return [(" = ".join(kinds), kinds[0]) for kinds in groups.values()]


def compare_plot(rows: Sequence[dict[str, Any]], dense: dict[str, float], title: str, metric: Metric = ACCURACY) -> bytes:
    """PNG: val and test values of `metric` vs remaining weights (log scale) for each lineage kind.

    `rows` are summary rows (kind, sparsity, val_mean/min/max, test_mean/min/max, in `metric`);
    `dense` holds `val_<metric>` and `test_<metric>`; the band around each line spans the seeds'
    min to max, the dashed line is dense.
    """
    figure = Figure(figsize=(11, 4.4))
    lines = compare_lines(rows)
    scale = _scale(metric)
    for index, split in enumerate(("val", "test")):
        axes = figure.add_subplot(1, 2, index + 1)
        for number, (label, kind) in enumerate(lines):
            items = sorted((r for r in rows if r["kind"] == kind), key=lambda r: -r["sparsity"])
            remaining = [100 * (1 - r["sparsity"]) for r in items]
            color = f"C{number % 10}"
            axes.plot(remaining, [scale * r[f"{split}_mean"] for r in items], "o-", ms=3, color=color, label=label)
            axes.fill_between(remaining, [scale * r[f"{split}_min"] for r in items],
                              [scale * r[f"{split}_max"] for r in items], color=color, alpha=0.15, lw=0)
        reference = dense.get(f"{split}_{metric.name}")
        if _finite(reference):
            axes.axhline(scale * reference, color="black", lw=1, ls="--", label="dense")
        axes.set_xscale("log")
        shown = [100 * (1 - r["sparsity"]) for r in rows]
        axes.set_xticks([v for v in _LOG_TICKS if min(shown) / 1.5 <= v <= max(shown) * 1.5])
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.invert_xaxis()
        axes.set_xlabel("remaining weights (% of prunable, log scale)")
        axes.set_ylabel(_axis_label(metric, split))
        axes.grid(alpha=0.3, which="both")
        axes.set_title(f"{title} · {split}", fontsize=10)
        if index == 0:
            axes.legend(fontsize=7, loc="lower left" if metric.higher_is_better else "upper left")
    return _png(figure)
