"""One iterative-magnitude-pruning lineage, stage by stage, through the stage store.

A lineage is a chain of stages, each keyed by the sha256 of everything that determines
its output, its parent's key included (ARCHITECTURE.md, "Stages and reuse"):

- dense: data content, model, resolved recipe, seed, the rewind steps to keep. Output:
  theta_k for every kept rewind step k ("rewind_<k>", k = 0 is the initialisation),
  theta_T ("end"), dense val/test accuracy.
- round r: the parent's key (dense or round r-1) and the round's pruning choices
  (rate, scope, ratios, rewind step, init scale). It prunes the parent's end weights by
  magnitude, rewinds the survivors to theta_k (rescaled), retrains from step k to T, and
  outputs the mask ("mask"), the end weights ("end") and the metrics.

Before computing a stage the lineage asks the store, so any stage any lineage computed
is reused (`reused=1`), and a lineage killed mid-round resumes after its last stored
stage. Without a store, stages live in memory for the run.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from lth_search.config import ExperimentConfig
from lth_search.store.keys import content_key
from lth_search.engine.data import Dataset, data_signature, load_dataset, resolve_device
from lth_search.errors import ConfigError
from lth_search.engine.models import build_model
from lth_search.engine.results import DenseResult, LineageResult, RoundResult
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
from lth_search.store.stages import StageEntry
from lth_search.engine.train import evaluate, resolved_recipe, train

PROBE_SIZE = 1024
"""Training inputs the `calibrated` rescale measures activation variance on."""
STAGE_FORMAT = 1
"""Bumped when the meaning of a stage's inputs or outputs changes: old keys stop matching."""


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


def preflight(cfg: ExperimentConfig) -> None:
    """Check what the config alone cannot: the model fits the data set and has the layer
    groups `prune.layer_ratios` names. Cheap (no data read; the model is bounded by the schema), so
    callers run it before they open a store or a tracking run: bad input writes nothing."""
    shape, classes = data_signature(cfg.data.name)
    check_layer_groups(dict(build_model(cfg.model, shape, classes, cfg.seed).prunable), cfg.prune.layer_ratios)


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
        self.recipe = resolved_recipe(cfg.train, self.data.steps_per_epoch(cfg.train.batch_size))
        self.total_steps = self.recipe["steps"]
        late = [k for k in cfg.prune.rewind_steps if k >= self.total_steps]
        if late:
            raise ConfigError(f"prune.rewind_steps: {late} must be < train.steps ({self.total_steps} iterations)")

    # Keys ---------------------------------------------------------------------------------
    def dense_inputs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "stage": "dense",
            "format": STAGE_FORMAT,
            "data": cfg.data.identity(),
            "data_fingerprint": self.data.fingerprint,
            "model": cfg.model.model_dump(),
            "recipe": self.recipe,
            "seed": cfg.seed,
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

    def _accuracies(self) -> dict[str, float]:
        batch = self.cfg.train.eval_batch_size
        return {
            "val_accuracy": evaluate(self.model, self.data.val, batch),
            "test_accuracy": evaluate(self.model, self.data.test, batch),
        }

    def _compute_dense(self, key: str, inputs: dict[str, Any]) -> StageEntry:
        fresh = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, self.cfg.seed)
        self._load(fresh.state_dict())
        kept = self.cfg.prune.rewind_steps
        result = train(self.model, self.data, self.cfg.train, self.cfg.seed, 0, self.total_steps, snapshot_steps=kept)
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
        prune = self.cfg.prune
        parent_mask = parent.masks.get("mask") or ones_mask(self.model)
        mask = prune_round(
            parent.weights["end"], parent_mask, self.groups, prune.rate, prune.scope, prune.layer_ratios,
            prune.output_ratio,
        )
        return self._train_masked(key, inputs, dense, mask, round_index)

    def _rescale(self, rewind: dict[str, torch.Tensor], mask: Mask) -> dict[str, float]:
        """Per-layer factors for the survivors at rewind (kept in the stage's metrics, so a
        ticket can be rebuilt exactly without data)."""
        if self.cfg.prune.init_scale == "calibrated":
            probe = self.data.train.x[:PROBE_SIZE]
            return calibrated_factors(self.model, rewind, mask, probe)
        return rescale_factors(rewind, mask, self.cfg.prune.init_scale)

    def _train_masked(
        self, key: str, inputs: dict[str, Any], dense: StageEntry, mask: Mask, round_index: int,
        start_weights: dict[str, torch.Tensor] | None = None,
    ) -> StageEntry:
        prune = self.cfg.prune
        rewind = start_weights if start_weights is not None else dense.weights[f"rewind_{prune.rewind_step}"]
        factors = self._rescale(rewind, mask)
        self._load(masked_state(rewind, mask, factors))
        device_mask = {name: m.to(self.device) for name, m in mask.items()}
        result = train(
            self.model, self.data, self.cfg.train, self.cfg.seed, prune.rewind_step, self.total_steps, mask=device_mask
        )
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

    def dense_stage(self) -> tuple[StageEntry, bool]:
        inputs = self.dense_inputs()
        key = content_key(inputs)
        weights = ["end", *(f"rewind_{k}" for k in self.cfg.prune.rewind_steps)]
        check = _needs(weights, [], _DENSE_METRICS)
        return self.store.get_or_compute(key, lambda: self._compute_dense(key, inputs), check)

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
    def run(self, on_round: RoundCallback | None = None, on_dense: DenseCallback | None = None) -> LineageResult:
        """Run (or fetch) the dense stage and every round, calling back after each stage.

        `self.entries[-1]` is the stage just finished when a callback runs (its mask and
        weights are there for whoever logs them).
        """
        dense, reused = self.dense_stage()
        self.entries = [dense]
        dm = dense.metrics
        result = LineageResult(
            dense=DenseResult.from_stage(dm, dense.key, reused),
            rounds=[],
            steps_executed=0 if reused else dm["steps"],
            steps_reused=dm["steps"] if reused else 0,
            tolerance=self.cfg.search.tolerance,
        )
        if on_dense is not None:
            on_dense(result)
        parent = dense
        for round_index in range(1, self.cfg.prune.rounds + 1):
            parent, reused = self.round_stage(dense, parent, round_index)
            self.entries.append(parent)
            round_result = RoundResult.from_stage({**parent.metrics, "round": round_index}, parent.key, reused)
            result.rounds.append(round_result)
            if reused:
                result.steps_reused += round_result.steps
            else:
                result.steps_executed += round_result.steps
            if on_round is not None:
                on_round(round_result, result)
        return result


def run_lineage(
    cfg: ExperimentConfig,
    store: StageSource | None = None,
    dataset: Dataset | None = None,
    on_round: RoundCallback | None = None,
) -> LineageResult:
    """Run one IMP lineage for `cfg` in this process (stages through `store` when given)."""
    return Lineage(cfg, store, dataset).run(on_round)
