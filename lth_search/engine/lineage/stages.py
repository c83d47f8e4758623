"""How a stage is fetched or trained: one way for every stage of every kind.

A stage is asked of the store first (`get_or_compute`), so any stage any lineage computed
is reused; the stages that are missing are trained together as one pack
(engine/packs.py), each under its own key (engine/lineage/keys.py). A lone stage is a
pack of one: it takes the same code path and the same arithmetic, so its bytes do not
depend on who trained it.

`Stages` holds what every stage of one config shares (device, data split, model,
prunable groups, resolved recipe, store) and builds the two kinds of job there are: a
dense stage (`dense_job`) and a masked stage (`masked_job`: a mask trained from start
weights over steps k..T). Every round of every kind, every control and every probe is a
masked job; `fetch_or_train` runs a list of jobs.

Single flight: `fetch_or_train` takes the lease of every stage it is about to train
*before* training, by nesting one `get_or_compute` per distinct key, and trains the pack
inside the innermost one. A second worker that needs one of those stages waits instead
of training it again, and a crash releases every lease on the way out. Keys are taken in
sorted order, so two workers whose packs overlap cannot each hold a lease the other waits for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lth_search.config import ExperimentConfig, TrainConfig
from lth_search.engine.data import Dataset, load_dataset, resolve_device
from lth_search.engine.lineage import keys
from lth_search.engine.lineage.objective import pack_correct
from lth_search.engine.models import build_model
from lth_search.engine.packs import Mode, PackMember, choose_mode, train_pack
from lth_search.engine.pruning import (
    Mask,
    calibrated_factors,
    check_layer_groups,
    layer_sparsity,
    masked_state,
    ones_mask,
    rescale_factors,
    sparsity,
)
from lth_search.engine.structured_pruning import channel_chain, structured_round
from lth_search.engine.text_data import IGNORE
from lth_search.engine.train import TrainResult, example_scores, resolved_recipe
from lth_search.errors import ConfigError
from lth_search.store.entry import Check, StageEntry

PROBE_SIZE = 1024
"""Training inputs the `calibrated` rescale measures activation variance on."""
DENSE_METRICS = ("val_accuracy", "test_accuracy", "val_loss", "test_loss", "train_loss", "train_steps_per_s", "steps")
VAL_VALUES = "val"
"""The weight set holding per-example val values: `loss` (float32, one per example; see `_evaluate`)."""
ROUND_METRICS = (*DENSE_METRICS, "sparsity", "layer_sparsity")


# The store, as the engine sees it ---------------------------------------------------------
class StageSource(Protocol):
    """What the engine needs of a stage store (store/stage_store.py `StageStore`, or `MemoryStages`):
    the engine never imports a backend, so it runs and is tested without a filesystem."""

    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Check | None = None
    ) -> tuple[StageEntry, bool]: ...


class MemoryStages:
    """The store used when none is given: stages are kept for this process only."""

    def __init__(self) -> None:
        self._entries: dict[str, StageEntry] = {}

    def get_or_compute(
        self, key: str, compute: Callable[[], StageEntry], check: Check | None = None
    ) -> tuple[StageEntry, bool]:
        if key in self._entries:
            return self._entries[key], True
        self._entries[key] = compute()
        return self._entries[key], False


def needs(weights: list[str], masks: list[str], metrics: tuple[str, ...]) -> Check:
    """A store check for a stage of which the caller reads these weights, masks and metrics."""

    def check(entry: StageEntry) -> str | None:
        missing = [f"weights {w}" for w in weights if w not in entry.weights]
        missing += [f"mask {m}" for m in masks if m not in entry.masks]
        missing += [f"metric {m}" for m in metrics if m not in entry.metrics]
        return f"lacks {', '.join(missing)}" if missing else None

    return check


# Jobs and the one way to run them ----------------------------------------------------------
@dataclass
class StageJob:
    """One stage to fetch or train: its key, the store, and how to train and finish it.

    `member` is called only when the stage has to be trained (it may build a mask from the
    parent's weights); `finish` turns the training result into the stage (evaluation)."""

    key: str
    store: StageSource
    member: Callable[[], PackMember]
    finish: Callable[[TrainResult], StageEntry]
    check: Check | None = None


def fetch_or_train(
    jobs: list[StageJob], template: nn.Module, recipe: TrainConfig, mode: Mode, size: int,
) -> list[tuple[StageEntry, bool]]:
    """(stage, reused) for every job, in order: stored stages fetched, the missing ones trained
    as packs of at most `size`; jobs with the same key share one stage (the second is `reused`)."""
    done: list[tuple[StageEntry, bool]] = []
    for start in range(0, len(jobs), max(size, 1)):
        done += _pack_step(jobs[start:start + max(size, 1)], template, recipe, mode)
    return done


def _pack_step(jobs: list[StageJob], template: nn.Module, recipe: TrainConfig, mode: Mode,
               ) -> list[tuple[StageEntry, bool]]:
    unique: dict[str, StageJob] = {}
    for job in jobs:
        unique.setdefault(job.key, job)
    order = sorted(unique)
    got: dict[str, tuple[StageEntry, bool]] = {}
    trained: dict[str, StageEntry] = {}
    to_train: list[str] = []

    def train_all() -> None:
        results = train_pack(template, [unique[key].member() for key in to_train], recipe, mode)
        for key, result in zip(to_train, results):
            trained[key] = unique[key].finish(result)

    def take(index: int) -> None:
        """Hold the lease of order[index] (if its stage is missing), then of the rest; train at the bottom."""
        if index == len(order):
            if to_train:
                train_all()
            return
        key = order[index]
        descended = False

        def compute() -> StageEntry:
            nonlocal descended
            descended = True
            to_train.append(key)
            take(index + 1)
            return trained[key]

        got[key] = unique[key].store.get_or_compute(key, compute, unique[key].check)
        if not descended:
            take(index + 1)

    take(0)
    return [(got[job.key][0], got[job.key][1] or job is not unique[job.key]) for job in jobs]


# The stages of one config -----------------------------------------------------------------
class Stages:
    """The stages of one config's lineages: how each is built, fetched or trained."""

    def __init__(self, cfg: ExperimentConfig, store: StageSource | None = None, dataset: Dataset | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        data = dataset if dataset is not None else load_dataset(cfg.data, cfg.seed, self.device)
        self.data = data.to(self.device)
        self.store: StageSource = store if store is not None else MemoryStages()
        self.model = build_model(cfg.model, self.data.input_shape, self.data.num_classes, cfg.seed).to(self.device)
        self.groups = dict(self.model.prunable)
        check_layer_groups(self.groups, cfg.prune.layer_ratios)  # before the dense stage trains, not after
        self.chain = channel_chain(self.model, cfg.model.name) if cfg.prune.structure == "channel" else None
        self.recipe = resolved_recipe(cfg.train, self.data.steps_per_epoch(cfg.train.batch_size))
        self.total_steps = self.recipe["steps"]
        late = [k for k in cfg.prune.rewind_steps if k >= self.total_steps]
        if late:
            raise ConfigError(f"prune.rewind_steps: {late} must be < train.steps ({self.total_steps} iterations)")
        self.mode: Mode = choose_mode(self.model, self.device)  # type: ignore[assignment]
        self.provenance = keys.provenance(self.device, next(self.model.parameters()).dtype)

    @property
    def signature(self) -> str:
        """What stages trained in one pack must share: model, resolved recipe, device, data shapes."""
        return repr((self.cfg.model, self.recipe, str(self.device), self.data.input_shape, self.data.num_classes,
                     self.cfg.resources.pack))

    def fetch_or_train(self, jobs: list[StageJob]) -> list[tuple[StageEntry, bool]]:
        """(stage, reused) per job, trained with this config's model, recipe and pack size."""
        return fetch_or_train(jobs, self.model, self.cfg.train, self.mode, self.cfg.resources.pack)

    def train_now(self, job: StageJob) -> StageEntry:
        """Train `job`'s stage here, as a pack of one, without asking the store (a caller that
        holds the stage's lease itself: the probes)."""
        return job.finish(train_pack(self.model, [job.member()], self.cfg.train, self.mode)[0])

    def stage(self, job: StageJob) -> tuple[StageEntry, bool]:
        """One job's (stage, reused): a pack of one."""
        [done] = self.fetch_or_train([job])
        return done

    # Dense stages ------------------------------------------------------------------------
    def dense_inputs(self, seed: int | None = None) -> keys.Inputs:
        cfg = self.cfg
        return keys.dense_inputs(cfg.data.identity(), self.data.fingerprint, cfg.model.model_dump(), self.recipe,
                                 cfg.seed if seed is None else seed, cfg.prune.rewind_steps)

    def dense_job(self, seed: int | None = None) -> StageJob:
        """The dense stage trained with `seed` (default the lineage's own)."""
        inputs = self.dense_inputs(seed)
        key = keys.stage_key(inputs)
        member_seed = inputs["seed"]
        kept = self.cfg.prune.rewind_steps

        def member() -> PackMember:
            fresh = build_model(self.cfg.model, self.data.input_shape, self.data.num_classes, member_seed)
            return PackMember(fresh.state_dict(), self.data, member_seed, 0, self.total_steps, snapshot_steps=kept)

        def finish(result: TrainResult) -> StageEntry:
            metrics, val_values = self._evaluate(result)
            metrics["sparsity"] = 0.0
            weights = {f"rewind_{k}": result.snapshots[k] for k in kept}
            weights["end"], weights[VAL_VALUES] = result.state, val_values
            return StageEntry(key=key, kind="dense", inputs=inputs, metrics=metrics, weights=weights,
                              provenance=self.provenance)

        weights = ["end", VAL_VALUES, *(f"rewind_{k}" for k in kept)]
        return StageJob(key, self.store, member, finish, needs(weights, [], DENSE_METRICS))

    def dense_stage(self, seed: int | None = None) -> tuple[StageEntry, bool]:
        return self.stage(self.dense_job(seed))

    # Masked stages -------------------------------------------------------------------------
    def masked_job(
        self, inputs: keys.Inputs, dense: StageEntry, make_mask: Callable[[], Mask], round_index: int,
        start_weights: Callable[[], dict[str, torch.Tensor]] | None = None, rescale: bool = True,
        fixed_lr: float | None = None, data_seed: int | None = None, kind: str = "round",
    ) -> StageJob:
        """The one masked stage: `make_mask()` trained over steps k..T from theta_k of `dense`
        (or `start_weights()`), the survivors rescaled per prune.init_scale unless `rescale`
        is False. `fixed_lr` replaces the schedule, `data_seed` the batch order's seed. The
        mask and the start weights are built only if the stage has to be trained."""
        key = keys.stage_key(inputs)
        prepared: dict[str, Any] = {}

        def member() -> PackMember:
            prepared["mask"] = mask = make_mask()
            rewind = start_weights() if start_weights is not None else dense.weights[f"rewind_{self.cfg.prune.rewind_step}"]
            prepared["factors"] = factors = self._rescale(rewind, mask) if rescale else {name: 1.0 for name in mask}
            device_mask = {name: m.to(self.device) for name, m in mask.items()}
            seed = self.cfg.seed if data_seed is None else data_seed
            return PackMember(masked_state(rewind, mask, factors), self.data, seed, self.cfg.prune.rewind_step,
                              self.total_steps, device_mask, fixed_lr=fixed_lr)

        def finish(result: TrainResult) -> StageEntry:
            mask = prepared["mask"]
            metrics, val_values = self._evaluate(result)
            metrics.update(sparsity=sparsity(mask), round=round_index, layer_sparsity=layer_sparsity(mask),
                           rescale=prepared["factors"])
            return StageEntry(key=key, kind=kind, inputs=inputs, metrics=metrics,
                              weights={"end": result.state, VAL_VALUES: val_values},
                              masks={"mask": {name: m.to("cpu") for name, m in mask.items()}},
                              provenance=self.provenance)

        return StageJob(key, self.store, member, finish, needs(["end", VAL_VALUES], ["mask"], ROUND_METRICS))

    def next_mask(self, parent: StageEntry) -> Mask:
        """The mask of the round after `parent` (dense or a round): prune its end weights."""
        prune = self.cfg.prune
        parent_mask = parent.masks.get("mask") or ones_mask(self.model)
        return structured_round(parent.weights["end"], parent_mask, self.groups, prune.rate, prune.scope,
                                prune.structure, prune.layer_ratios, prune.output_ratio, self.chain)

    def _rescale(self, rewind: dict[str, torch.Tensor], mask: Mask) -> dict[str, float]:
        """Per-layer factors for the survivors at rewind (kept in the stage's metrics, so a
        ticket can be rebuilt exactly without data)."""
        if self.cfg.prune.init_scale == "calibrated":
            return calibrated_factors(self.model, rewind, mask, self.data.train.x[:PROBE_SIZE])
        return rescale_factors(rewind, mask, self.cfg.prune.init_scale)

    def _evaluate(self, result: TrainResult) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The metrics of a finished training (val and test accuracy and mean loss, the per-example
        val correctness bits, the training loss) and the per-example val losses (a weight set).

        Both per-example vectors are stored for every stage, whatever the lineage's metric, so
        the metric a verdict judges (metric.py) is not a stage key input."""
        self.model.load_state_dict(result.state)
        batch = self.cfg.train.eval_batch_size
        val_correct, val_losses = split_scores(self.model, self.data.val, batch)
        test_correct, test_losses = split_scores(self.model, self.data.test, batch)
        correct = val_correct.cpu().numpy()
        metrics = {
            "val_accuracy": float(correct.mean()) if correct.size else 0.0,
            "test_accuracy": float(test_correct.sum()) / max(len(self.data.test), 1),
            "val_loss": float(val_losses.double().mean()) if val_losses.numel() else 0.0,
            "test_loss": float(test_losses.double().mean()) if test_losses.numel() else 0.0,
            "val_correct": {"n": int(correct.size), "bits": pack_correct(correct)},
            "train_loss": result.train_loss,
            "train_steps_per_s": result.steps_per_s,
            "steps": result.steps,
        }
        return metrics, {"loss": val_losses.to("cpu", torch.float32).contiguous()}


def split_scores(model: nn.Module, split: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of a split: (correct, its share of the split's mean loss per target token).

    The share is a class's cross-entropy; for next-token targets, the sum of the example's
    token losses times N / the split's target tokens. So the shares' mean is the split's
    token-weighted mean loss (what language models report), and two models scored on the
    same split pair example by example (same tokens, same weights)."""
    correct, losses = example_scores(model, split, batch)
    if split.y.dim() == 1:
        return correct, losses
    tokens = (split.y != IGNORE).sum(dim=1).to(losses.dtype)
    return correct, losses * tokens * (len(split) / tokens.sum().clamp_min(1))
