"""One iterative-magnitude-pruning lineage, stage by stage, through the stage store.

A lineage is a chain of stages, each keyed by the sha256 of everything that determines
its output, its parent's key included (ARCHITECTURE.md, "Stages and reuse"):

- dense: data content, model, resolved recipe, seed, the rewind steps to keep. Output:
  theta_k for every kept rewind step k ("rewind_<k>", k = 0 is the initialisation),
  theta_T ("end"), dense val/test accuracy. The replicated dense baseline is more dense
  stages of the same inputs with seeds seed+1, seed+2, ... (on the lineage's own split).
- round r: the parent's key (dense or round r-1) and the round's pruning choices
  (rate, scope, ratios, rewind step, init scale). It prunes the parent's end weights by
  magnitude, rewinds the survivors to theta_k (rescaled), retrains from step k to T, and
  outputs the mask ("mask"), the end weights ("end") and the metrics.

Every stage's metrics keep which val examples it classified right (`val_correct`,
packed bits), so a round is judged paired against the dense replicates (objective.py).
The walk stops when the unbroken matching run ends (`prune.patience` misses in a row),
at `prune.target_sparsity`, or at the cap `prune.rounds`; the stages and their keys do
not depend on where a lineage stops, so a longer lineage reuses a shorter one's rounds.

Before computing a stage the lineage asks the store, so any stage any lineage computed
is reused (`reused=1`), and a lineage killed mid-round resumes after its last stored
stage. Without a store, stages live in memory for the run.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.models import build_model
from lth_search.engine.objective import Verdict, pack_correct, paired_verdict, unpack_correct
from lth_search.engine.pruning import (
    Mask,
    calibrated_factors,
    check_layer_groups,
    layer_sparsity,
    masked_state,
    ones_mask,
    prune_round,
    random_mask_like,
    rescale_factors,
    sparsity,
)
from lth_search.engine.results import DenseResult, LineageResult, RoundResult
from lth_search.engine.train import TrainResult, evaluate, predict, resolved_recipe, train
from lth_search.errors import ConfigError
from lth_search.store.keys import content_key
from lth_search.store.stages import StageEntry

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lth_search.engine.results import RoundDiagnostics

PROBE_SIZE = 1024
"""Training inputs the `calibrated` rescale measures activation variance on."""
STAGE_FORMAT = 2
"""Bumped when the meaning of a stage's inputs or outputs changes: old keys stop matching.
2: stages keep per-example val correctness (`val_correct`) for the paired verdict."""


class StageSource(Protocol):
    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Callable[[StageEntry], str | None] | None = None
    ) -> tuple[StageEntry, bool]: ...


class MemoryStages:
    """The store used when none is given: stages are kept for this process only."""

    def __init__(self) -> None:
        self._entries: dict[str, StageEntry] = {}

    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Callable[[StageEntry], str | None] | None = None
    ) -> tuple[StageEntry, bool]:
        if key in self._entries:
            return self._entries[key], True
        self._entries[key] = compute()
        return self._entries[key], False


_DENSE_METRICS = ("val_accuracy", "test_accuracy", "train_loss", "train_steps_per_s", "steps")
_ROUND_METRICS = (*_DENSE_METRICS, "sparsity", "layer_sparsity")


def _needs(weights: list[str], masks: list[str], metrics: tuple[str, ...]) -> Callable[[StageEntry], str | None]:
    """A store check: what a stored stage lacks of what this lineage reads from it (None: nothing)."""

    def check(entry: StageEntry) -> str | None:
        missing = [f"weights {w}" for w in weights if w not in entry.weights]
        missing += [f"mask {m}" for m in masks if m not in entry.masks]
        missing += [f"metric {m}" for m in metrics if m not in entry.metrics]
        return f"lacks {', '.join(missing)}" if missing else None

    return check


RoundCallback = Callable[[RoundResult, LineageResult], None]
DenseCallback = Callable[[LineageResult], None]


class Lineage:
    """An IMP lineage for one config. Build it once; `run()` walks its stages."""

    def __init__(self, cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        data = dataset if dataset is not None else load_dataset(cfg.data, cfg.seed, self.device)
        self.data = data.to(self.device)
        self.store: StageSource = store if store is not None else MemoryStages()
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, cfg.seed).to(self.device)
        self.groups = dict(self.model.prunable)
        check_layer_groups(self.groups, cfg.prune.layer_ratios)  # before the dense stage trains, not after
        self.entries: list[StageEntry] = []
        """The stages of the last `run()`: dense first, then one per round."""
        self.replicates: list[StageEntry] = []
        """The dense baseline of the last `run()`: the lineage's own dense stage, then seed+1, ..."""
        self.recipe = resolved_recipe(cfg.train, self.data.steps_per_epoch(cfg.train.batch_size))
        self.total_steps = self.recipe["steps"]
        late = [k for k in cfg.prune.rewind_steps if k >= self.total_steps]
        if late:
            raise ConfigError(f"prune.rewind_steps: {late} must be < train.steps ({self.total_steps} iterations)")
        self.diagnose: Callable[[StageEntry, StageEntry], "RoundDiagnostics"] | None = None
        """Called with (dense, round stage) for each round's diagnostics; set by KindLineage
        (engine/kinds.py) to engine/probes.py's RoundProbes when `diagnostics.enabled`."""

    # Keys ---------------------------------------------------------------------------------
    def dense_inputs(self, seed: int | None = None) -> dict[str, Any]:
        """Inputs of the dense stage trained with `seed` (default the lineage's: replicate 0)."""
        cfg = self.cfg
        return {
            "stage": "dense",
            "format": STAGE_FORMAT,
            "data": cfg.data.identity(),
            "data_fingerprint": self.data.fingerprint,
            "model": cfg.model.model_dump(),
            "recipe": self.recipe,
            "seed": cfg.seed if seed is None else seed,
            "rewind_steps": cfg.prune.rewind_steps,
        }

    def round_inputs(self, parent_key: str, round_index: int) -> dict[str, Any]:
        return {
            "stage": "round",
            "format": STAGE_FORMAT,
            "parent": parent_key,
            "round": round_index,
            "choices": self.cfg.prune.choices(),
        }

    def stage_keys(self) -> list[str]:
        """Keys of the dense stage and of every round, computable without training."""
        keys = [content_key(self.dense_inputs())]
        for r in range(1, self.cfg.prune.rounds + 1):
            keys.append(content_key(self.round_inputs(keys[-1], r)))
        return keys

    # Stages -------------------------------------------------------------------------------
    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def _accuracies(self) -> dict[str, Any]:
        batch = self.cfg.train.eval_batch_size
        correct = (predict(self.model, self.data.val, batch) == self.data.val.y).cpu().numpy()
        return {
            "val_accuracy": float(correct.mean()) if correct.size else 0.0,
            "test_accuracy": evaluate(self.model, self.data.test, batch),
            "val_correct": {"n": int(correct.size), "bits": pack_correct(correct)},
        }

    def _compute_dense(self, key: str, inputs: dict[str, Any]) -> StageEntry:
        seed = inputs["seed"]
        fresh = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, seed)
        self._load(fresh.state_dict())
        kept = self.cfg.prune.rewind_steps
        result = train(self.model, self.data, self.cfg.train, seed, 0, self.total_steps, snapshot_steps=kept)
        return self.dense_entry(key, inputs, result)

    def dense_entry(self, key: str, inputs: dict[str, Any], result: TrainResult) -> StageEntry:
        """The dense stage from its finished training (evaluates the end weights)."""
        self._load(result.state)
        kept = self.cfg.prune.rewind_steps
        metrics = {
            **self._accuracies(),
            "train_loss": result.train_loss,
            "train_steps_per_s": result.steps_per_s,
            "steps": result.steps,
            "sparsity": 0.0,
        }
        weights = {f"rewind_{k}": result.snapshots[k] for k in kept}
        weights["end"] = result.state
        return StageEntry(key=key, kind="dense", inputs=inputs, metrics=metrics, weights=weights)

    def _compute_round(
        self, key: str, inputs: dict[str, Any], dense: StageEntry, parent: StageEntry, round_index: int
    ) -> StageEntry:
        return self._train_masked(key, inputs, dense, self.next_mask(parent), round_index)

    def next_mask(self, parent: StageEntry) -> Mask:
        """The mask of the round after `parent` (dense or a round): prune its end weights."""
        prune = self.cfg.prune
        parent_mask = parent.masks.get("mask") or ones_mask(self.model)
        return prune_round(
            parent.weights["end"], parent_mask, self.groups, prune.rate, prune.scope, prune.layer_ratios,
            prune.output_ratio,
        )

    def _rescale(self, rewind: dict[str, torch.Tensor], mask: Mask) -> dict[str, float]:
        """Per-layer factors for the survivors at rewind (kept in the stage's metrics, so a
        ticket can be rebuilt exactly without data)."""
        if self.cfg.prune.init_scale == "calibrated":
            probe = self.data.train.x[:PROBE_SIZE]
            return calibrated_factors(self.model, rewind, mask, probe)
        return rescale_factors(rewind, mask, self.cfg.prune.init_scale)

    def _train_masked(
        self, key: str, inputs: dict[str, Any], dense: StageEntry, mask: Mask, round_index: int,
        start_weights: dict[str, torch.Tensor] | None = None, fixed_lr: float | None = None, rescale: bool = True,
        data_seed: int | None = None,
    ) -> StageEntry:
        start, factors = self.round_start(dense, mask, start_weights, rescale)
        self._load(start)
        device_mask = {name: m.to(self.device) for name, m in mask.items()}
        seed = self.cfg.seed if data_seed is None else data_seed
        result = train(
            self.model, self.data, self.cfg.train, seed, self.cfg.prune.rewind_step, self.total_steps,
            mask=device_mask, fixed_lr=fixed_lr,
        )
        return self.round_entry(key, inputs, mask, factors, result, round_index)

    def round_start(
        self, dense: StageEntry, mask: Mask, start_weights: dict[str, torch.Tensor] | None = None,
        rescale: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """(weights a masked stage trains from, the rescale factors): the rewind weights
        (or `start_weights`) masked and rescaled (factors 1 when `rescale` is False)."""
        rewind = start_weights if start_weights is not None else dense.weights[f"rewind_{self.cfg.prune.rewind_step}"]
        factors = self._rescale(rewind, mask) if rescale else {name: 1.0 for name in mask}
        return masked_state(rewind, mask, factors), factors

    def round_entry(
        self, key: str, inputs: dict[str, Any], mask: Mask, factors: dict[str, float], result: TrainResult,
        round_index: int,
    ) -> StageEntry:
        """A masked stage from its finished training (evaluates the end weights)."""
        self._load(result.state)
        metrics = {
            **self._accuracies(),
            "train_loss": result.train_loss,
            "train_steps_per_s": result.steps_per_s,
            "steps": result.steps,
            "sparsity": sparsity(mask),
            "round": round_index,
            "layer_sparsity": layer_sparsity(mask),
            "rescale": factors,
        }
        cpu_mask = {name: m.to("cpu") for name, m in mask.items()}
        return StageEntry(key=key, kind="round", inputs=inputs, metrics=metrics, weights={"end": result.state},
                          masks={"mask": cpu_mask})

    def train_stage(
        self, key: str, inputs: dict[str, Any], dense: StageEntry, mask: Mask, round_index: int,
        start_weights: dict[str, torch.Tensor] | None = None, fixed_lr: float | None = None, rescale: bool = True,
        data_seed: int | None = None,
    ) -> StageEntry:
        """Train `mask` from `start_weights` (default theta_k of `dense`, rescaled per
        prune.init_scale unless `rescale` is False) over steps k..T; the stage is not
        stored here (pass it to the store's get_or_compute). `fixed_lr` replaces the
        schedule, `data_seed` the batch order's seed (a second copy for stability)."""
        return self._train_masked(key, inputs, dense, mask, round_index, start_weights, fixed_lr, rescale, data_seed)

    def start_result(self, dense: StageEntry, reused: bool) -> LineageResult:
        """A result holding the dense stage (reused or not) and no round yet."""
        steps = dense.metrics["steps"]
        return LineageResult(
            dense=DenseResult.from_stage(dense.metrics, dense.key, reused),
            rounds=[], steps_executed=0 if reused else steps, steps_reused=steps if reused else 0,
            tolerance=self.cfg.search.tolerance,
        )

    def dense_stage(self, seed: int | None = None) -> tuple[StageEntry, bool]:
        inputs = self.dense_inputs(seed)
        key = content_key(inputs)
        weights = ["end", *(f"rewind_{k}" for k in self.cfg.prune.rewind_steps)]
        check = _needs(weights, [], _DENSE_METRICS)
        return self.store.get_or_compute(key, lambda: self._compute_dense(key, inputs), check)

    def judge(self, entry: StageEntry) -> Verdict:
        """The paired verdict of a stage against the dense replicates (`run()` trains them first)."""
        return paired_verdict(_correct(entry), [_correct(d) for d in self.replicates], self.cfg.search.tolerance)

    def round_stage(self, dense: StageEntry, parent: StageEntry, round_index: int) -> tuple[StageEntry, bool]:
        inputs = self.round_inputs(parent.key, round_index)
        key = content_key(inputs)
        compute = lambda: self._compute_round(key, inputs, dense, parent, round_index)  # noqa: E731
        return self.store.get_or_compute(key, compute, _needs(["end"], ["mask"], _ROUND_METRICS))

    def control_stage(self, dense: StageEntry, ticket: StageEntry, kind: str, control_seed: int) -> tuple[StageEntry, bool]:
        """Train a control of an IMP round with the same per-layer counts and the same recipe.

        `random_prune`: random positions, the same rewind weights; `random_reinit`: the IMP
        mask on a fresh initialisation (seeded by `control_seed`). Stored like any stage.
        """
        if kind not in ("random_prune", "random_reinit"):
            raise ValueError(f"control must be random_prune or random_reinit, got {kind!r}")
        inputs = {"stage": "control", "format": STAGE_FORMAT, "parent": ticket.key, "kind": kind, "seed": control_seed}
        key = content_key(inputs)
        round_index = int(ticket.metrics.get("round", 0))

        def compute() -> StageEntry:
            if kind == "random_prune":
                return self._train_masked(key, inputs, dense, random_mask_like(ticket.masks["mask"], control_seed), round_index)
            fresh = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, control_seed)
            return self._train_masked(key, inputs, dense, ticket.masks["mask"], round_index, fresh.state_dict())

        return self.store.get_or_compute(key, compute, _needs(["end"], ["mask"], _ROUND_METRICS))

    # The walk -------------------------------------------------------------------------------
    def start(self, dense: StageEntry, reused: bool) -> LineageResult:
        """The result of a walk whose dense stage is `dense` (no rounds yet)."""
        self.entries = [dense]
        self.replicates = [dense]
        steps = dense.metrics["steps"]
        return LineageResult(
            dense=DenseResult.from_stage(dense.metrics, dense.key, reused),
            rounds=[],
            steps_executed=0 if reused else steps,
            steps_reused=steps if reused else 0,
            tolerance=self.cfg.search.tolerance,
            patience=self.cfg.prune.patience,
            target_sparsity=self.cfg.prune.target_sparsity,
        )

    def replicate_seeds(self) -> list[int]:
        """Seeds of the dense replicates beyond the lineage's own dense stage."""
        return [self.cfg.seed + offset for offset in range(1, self.cfg.prune.dense_replicates)]

    def add_replicate(self, result: LineageResult, entry: StageEntry, reused: bool) -> None:
        """Count one more dense replicate into the baseline."""
        self.replicates.append(entry)
        _count_steps(result, entry.metrics["steps"], reused)
        result.dense = dataclasses.replace(result.dense, **_baseline(self.replicates))

    def add_round(self, result: LineageResult, entry: StageEntry, reused: bool, round_index: int) -> RoundResult:
        """Judge a finished round against the baseline, append it, and set `result.stop_reason`."""
        self.entries.append(entry)
        verdict = self.judge(entry)
        round_result = RoundResult.from_stage(
            {**entry.metrics, "round": round_index, "matches": verdict.matches, "margin": verdict.margin,
             "margin_se": verdict.se},
            entry.key, reused,
        )
        result.rounds.append(round_result)
        _count_steps(result, round_result.steps, reused)
        if round_index == 1 and verdict.se > 0 and self.cfg.search.tolerance < 2 * verdict.se:
            # in the log and in every round's margin_se, not on a search's console: with several
            # lineages (confirmation seeds) it would repeat once per lineage after the summary
            log.info(
                "search.tolerance %.4f is below twice the verdict's noise (standard error %.4f): matching is "
                "close to a coin flip; raise data.val_size or prune.dense_replicates, or the tolerance",
                self.cfg.search.tolerance, verdict.se,
            )
        result.stop_reason = result.should_stop() or ("cap" if round_index >= self.cfg.prune.rounds else "")
        return round_result

    def run(self, on_round: RoundCallback | None = None, on_dense: DenseCallback | None = None) -> LineageResult:
        """Run (or fetch) the dense stages and the rounds until the lineage stops, calling back
        after the dense baseline and after each round.

        `self.entries[-1]` is the stage just finished when a callback runs (its mask and
        weights are there for whoever logs them); `self.replicates` holds the dense
        baseline (the lineage's own dense stage first).
        """
        dense, reused = self.dense_stage()
        result = self.start(dense, reused)
        for seed in self.replicate_seeds():
            self.add_replicate(result, *self.dense_stage(seed))
        if on_dense is not None:
            on_dense(result)
        parent = dense
        for round_index in range(1, self.cfg.prune.rounds + 1):
            parent, reused = self.round_stage(dense, parent, round_index)
            round_result = self.add_round(result, parent, reused, round_index)
            round_result.diagnostics = self.diagnose(dense, parent) if self.diagnose is not None else None
            if on_round is not None:
                on_round(round_result, result)
            if result.stop_reason:
                break
        result.stop_reason = result.stop_reason or "cap"
        return result


