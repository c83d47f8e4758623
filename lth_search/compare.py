"""`lth-search compare`: lineage kinds side by side at the IMP lineage's sparsities, no Ray.

The table, the summary, the plot and the MLflow run speak the metric the config's lineages
are judged on (`ExperimentConfig.verdict_metric`: accuracy, or a language model's loss or
perplexity, whose sequence accuracy is ~0 at every round and says nothing of a ticket);
every row keeps its accuracies and losses both.

Every kind of `--kinds` for every seed is a lineage walked through the stage store
(engine/lineage/walk.py; the dense stages are shared by every kind of a seed): a rerun, or a comparison that adds
a kind, trains only what is missing. The result is one row per (kind, seed, round) and
a summary per (kind, round) over seeds (mean, min, max), which api.compare turns into
the table, the plot (tracking/plots.py) and the MLflow run (tracking/comparison_run.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lth_search.config import ExperimentConfig
from lth_search.config.schema import validate_config
from lth_search.engine.lineage.kinds import check_kinds, finetune_rate
from lth_search.engine.lineage.metric import ACCURACY, Metric, metric_named
from lth_search.engine.lineage.probes import RoundProbes, attach_probes
from lth_search.engine.lineage.results import LineageResult
from lth_search.engine.lineage.stages import MemoryStages, StageSource
from lth_search.engine.lineage.walk import Lineage, lineages_for, walk
from lth_search.store.entry import StageEntry

Progress = Callable[[str], None]


@dataclass
class CompareRow:
    """One kind, one seed, one round."""

    kind: str
    seed: int
    round: int
    sparsity: float
    val_accuracy: float
    test_accuracy: float
    reused: int
    key: str
    sign_preservation: float | None = None
    sign_preservation_dense: float | None = None
    alignment: float | None = None
    barrier: float | None = None
    val_loss: float | None = None
    test_loss: float | None = None

    def values(self, metric: Metric) -> tuple[float | None, float | None]:
        """(val, test) of `metric`."""
        return metric.reported(self.val_accuracy, self.val_loss), metric.reported(self.test_accuracy, self.test_loss)


@dataclass
class SummaryRow:
    """One kind at one round, over seeds, in the comparison's metric (`CompareResult.metric`)."""

    kind: str
    round: int
    sparsity: float
    seeds: int
    val_mean: float
    val_min: float
    val_max: float
    test_mean: float
    test_min: float
    test_max: float
    sign_preservation: float | None


