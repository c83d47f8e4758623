"""What a lineage reports: typed results of the dense stage, of each round, of the lineage.

These are the one shape a round's numbers take from the engine to the console, the
trial record in the store, Ray Tune and MLflow: every reader goes through the fields
here (or `to_json`/`from_json`), never through string keys of an ad-hoc dict. The JSON
keys are those of `lth-search lineage --json` (ARCHITECTURE.md), so records written
before these types existed still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from lth_search.engine.lineage.metric import metric_named
from lth_search.engine.lineage.objective import Matching, matching, run_ended, verdicts


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of dataclass `cls` (records may carry more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class StageResult:
    """What every stage reports, dense or round: one list of names for both, so that each
    reader (console, MLflow layout, trial record) reads a round as it reads the dense stage.

    To and from JSON; `from_json` ignores keys it does not know (records may carry more).
    """

    val_accuracy: float
    test_accuracy: float
    train_loss: float
    train_steps_per_s: float
    reused: int
    steps: int
    key: str
    val_loss: float | None = field(default=None, kw_only=True)
    """Mean val loss per target token (None: a record from before stages stored it); the val
    value of the loss metric, exp of it the perplexity (metric.py)."""
    test_loss: float | None = field(default=None, kw_only=True)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]):  # noqa: ANN206 - returns cls
        return cls(**_known_fields(cls, data))

    @classmethod
    def from_stage(cls, metrics: dict[str, Any], key: str, reused: bool):  # noqa: ANN206
        """The result of a stage, from the metrics it stored and whether it was reused now."""
        return cls.from_json({**metrics, "key": key, "reused": int(reused)})


@dataclass
class DenseResult(StageResult):
    """The dense stage: accuracies of the unpruned network at the end of training."""

    replicates: int = 1
    """Dense networks in the baseline a round is judged against: this one, then seeds +1, +2, ..."""
    replicate_keys: list[str] = field(default_factory=list)
    replicate_val_accuracies: list[float] = field(default_factory=list)
    baseline_val_accuracy: float | None = None
    """The replicates' mean val accuracy: the bar of the paired verdict (None: one dense, this one)."""
    baseline_test_accuracy: float | None = None
    baseline_val_sd: float = 0.0
    """Standard deviation of the replicates' val accuracies: training-seed noise on this split."""
    baseline_val_loss: float | None = None
    """The replicates' mean val loss (the bar of a loss or perplexity verdict)."""
    failed: str | None = None
    """Why the dense network (or a replicate) did not train (None: it did); the lineage then stops."""


@dataclass
class RoundDiagnostics:
    """Diagnostics of one round; the optional probes stay None unless asked for."""

    sign_ticket: float | None = None
    sign_dense: float | None = None
    alignment: float | None = None
    barrier: float | None = None
    """Error barrier between two copies of this round trained with different data orders."""
    perturbed_val_accuracy: float | None = None
    collapsed_layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The numeric diagnostics, named as MLflow metrics (absent ones left out)."""
        values = {
            "sign_preservation": self.sign_ticket,
            "sign_preservation_dense": self.sign_dense,
            "trajectory_alignment": self.alignment,
            "instability_barrier": self.barrier,
            "perturbed_val_accuracy": self.perturbed_val_accuracy,
        }
        out = {name: float(v) for name, v in values.items() if v is not None}
        out["collapsed_layers"] = float(len(self.collapsed_layers))
        return out


@dataclass
class RoundResult(StageResult):
    """What one round reports (ARCHITECTURE.md, `lineage --json` and MLflow metrics)."""

    round: int
    sparsity: float
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    rescale: dict[str, float] = field(default_factory=dict)
    """Per-layer factor the survivors were multiplied by at rewind."""
    matches: bool | None = None
    """The paired verdict against the dense replicates (None: not judged, e.g. an old record)."""
    margin: float | None = None
    """The val metric minus the dense replicates' mean on the same examples, signed so that
    negative is worse (accuracy: a fraction; loss and perplexity: nats of mean token loss)."""
    margin_se: float | None = None
    """Standard error of `margin`: paired val sampling plus the dense replicates' seed spread."""
    diagnostics: RoundDiagnostics | None = None
    """Sign preservation, trajectory alignment, layer health, optional probes (diagnostics.*)."""
    failed: str | None = None
    """Why the round did not train (a non-finite loss, chance-level accuracy); it never matches."""

    def __post_init__(self) -> None:
        if isinstance(self.diagnostics, dict):  # read back from JSON (a trial record, sync)
            self.diagnostics = RoundDiagnostics(**self.diagnostics)

    def to_json(self) -> dict[str, Any]:
        """As StageResult's, with `round` and `sparsity` first, where `lineage --json` has them."""
        return {"round": self.round, "sparsity": self.sparsity, **asdict(self)}