def _correct(entry: StageEntry) -> Any:
    """A stage's per-example val correctness (a bool vector)."""
    packed = entry.metrics["val_correct"]
    return unpack_correct(packed["bits"], packed["n"])


def _baseline(replicates: list[StageEntry]) -> dict[str, Any]:
    """What the result says about the replicated dense baseline (beside the own dense's metrics)."""
    vals = [r.metrics["val_accuracy"] for r in replicates]
    return {
        "replicates": len(replicates),
        "replicate_keys": [r.key for r in replicates],
        "replicate_val_accuracies": vals,
        "baseline_val_accuracy": sum(vals) / len(vals),
        "baseline_test_accuracy": sum(r.metrics["test_accuracy"] for r in replicates) / len(replicates),
        "baseline_val_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
    }


def _count_steps(result: LineageResult, steps: int, reused: bool) -> None:
    if reused:
        result.steps_reused += steps
    else:
        result.steps_executed += steps


def run_lineage(
    cfg: ExperimentConfig,
    store: StageSource | None = None,
    dataset: Dataset | None = None,
    on_round: RoundCallback | None = None,
) -> LineageResult:
    """Run one IMP lineage for `cfg` in this process (stages through `store` when given)."""
    return Lineage(cfg, store, dataset).run(on_round)
