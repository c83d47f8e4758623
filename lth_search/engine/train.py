"""Masked training and evaluation.

One function trains a model from `start_step` to `end_step` of a recipe. The learning
rate and the batch order are pure functions of the global step, so a lottery-ticket
round that rewinds to step k and retrains to T sees exactly the schedule and batches
the dense run saw at steps k..T. Pruned weights are multiplied by their mask after every
optimizer step, so they are exactly zero throughout, whatever the optimizer's momentum
or weight decay would do to them.

The hot loop never synchronises with the device (no `.item()` per step): losses are
summed on the device and read once at the end, which keeps the masked trainer as fast
as a plain PyTorch loop (see bench/throughput.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lth_search.config import TrainConfig, resolve_steps
from lth_search.engine.augment import augment
from lth_search.engine.data import BatchOrder, Dataset, Split
from lth_search.engine.text_data import IGNORE

LOSS_WINDOW = 100
"""Steps at the end of a stage whose mean loss is reported as `train_loss`."""


@dataclass(frozen=True)
class Schedule:
    """A recipe with every length resolved to iterations (what stage keys hash)."""

    total_steps: int
    base_lr: float
    kind: str
    milestones: tuple[int, ...]
    gamma: float
    warmup_steps: int

    @classmethod
    def from_recipe(cls, recipe: TrainConfig, steps_per_epoch: int) -> "Schedule":
        return cls(
            total_steps=resolve_steps(recipe.steps, steps_per_epoch),
            base_lr=recipe.lr,
            kind=recipe.schedule,
            milestones=tuple(sorted(resolve_steps(m, steps_per_epoch) for m in recipe.milestones)),
            gamma=recipe.gamma,
            warmup_steps=resolve_steps(recipe.warmup_steps, steps_per_epoch),
        )

    @property
    def constant(self) -> bool:
        return self.kind == "constant" and self.warmup_steps == 0

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimizer step taken at iteration `step` (0-based)."""
        lr = self.base_lr
        if self.kind == "step":
            lr *= self.gamma ** sum(step >= m for m in self.milestones)
        elif self.kind == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / max(self.total_steps, 1)))
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr


def resolved_recipe(recipe: TrainConfig, steps_per_epoch: int) -> dict:
    """The recipe as hashed into stage keys: lengths in iterations, no device."""
    schedule = Schedule.from_recipe(recipe, steps_per_epoch)
    resolved = recipe.recipe()
    resolved.update(
        steps=schedule.total_steps, milestones=list(schedule.milestones), warmup_steps=schedule.warmup_steps
    )
    return resolved