@dataclass
class CompareResult:
    name: str
    kinds: list[str]
    seeds: list[int]
    metric: Metric = ACCURACY
    """What the table, the summary, the plot and the MLflow run compare (the config's verdict metric)."""
    rows: list[CompareRow] = field(default_factory=list)
    dense: dict[int, dict[str, float]] = field(default_factory=dict)
    """Dense val/test values of `metric` per seed (`val_<metric>`, `test_<metric>`)."""
    dense_barriers: dict[int, dict[int, float]] = field(default_factory=dict)
    """Per seed, the dense network's instability barrier (val error) per rewind step k
    (diagnostics.stability_steps)."""
    steps_executed: int = 0
    steps_reused: int = 0

    def summary(self) -> list[SummaryRow]:
        groups: dict[tuple[str, int], list[CompareRow]] = {}
        for row in self.rows:
            groups.setdefault((row.kind, row.round), []).append(row)
        out = []
        for kind in self.kinds:
            for (k, round_index), rows in sorted(groups.items(), key=lambda item: item[0][1]):
                if k != kind:
                    continue
                pairs = [r.values(self.metric) for r in rows]
                val, test = [_number(p[0]) for p in pairs], [_number(p[1]) for p in pairs]
                signs = [r.sign_preservation for r in rows if r.sign_preservation is not None]
                out.append(SummaryRow(kind, round_index, statistics.mean(r.sparsity for r in rows), len(rows),
                                      statistics.mean(val), min(val), max(val), statistics.mean(test), min(test),
                                      max(test), statistics.mean(signs) if signs else None))
        return out

    def at_equal_counts(self) -> list[str]:
        """Each structured IMP round beside unstructured IMP at the same sparsity (equal parameter
        counts): unstructured values interpolated linearly in sparsity between its rounds
        (the dense network at 0), mean over seeds."""
        summary, metric = self.summary(), self.metric
        dense = self.dense_mean()
        base = [(0.0, dense[metric.val_key], dense[metric.test_key])] + [
            (r.sparsity, r.val_mean, r.test_mean) for r in summary if r.kind == "imp"]
        lines = []
        for row in (r for r in summary if r.kind.startswith("imp_")):
            if row.sparsity > base[-1][0] + 1e-9:
                lines.append(f"{row.kind:<14} {row.round:>5} {100 * row.sparsity:8.2f}%  test {_value(metric, row.test_mean)}"
                             f"  vs unstructured: beyond its sparsest round ({100 * base[-1][0]:.2f}%)")
                continue
            upper = next(i for i, point in enumerate(base) if point[0] >= row.sparsity - 1e-12)
            low, high = base[max(upper - 1, 0)], base[upper]
            t = 0.0 if high[0] == low[0] else (row.sparsity - low[0]) / (high[0] - low[0])
            val, test = (low[1] + t * (high[1] - low[1]), low[2] + t * (high[2] - low[2]))
            lines.append(f"{row.kind:<14} {row.round:>5} {100 * row.sparsity:8.2f}%  val {_value(metric, row.val_mean)} vs "
                         f"{_value(metric, val)}  test {_value(metric, row.test_mean)} vs {_value(metric, test)}  "
                         f"({_difference(metric, row.test_mean - test)} test)")
        if not lines:
            return []
        return ["structured vs unstructured IMP at equal parameter counts (unstructured interpolated in sparsity):",
                *lines]

    def dense_mean(self) -> dict[str, float]:
        values = list(self.dense.values())
        keys = (self.metric.val_key, self.metric.test_key)
        return {key: statistics.mean(_number(v.get(key)) for v in values) for key in keys}

    def table(self) -> str:
        """The console table: one line per kind and round, the metric as mean [min, max] over seeds."""
        dense, metric = self.dense_mean(), self.metric
        unit = "%" if metric.name == "accuracy" else metric.name
        lines = [
            f"compare {self.name}: seeds {','.join(map(str, self.seeds))}; dense val {metric.format(dense[metric.val_key])}"
            f"  test {metric.format(dense[metric.test_key])}  (mean over seeds; [min, max] across seeds)",
            *self._barrier_lines(),
            f"{'kind':<14} {'round':>5} {'sparsity':>9} {'remaining':>9}  {'val ' + unit:<22} {'test ' + unit:<22} {'rho':>5}",
        ]
        for row in self.summary():
            rho = f"{row.sign_preservation:5.3f}" if row.sign_preservation is not None else "    -"
            lines.append(
                f"{row.kind:<14} {row.round:>5} {100 * row.sparsity:8.2f}% {100 * (1 - row.sparsity):8.2f}%  "
                f"{_span(metric, row.val_mean, row.val_min, row.val_max):<22} "
                f"{_span(metric, row.test_mean, row.test_min, row.test_max):<22} "
                f"{rho}"
            )
        return "\n".join(lines + self.at_equal_counts())

    def _barrier_lines(self) -> list[str]:
        steps = sorted({k for barriers in self.dense_barriers.values() for k in barriers})
        if not steps:
            return []
        parts = []
        for k in steps:
            values = [b[k] for b in self.dense_barriers.values() if k in b]
            parts.append(f"k={k}: {_span(ACCURACY, statistics.mean(values), min(values), max(values))} pp")
        return ["dense instability barrier (val error, two data orders from theta_k): " + ";  ".join(parts)]

    def rows_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(asdict(self.rows[0]))) if self.rows else None
        if writer is not None:
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rows)
        return buffer.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "metric": self.metric.name, "kinds": self.kinds, "seeds": self.seeds, "dense": self.dense,
            "dense_barriers": self.dense_barriers,
            "steps_executed": self.steps_executed, "steps_reused": self.steps_reused,
            "rows": [asdict(r) for r in self.rows], "summary": [asdict(r) for r in self.summary()],
        }


def _number(value: float | None) -> float:
    """A value to average: an unmeasured one (no loss stored) as NaN, which the table shows as nan."""
    return math.nan if value is None else value


def _value(metric: Metric, value: float) -> str:
    """A value in the table's units: accuracy in % (without the sign), a loss or perplexity as it is."""
    return f"{100 * value:5.2f}" if metric.name == "accuracy" else f"{value:.4g}"


def _span(metric: Metric, mean: float, low: float, high: float) -> str:
    return f"{_value(metric, mean)} [{_value(metric, low)}, {_value(metric, high)}]"


def _difference(metric: Metric, delta: float) -> str:
    """A difference of two values: pp of accuracy, or the loss's or perplexity's own units."""
    return f"{100 * delta:+.2f} pp" if metric.name == "accuracy" else f"{delta:+.4g} {metric.name}"


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    data = cfg.model_dump()
    data["seed"] = seed
    return validate_config(data, source="compare seeds")


def structure_kind(structure: str) -> str:
    """The row label of IMP pruned with `structure` (`imp_channel`, `imp_block_4`, `imp_2_4`): MLflow-safe."""
    return "imp_" + structure.replace(":", "_")