@dataclass
class LineageResult:
    """A lineage so far: its dense stage, the rounds it walked, and the compute they took."""

    dense: DenseResult
    rounds: list[RoundResult]
    steps_executed: int
    steps_reused: int
    tolerance: float
    patience: int = 1
    """Misses in a row that end the unbroken matching run (prune.patience)."""
    target_sparsity: float | None = None
    stop_reason: str = ""
    """Why the walk ended: "run_ended", "target_sparsity", "dense_failed" or "cap" ("" while it runs)."""
    kind: str = "imp"
    """The lineage kind (prune.kind, engine/lineage/kinds.py)."""
    metric: str = "accuracy"
    """The metric the verdict judged (search.metric resolved, engine/lineage/metric.py)."""

    @property
    def failed(self) -> str | None:
        """Why the lineage has no ticket at all: its dense network did not train (None: it did)."""
        return self.dense.failed

    def count(self, steps: int, reused: bool) -> None:
        """Count a stage's training steps as executed here or taken from the store."""
        if reused:
            self.steps_reused += steps
        else:
            self.steps_executed += steps

    @property
    def best(self) -> Matching:
        """The lineage's score so far: the last round of its unbroken matching run (round 0 =
        the dense network). Fair at any round: it only looks at completed rounds."""
        return self.score()

    def score(self, upto: int | None = None) -> Matching:
        """The score counting rounds 1..`upto` only (all completed rounds by default)."""
        rounds = self.rounds if upto is None else [r for r in self.rounds if r.round <= upto]
        return matching(self.dense.val_accuracy, rounds, self.tolerance, self.patience)

    def verdicts(self) -> list[bool]:
        """Each completed round's verdict (paired when judged, else the unpaired rule)."""
        return verdicts(self.dense.val_accuracy, self.rounds, self.tolerance)

    def should_stop(self) -> str:
        """Why the lineage stops after its last completed round ("" to go on; the cap aside)."""
        if run_ended(self.verdicts(), self.patience):
            return "run_ended"
        if self.target_sparsity is not None and self.rounds and self.rounds[-1].sparsity >= self.target_sparsity:
            return "target_sparsity"
        return ""

    @property
    def matching_stage(self) -> StageResult:
        """The stage of the score: the matching round, or the dense network when none matched."""
        best = self.best
        return next((r for r in self.rounds if r.round == best.round), self.dense)

    def metric_values(self, stage: StageResult) -> dict[str, float]:
        """`val_<metric>` and `test_<metric>` of a stage, by the lineage's metric (none for
        accuracy, whose `val_accuracy` every reader has already)."""
        metric = metric_named(self.metric)
        if metric.name == "accuracy":
            return {}
        values = {metric.val_key: metric.val(stage), metric.test_key: metric.test(stage)}
        return {k: float(v) for k, v in values.items() if v is not None}

    @property
    def matching_test_accuracy(self) -> float:
        """Test accuracy at the matching round: reported, never selected on."""
        best = self.best
        return next((r.test_accuracy for r in self.rounds if r.round == best.round), self.dense.test_accuracy)

    @property
    def executed_keys(self) -> list[str]:
        """Stage keys this run trained (not taken from the store)."""
        keys = [] if self.dense.reused else [self.dense.key]
        return keys + [r.key for r in self.rounds if not r.reused]

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "kind": self.kind,
            "metric": self.metric,
            "dense": self.dense.to_json(),
            "rounds": [r.to_json() for r in self.rounds],
            "steps_executed": self.steps_executed,
            "steps_reused": self.steps_reused,
            "matching_sparsity": best.sparsity,
            "matching_round": best.round,
            "matching_val_accuracy": best.val_accuracy,
            "patience": self.patience,
            "stop_reason": self.stop_reason,
            "failed": self.failed,
        }