@dataclass
class TrainResult:
    """What a training stage produced. `snapshots` maps a step to a CPU state dict."""

    state: dict[str, torch.Tensor]
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    train_loss: float = float("nan")
    steps: int = 0
    seconds: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: nn.Module, recipe: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over all parameters (masked ones are re-zeroed each step)."""
    params = list(model.parameters())
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov and recipe.momentum > 0,
            weight_decay=recipe.weight_decay,
        )
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


class _MaskKeeper:
    """Re-applies a mask to the model's prunable parameters in one fused call."""

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor] | None):
        params = dict(model.named_parameters())
        names = sorted(mask) if mask else []
        self.params = [params[name] for name in names]
        self.factors = [mask[name].to(device=params[name].device, dtype=params[name].dtype) for name in names]

    @torch.no_grad()
    def apply(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.factors)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (for snapshots and the store)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def train(
    model: nn.Module,
    data: Dataset,
    recipe: TrainConfig,
    seed: int,
    start_step: int = 0,
    end_step: int | None = None,
    mask: dict[str, torch.Tensor] | None = None,
    snapshot_steps: Iterable[int] = (),
    fixed_lr: float | None = None,
) -> TrainResult:
    """Train `model` in place from iteration `start_step` to `end_step` of the recipe.

    The model must already be on the data's device and at the weights it starts from.
    `snapshot_steps` are iterations at which a CPU copy of the state is kept (the state
    *before* that iteration's update, so step 0 is the initialisation). `fixed_lr`
    replaces the schedule by one constant rate (fine-tuning at the final rate).
    """
    steps_per_epoch = data.steps_per_epoch(recipe.batch_size)
    schedule = Schedule.from_recipe(recipe, steps_per_epoch)
    end_step = schedule.total_steps if end_step is None else end_step
    wanted = {s for s in snapshot_steps if start_step <= s <= end_step}
    keeper = _MaskKeeper(model, mask)
    keeper.apply()
    optimizer = make_optimizer(model, recipe)
    if fixed_lr is not None:
        schedule = Schedule(schedule.total_steps, fixed_lr, "constant", (), 1.0, 0)
        for group in optimizer.param_groups:
            group["lr"] = fixed_lr
    order = BatchOrder(len(data.train), recipe.batch_size, seed, data.train.x.device)
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=data.train.x.device)
    window_start = max(start_step, end_step - LOSS_WINDOW)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model.train()
    began = time.perf_counter()
    for step in range(start_step, end_step):
        if step in wanted:
            snapshots[step] = cpu_state(model)
        if not schedule.constant:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
        batch = order.batch(step)
        inputs = augment(data.train.x.index_select(0, batch), recipe.augment, seed, step)
        loss = loss_fn(model(inputs), data.train.y.index_select(0, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        keeper.apply()
        if step >= window_start:
            loss_sum += loss.detach()
    if end_step in wanted:
        snapshots[end_step] = cpu_state(model)
    train_loss = float(loss_sum) / max(end_step - window_start, 1)
    seconds = time.perf_counter() - began
    return TrainResult(cpu_state(model), snapshots, train_loss, end_step - start_step, seconds)


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 2000) -> torch.Tensor:
    """Top-1 class per example of a split (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    parts = [model(split.x[begin : begin + batch_size]).argmax(dim=1) for begin in range(0, len(split), batch_size)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=split.x.device)


def correct(model: nn.Module, split: Split, batch_size: int = 2000) -> torch.Tensor:
    """Per example, whether `model` got it right: its class is the label, or (next-token
    targets, y of shape (N, T)) every target token is the top-1 prediction given the true
    prefix (teacher forcing); positions without a target (IGNORE, -100) do not count."""
    predicted = predict(model, split, batch_size)
    if split.y.dim() == 1:
        return predicted == split.y
    return ((predicted == split.y) | (split.y == IGNORE)).all(dim=1)


@torch.no_grad()
def example_losses(model: nn.Module, split: Split, batch_size: int = 2000) -> torch.Tensor:
    """Per example, the mean cross-entropy of its targets (a class, or every next token that
    has one): the per-example values of a loss or perplexity verdict (lower is better;
    perplexity = exp of the token-weighted mean). Eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    parts = []
    for begin in range(0, len(split), batch_size):
        logits, targets = model(split.x[begin : begin + batch_size]), split.y[begin : begin + batch_size]
        losses = nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
        if losses.dim() == 2:  # (N, T) next-token losses: the mean over the positions with a target
            counted = (targets != IGNORE).sum(dim=1).clamp_min(1)
            losses = losses.sum(dim=1) / counted
        parts.append(losses)
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, device=split.x.device)


@torch.no_grad()
def example_scores(model: nn.Module, split: Split, batch_size: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, losses) per example from one forward pass over the split: what `correct` and
    `example_losses` return, for a stage's evaluation (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    rights, losses = [], []
    for begin in range(0, len(split), batch_size):
        logits, targets = model(split.x[begin : begin + batch_size]), split.y[begin : begin + batch_size]
        loss = nn.functional.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)
        right = logits.argmax(dim=1) == targets
        if targets.dim() == 2:
            right = (right | (targets == IGNORE)).all(dim=1)
            loss = loss.sum(dim=1) / (targets != IGNORE).sum(dim=1).clamp_min(1)
        rights.append(right)
        losses.append(loss)
    model.train(was_training)
    if not rights:
        empty = torch.empty(0, device=split.x.device)
        return empty.bool(), empty
    return torch.cat(rights), torch.cat(losses)


def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Top-1 accuracy of `model` on a split (per example, see `correct`)."""
    return float(correct(model, split, batch_size).sum()) / max(len(split), 1)