def run_compare(
    cfg: ExperimentConfig, kinds: Sequence[str], seeds: Sequence[int], store: StageSource | None = None,
    progress: Progress = lambda _: None, structures: Sequence[str] = (),
) -> CompareResult:
    """Run every kind for every seed (stages through `store`) and collect the rows.

    Two walks (engine/lineage/walk.py): the IMP lineage of every seed, each stopping where
    its matching run ends; then every other kind of every seed, walked to its seed's IMP
    length whatever its own verdict, so each kind has a row at each of IMP's sparsities.
    Seeds and kinds train as packs where the model batches."""
    kinds = check_kinds(list(dict.fromkeys(kinds)))
    result = CompareResult(cfg.name, kinds, list(seeds), metric_named(cfg.verdict_metric()))
    counting = _CountingStages(store if store is not None else MemoryStages())
    configs = [seed_config(cfg, seed) for seed in seeds]
    imp = lineages_for(configs, counting, ["imp"] * len(configs))
    for lineage in imp:
        attach_probes(lineage)
    imp_results = walk(imp)
    others = [kind for kind in kinds if kind != "imp"]
    if "finetune" in others and finetune_rate(imp[0]) is None:
        progress("finetune: the learning-rate schedule is constant, so fine-tuning is learning-rate "
                 "rewinding (the same stages, trained once)")
    plan = [(index, kind) for index in range(len(configs)) for kind in others]
    rest = lineages_for([configs[i] for i, _ in plan], counting, [kind for _, kind in plan])
    for lineage, (index, _) in zip(rest, plan):
        lineage.rounds, lineage.stop_at_run_end = len(imp_results[index].rounds), False
        attach_probes(lineage)
    rest_results = dict(zip(plan, walk(rest)))
    for index, seed in enumerate(seeds):
        for kind in kinds:
            lineage_result = imp_results[index] if kind == "imp" else rest_results[(index, kind)]
            _add_rows(result, kind, seed, lineage_result, progress)
        if cfg.diagnostics.stability_steps:
            result.dense_barriers[seed] = dense_barriers(imp[index], cfg.diagnostics.stability_steps, progress)
    for structure in [s for s in dict.fromkeys(structures) if s != cfg.prune.structure]:
        label = structure_kind(structure)
        result.kinds.append(label)
        shaped = [with_structure(c, structure) for c in configs]
        for seed, lineage_result in zip(seeds, walk(lineages_for(shaped, counting, ["imp"] * len(shaped)))):
            _add_rows(result, label, seed, lineage_result, progress)
    result.steps_executed, result.steps_reused = counting.executed, counting.reused
    return result


def with_structure(cfg: ExperimentConfig, structure: str) -> ExperimentConfig:
    data = cfg.model_dump()
    data["prune"]["structure"] = structure
    return validate_config(data, source="compare --structures")


def _add_rows(result: CompareResult, kind: str, seed: int, lineage_result: LineageResult, progress: Progress) -> None:
    dense, metric = lineage_result.dense, result.metric
    result.dense[seed] = {metric.val_key: metric.val(dense), metric.test_key: metric.test(dense)}
    executed = sum(r.steps for r in lineage_result.rounds if not r.reused)
    for r in lineage_result.rounds:
        d = r.diagnostics
        result.rows.append(CompareRow(
            kind, seed, r.round, r.sparsity, r.val_accuracy, r.test_accuracy, r.reused, r.key,
            d.sign_ticket if d else None, d.sign_dense if d else None, d.alignment if d else None,
            d.barrier if d else None, r.val_loss, r.test_loss,
        ))
    last = lineage_result.rounds[-1] if lineage_result.rounds else None
    if last is not None:
        progress(f"seed {seed} {kind:<14} {len(lineage_result.rounds)} rounds to {100 * last.sparsity:.2f}% "
                 f"sparsity: val {metric.format(metric.val(last))}  test {metric.format(metric.test(last))}  "
                 f"({executed} steps trained)")
    elif lineage_result.failed:
        progress(f"seed {seed} {kind:<14} no rounds: {lineage_result.failed}")


def dense_barriers(lineage: Lineage, steps: Sequence[int], progress: Progress) -> dict[int, float]:
    """The dense network's instability barrier for each rewind step k (stored stages)."""
    probes = lineage.diagnose if isinstance(lineage.diagnose, RoundProbes) else RoundProbes(lineage)
    dense, _ = lineage.dense_stage()
    barriers = {k: float(probes.dense_stability(dense, k).metrics["barrier"]) for k in steps}
    progress(f"seed {lineage.cfg.seed} dense instability barrier: "
             + ", ".join(f"k={k} {100 * b:.2f} pp" for k, b in barriers.items()))
    return barriers


class _CountingStages:
    """The store, counting the training steps of the stages computed vs taken from it."""

    def __init__(self, inner: StageSource) -> None:
        self.inner, self.executed, self.reused = inner, 0, 0

    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Callable[[StageEntry], str | None] | None = None
    ) -> tuple[StageEntry, bool]:
        entry, reused = self.inner.get_or_compute(key, compute, check)
        steps = int(entry.metrics.get("steps", 0))
        if reused:
            self.reused += steps
        else:
            self.executed += steps
        return entry, reused


def write_outputs(result: CompareResult, out: str | Path, plot_png: bytes) -> Path:
    """compare.json, compare.csv (one row per kind, seed, round), table.txt and the plot, in `out`.
    The plot keeps its name (accuracy_vs_sparsity.png) whatever the metric, as the lineage plot's does."""
    folder = Path(out).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.json").write_text(json.dumps(result.to_json(), indent=2))
    (folder / "compare.csv").write_text(result.rows_csv())
    (folder / "table.txt").write_text(result.table() + "\n")
    (folder / "accuracy_vs_sparsity.png").write_bytes(plot_png)
    return folder
