"""The stages of an IMP lineage: what each is keyed by and how it is computed.

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
- control: a round's random-prune or random-reinit control (same per-layer counts).

Every stage's metrics keep which val examples it classified right (`val_correct`,
packed bits), so a round is judged paired against the dense replicates (objective.py).
Each stage is asked of the store first (`get_or_compute`), so any stage any lineage
computed is reused; `dense_job`/`round_job` give the same stages as pack members
(engine/pack_step.py), under the same keys. The walk over them is engine/lineage.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lth_search.config import ExperimentConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.models import build_model
from lth_search.engine.objective import pack_correct
from lth_search.engine.pack_step import PackJob, run_pack_step
from lth_search.engine.packs import PackMember
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
from lth_search.engine.stage_source import DENSE_METRICS, ROUND_METRICS, MemoryStages, StageSource, needs
from lth_search.engine.train import TrainResult, correct as correct_examples, evaluate, resolved_recipe, train
from lth_search.errors import ConfigError
from lth_search.store.keys import content_key
from lth_search.store.entry import StageEntry

PROBE_SIZE = 1024
"""Training inputs the `calibrated` rescale measures activation variance on."""
STAGE_FORMAT = 2
"""Bumped when the meaning of a stage's inputs or outputs changes: old keys stop matching.
2: stages keep per-example val correctness (`val_correct`) for the paired verdict."""


class LineageStages:
    """The stages of one config's lineages: their keys, and how each is computed.

    Holds what every stage of the config shares (device, data split, model, prunable
    groups, resolved recipe, store); `Lineage` adds the walk on top."""

    def __init__(self, cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        data = dataset if dataset is not None else load_dataset(cfg.data, cfg.seed, self.device)
        self.data = data.to(self.device)
        self.store: StageSource = store if store is not None else MemoryStages()
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, cfg.seed).to(self.device)
        self.groups = dict(self.model.prunable)
        check_layer_groups(self.groups, cfg.prune.layer_ratios)  # before the dense stage trains, not after
        self.recipe = resolved_recipe(cfg.train, self.data.steps_per_epoch(cfg.train.batch_size))
        self.total_steps = self.recipe["steps"]
        late = [k for k in cfg.prune.rewind_steps if k >= self.total_steps]
        if late:
            raise ConfigError(f"prune.rewind_steps: {late} must be < train.steps ({self.total_steps} iterations)")

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
        correct = correct_examples(self.model, self.data.val, batch).cpu().numpy()
        return {
            "val_accuracy": float(correct.mean()) if correct.size else 0.0,
            "test_accuracy": evaluate(self.model, self.data.test, batch),
            "val_correct": {"n": int(correct.size), "bits": pack_correct(correct)},
        }

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
        start, factors = self.round_start(dense, mask, start_weights, rescale)
        self._load(start)
        device_mask = {name: m.to(self.device) for name, m in mask.items()}
        seed = self.cfg.seed if data_seed is None else data_seed
        result = train(
            self.model, self.data, self.cfg.train, seed, self.cfg.prune.rewind_step, self.total_steps,
            mask=device_mask, fixed_lr=fixed_lr,
        )
        return self.round_entry(key, inputs, mask, factors, result, round_index)

    def dense_stage(self, seed: int | None = None) -> tuple[StageEntry, bool]:
        """(stage, reused) of `dense_job`: fetched from the store, or trained alone."""
        [stage] = run_pack_step([self.dense_job(seed)], self.model, self.cfg.train)
        return stage

    def dense_job(self, seed: int | None = None) -> PackJob:
        """The dense stage trained with `seed` (default the lineage's own), as a pack member."""
        inputs = self.dense_inputs(seed)
        key = content_key(inputs)
        member_seed = inputs["seed"]
        kept = self.cfg.prune.rewind_steps

        def member() -> PackMember:
            fresh = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, member_seed)
            return PackMember(fresh.state_dict(), self.data, member_seed, 0, self.total_steps, snapshot_steps=kept)

        weights = ["end", *(f"rewind_{k}" for k in kept)]
        return PackJob(key, self.store, member, lambda result: self.dense_entry(key, inputs, result),
                       needs(weights, [], DENSE_METRICS))

    def masked_job(
        self, key: str, inputs: dict[str, Any], dense: StageEntry, make_mask: Callable[[], Mask], round_index: int,
        start_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> PackJob:
        """A masked stage as a pack member: `make_mask()` trained from theta_k of `dense` (or
        `start_weights()`), rescaled per prune.init_scale, over steps k..T. The mask and the
        start weights are built only if the stage has to be trained."""
        prepared: dict[str, Any] = {}

        def member() -> PackMember:
            prepared["mask"] = mask = make_mask()
            start = start_weights() if start_weights is not None else None
            state, prepared["factors"] = self.round_start(dense, mask, start)
            device_mask = {name: m.to(self.device) for name, m in mask.items()}
            return PackMember(state, self.data, self.cfg.seed, self.cfg.prune.rewind_step, self.total_steps,
                              device_mask)

        def finish(result: TrainResult) -> StageEntry:
            return self.round_entry(key, inputs, prepared["mask"], prepared["factors"], result, round_index)

        return PackJob(key, self.store, member, finish, needs(["end"], ["mask"], ROUND_METRICS))

    def round_job(self, dense: StageEntry, parent: StageEntry, round_index: int) -> PackJob:
        """Round `round_index` after `parent`, as a pack member."""
        inputs = self.round_inputs(parent.key, round_index)
        return self.masked_job(content_key(inputs), inputs, dense, lambda: self.next_mask(parent), round_index)

    def round_stage(self, dense: StageEntry, parent: StageEntry, round_index: int) -> tuple[StageEntry, bool]:
        """(stage, reused) of `round_job`: fetched from the store, or trained alone."""
        [stage] = run_pack_step([self.round_job(dense, parent, round_index)], self.model, self.cfg.train)
        return stage

    def control_job(self, dense: StageEntry, ticket: StageEntry, kind: str, control_seed: int) -> PackJob:
        """A control of an IMP round with the same per-layer counts and the same recipe.

        `random_prune`: random positions, the same rewind weights; `random_reinit`: the IMP
        mask on a fresh initialisation (seeded by `control_seed`). Stored like any stage.
        """
        if kind not in ("random_prune", "random_reinit"):
            raise ValueError(f"control must be random_prune or random_reinit, got {kind!r}")
        inputs = {"stage": "control", "format": STAGE_FORMAT, "parent": ticket.key, "kind": kind, "seed": control_seed}
        key = content_key(inputs)
        round_index = int(ticket.metrics.get("round", 0))
        if kind == "random_prune":
            return self.masked_job(key, inputs, dense, lambda: random_mask_like(ticket.masks["mask"], control_seed),
                                   round_index)
        fresh = lambda: build_model(  # noqa: E731
            self.cfg.model, self.data.input_shape, self.data.num_classes, control_seed).state_dict()
        return self.masked_job(key, inputs, dense, lambda: ticket.masks["mask"], round_index, fresh)

    def control_stage(self, dense: StageEntry, ticket: StageEntry, kind: str, control_seed: int) -> tuple[StageEntry, bool]:
        """(stage, reused) of `control_job`: fetched from the store, or trained alone."""
        [stage] = run_pack_step([self.control_job(dense, ticket, kind, control_seed)], self.model, self.cfg.train)
        return stage
