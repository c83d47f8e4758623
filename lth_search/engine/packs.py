"""Packs: several lineages of one architecture trained in lockstep as one batched network.

Small networks, the common case in lottery-ticket studies, are bound by per-step
overhead (Python, the autograd graph, kernel launches), not arithmetic: the quickstart
MLP runs ~1500 steps/s on one core whatever its width. A pack stacks the weights of R
members on a leading axis and takes one batched step for all of them, so that overhead
is paid once per step instead of R times.

Each member keeps everything that makes it a lineage of its own: its start weights,
seed (hence batch order, engine/data.py `BatchOrder`, and augmentation), data split,
start and end step (hence its position in the lr `Schedule`), mask, snapshot steps and
optimizer state. The pack is mathematically the same as `train(...)` per member:

- the loss is the sum of the members' mean losses, so each member's gradient is the
  gradient of its own loss alone (members share no parameter);
- SGD (momentum, Nesterov, weight decay), Adam and AdamW are elementwise, so one
  optimizer over the stacks is R optimizers side by side; `StackedOptimizer` repeats
  torch's single-tensor formulas op for op, with a per-member lr when the members'
  schedule positions differ;
- masks are stacked too and re-applied after every step: pruned weights stay exactly 0.

Members start together; one that has fewer steps to go (a later rewind step) leaves the
pack when it is done: members are ordered longest first, so the active ones are always
a prefix of the stacks and a step touches only `[:k]`.

How a model is batched (`choose_mode`, measured by bench/packs.py, one CPU thread):

- "bmm": the MLP (and LeNet-300-100) as `torch.baddbmm` over stacked weights. Quickstart
  MLP, one CPU thread: 1.2x / 1.9x / 2.6x / 2.9x the lineage-steps/s of the sequential
  trainer at R = 2 / 4 / 8 / 16.
- "vmap": any other model via `torch.func.functional_call` + `vmap` (convolutions become
  grouped convolutions; batch-norm buffers are stacked and updated per member). On a GPU
  a small conv step is mostly launch overhead, which batching removes.
- "sequential": the members one after another with `train(...)`. Chosen for conv nets
  on the CPU: there a conv step is compute-bound, and the vmap pack of conv2 ran at
  0.9-1.1x the sequential trainer for R = 2..16, so batching does not pay there.

One key, one result. A stage's bytes must not depend on who trained it: alone or in a
pack, in which position, with which pack-mates. So a lone stage is trained by the same
arithmetic as a pack member: `train_pack` runs a pack of one through `_Pack` whenever the
model's mode batches (bmm, vmap), and through `train` only in "sequential" mode, where a
pack is itself members trained one by one. Per member, `_Pack` computes the same values
whatever the pack: each batched kernel works slice by slice (tests/engine/test_packs.py
checks the bytes at pack sizes 1, 4, 8 and every position, float32 on the CPU), and the
learning rate is a per-member tensor whenever the schedule is not constant, lone or not
(a scalar step size rounds differently from a tensor one). Against `train` itself a pack
differs by rounding only (float64 packs give the same masks as `train`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lth_search.config import TrainConfig
from lth_search.engine.augment import augment
from lth_search.engine.data import BatchOrder, Dataset
from lth_search.portable.architectures import MLP
from lth_search.engine.train import LOSS_WINDOW, Schedule, TrainResult, train

Mode = Literal["auto", "bmm", "vmap", "sequential"]
MODES = ("auto", "bmm", "vmap", "sequential")


@dataclass
class PackMember:
    """One lineage's share of a pack: what `train(...)` would be called with for it."""

    state: dict[str, torch.Tensor]
    """Full state dict it starts from (already masked and rescaled)."""
    data: Dataset
    seed: int
    start_step: int = 0
    end_step: int | None = None
    mask: dict[str, torch.Tensor] | None = None
    snapshot_steps: Iterable[int] = ()
    fixed_lr: float | None = None
    """One constant rate in place of the schedule (fine-tuning at the final rate); only for a
    schedule that is not constant (under a constant one it *is* the schedule)."""


def choose_mode(model: nn.Module, device: torch.device | str) -> str:
    """The fastest way to batch `model` on `device` (see the module docstring for the numbers)."""
    if isinstance(model, MLP):
        return "bmm"
    if getattr(model, "pack_sequential", False):  # a model vmap cannot stack (engine/hf_models.py)
        return "sequential"
    return "vmap" if torch.device(device).type == "cuda" else "sequential"


def train_pack(
    model: nn.Module, members: list[PackMember], recipe: TrainConfig, mode: Mode = "auto"
) -> list[TrainResult]:
    """Train every member as `train(model, ...)` would, in lockstep; one result per member.

    `model` is a template (architecture, dtype and device); it is left in an unspecified
    state. All members share the recipe and the model; they may differ in everything else.
    A member's `seconds` is its share (by steps) of the pack's wall time, so its
    `steps_per_s` is the pack's lineage-steps/s.
    """
    if not members:
        return []
    if mode not in MODES:
        raise ValueError(f"pack mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = next(model.parameters()).device
    mode = choose_mode(model, device) if mode == "auto" else mode
    if mode == "bmm" and not isinstance(model, MLP):
        raise ValueError(f"pack mode 'bmm' batches only the MLP, not {type(model).__name__}")
    if mode == "sequential":  # a lone member of a batching mode still goes through _Pack: one arithmetic
        return [_train_alone(model, member, recipe) for member in members]
    return _Pack(model, members, recipe, mode).run()


def _train_alone(model: nn.Module, member: PackMember, recipe: TrainConfig) -> TrainResult:
    model.load_state_dict(member.state)
    return train(model, member.data, recipe, member.seed, member.start_step, member.end_step, member.mask,
                 member.snapshot_steps, member.fixed_lr)


# The optimizer over the stacks -------------------------------------------------------------
Lr = float | torch.Tensor
"""A learning rate shared by the active members, or one per member (a 1-D tensor of k)."""


def _per_member(value: Lr, stack: torch.Tensor) -> Lr:
    """A per-member value shaped (k, 1, ..., 1) to broadcast over `stack`; a number as is."""
    return value.reshape(-1, *([1] * (stack.dim() - 1))) if isinstance(value, torch.Tensor) else value


def _add_scaled_(param: torch.Tensor, update: torch.Tensor, lr: Lr) -> None:
    """param -= lr * update (torch's own op when the lr is one number)."""
    if isinstance(lr, torch.Tensor):
        param.addcmul_(update, _per_member(lr, param), value=-1)
    else:
        param.add_(update, alpha=-lr)


class StackedOptimizer:
    """SGD / Adam / AdamW over stacked parameters, each member's slice on its own.

    The formulas are torch's single-tensor implementations (torch/optim/sgd.py, adam.py,
    the path torch takes on the CPU), applied to `[:k]` slices of the stacks. Every
    active member has taken the same number of steps (members start together), so Adam's
    bias correction is one number; only the lr can differ between members.
    """

    def __init__(self, recipe: TrainConfig, stacks: list[torch.Tensor]) -> None:
        self.recipe = recipe
        self.steps = 0
        adam = recipe.optimizer in ("adam", "adamw")
        self.exp_avg = [torch.zeros_like(s) for s in stacks] if adam else []
        self.exp_avg_sq = [torch.zeros_like(s) for s in stacks] if adam else []
        # Zeros are torch's first momentum step exactly: 0 * m + 1 * grad == grad.
        self.momentum = [torch.zeros_like(s) for s in stacks] if not adam and recipe.momentum > 0 else []

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: Lr, k: int) -> None:
        self.steps += 1
        if self.recipe.optimizer == "sgd":
            self._sgd(params, grads, lr, k)
        else:
            self._adam(params, grads, lr, k, decoupled=self.recipe.optimizer == "adamw")

    def _sgd(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: Lr, k: int) -> None:
        recipe = self.recipe
        for index, (param, grad) in enumerate(zip(params, grads)):
            if recipe.weight_decay:
                grad = grad.add(param, alpha=recipe.weight_decay)
            if self.momentum:
                buf = self.momentum[index][:k]
                buf.mul_(recipe.momentum).add_(grad)
                grad = grad.add(buf, alpha=recipe.momentum) if recipe.nesterov else buf
            _add_scaled_(param, grad, lr)

    def _adam(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: Lr, k: int, decoupled: bool) -> None:
        beta1, beta2, eps, decay = 0.9, 0.999, 1e-8, self.recipe.weight_decay  # torch's defaults
        correction1 = 1 - beta1**self.steps
        correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        step_size = lr / correction1
        for index, (param, grad) in enumerate(zip(params, grads)):
            if decay and decoupled:
                param.mul_(1 - _per_member(lr, param) * decay)
            elif decay:
                grad = grad.add(param, alpha=decay)
            exp_avg, exp_avg_sq = self.exp_avg[index][:k], self.exp_avg_sq[index][:k]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
            if isinstance(step_size, torch.Tensor):
                param.addcmul_(exp_avg / denom, _per_member(step_size, param), value=-1)
            else:
                param.addcdiv_(exp_avg, denom, value=-step_size)


# Batched forward passes ------------------------------------------------------------------
Forward = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
"""(params [k, ...], buffers [k, ...], inputs [k, B, ...]) -> logits [k, B, classes]."""


def _mlp_forward(model: MLP) -> Forward:
    names = [f"hidden.{i}" for i in range(len(model.hidden))] + ["output"]

    def forward(params: dict[str, torch.Tensor], _buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)
        for index, name in enumerate(names):
            h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
            if index < len(names) - 1:
                h = torch.relu(h)
        return h

    return forward


def _vmap_forward(model: nn.Module) -> Forward:
    def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, (params, buffers), (x,))

    batched = torch.func.vmap(one)
    return lambda params, buffers, x: batched(params, buffers, x)


# The pack ---------------------------------------------------------------------------------
class _Pack:
    """Stacks, batch orders and bookkeeping of one `train_pack` call (members longest first)."""

    def __init__(self, model: nn.Module, members: list[PackMember], recipe: TrainConfig, mode: str) -> None:
        self.recipe = recipe
        self.model = model
        per_epoch = {m.data.steps_per_epoch(recipe.batch_size) for m in members}
        if len(per_epoch) > 1:
            raise ValueError("pack members must have train splits of the same length (the recipe's epochs differ)")
        schedule = Schedule.from_recipe(recipe, per_epoch.pop())
        if schedule.constant and any(m.fixed_lr is not None for m in members):
            raise ValueError("fixed_lr replaces a schedule that is not constant (under a constant one it is the schedule)")
        ends = [schedule.total_steps if m.end_step is None else m.end_step for m in members]
        lengths = [max(end - m.start_step, 0) for m, end in zip(members, ends)]
        self.order = sorted(range(len(members)), key=lambda i: -lengths[i])  # stable: ties keep input order
        self.members = [members[i] for i in self.order]
        self.ends = [ends[i] for i in self.order]
        self.lengths = [lengths[i] for i in self.order]
        self.device = next(model.parameters()).device
        self.schedule = schedule
        self.param_names = [name for name, _ in model.named_parameters()]
        self.buffer_names = [name for name, _ in model.named_buffers()] if mode == "vmap" else []
        self.state_names = list(model.state_dict())
        self.forward = _mlp_forward(model) if mode == "bmm" else _vmap_forward(model)
        model.train()
        template = model.state_dict()
        stack = lambda name: torch.stack([m.state[name] for m in self.members]).to(  # noqa: E731
            device=self.device, dtype=template[name].dtype
        )
        self.params = {name: stack(name).requires_grad_() for name in self.param_names}
        self.buffers = {name: stack(name) for name in self.buffer_names}
        self.masks = self._stack_masks()
        self.orders = [BatchOrder(len(m.data.train), recipe.batch_size, m.seed, self.device) for m in self.members]
        if len({o.batch_size for o in self.orders}) > 1:
            raise ValueError("pack members must have the same batch size (a train split smaller than a batch differs)")
        self._stack_data()

    def _stack_masks(self) -> dict[str, torch.Tensor]:
        """name -> (R, ...) 0/1 factors of the param's dtype, for every name any member masks."""
        names = sorted({name for m in self.members for name in (m.mask or {})})
        masks = {}
        for name in names:
            param = self.params[name]
            masks[name] = torch.stack([
                (m.mask[name] if m.mask and name in m.mask else torch.ones(param.shape[1:], dtype=torch.bool))
                .to(device=param.device, dtype=param.dtype)
                for m in self.members
            ])
        return masks

    def _stack_data(self) -> None:
        """One tensor of every distinct train split, and each member's offset into it, so a
        step's batches are one `index_select` (members of one seed share one split)."""
        splits: dict[tuple[int, int], int] = {}  # by storage: `Dataset.to` copies the containers, not the tensors
        xs, ys, offsets, total = [], [], [], 0
        for member in self.members:
            train_split = member.data.train
            where = (train_split.x.data_ptr(), train_split.y.data_ptr())
            if where not in splits:
                splits[where] = total
                xs.append(train_split.x)
                ys.append(train_split.y)
                total += len(train_split)
            offsets.append(splits[where])
        self.x = xs[0] if len(xs) == 1 else torch.cat(xs)
        self.y = ys[0] if len(ys) == 1 else torch.cat(ys)
        self.batch = self.orders[0].batch_size
        self.offsets = torch.tensor(offsets, device=self.device).repeat_interleave(self.batch) if len(xs) > 1 else None

    def _lr(self, t: int, k: int) -> Lr:
        """The step's learning rate: one number under a constant schedule, else a tensor of one
        rate per member, even when they are equal or there is one member, so that a member's
        arithmetic never depends on its pack-mates."""
        if self.schedule.constant:
            return self.recipe.lr
        rates = [m.fixed_lr if m.fixed_lr is not None else self.schedule.lr_at(m.start_step + t)
                 for m in self.members[:k]]
        return torch.tensor(rates, dtype=self.params[self.param_names[0]].dtype, device=self.device)

    def _inputs(self, t: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = torch.cat([self.orders[j].batch(self.members[j].start_step + t) for j in range(k)])
        index = batches if self.offsets is None else batches + self.offsets[: k * self.batch]
        x = self.x.index_select(0, index).view(k, self.batch, *self.x.shape[1:])
        if self.recipe.augment != "none":
            x = torch.stack([augment(x[j], self.recipe.augment, self.members[j].seed, self.members[j].start_step + t)
                             for j in range(k)])
        return x, self.y.index_select(0, index).view(k, self.batch)

    def _member_state(self, j: int) -> dict[str, torch.Tensor]:
        stacks = {**self.params, **self.buffers}
        template = self.model.state_dict()
        return {name: (stacks[name][j] if name in stacks else template[name]).detach().to("cpu", copy=True)
                for name in self.state_names}

    @torch.no_grad()
    def _apply_masks(self, k: int) -> None:
        for name, mask in self.masks.items():
            self.params[name][:k].mul_(mask[:k])

    def run(self) -> list[TrainResult]:
        count = len(self.members)
        wanted = [{s for s in m.snapshot_steps if m.start_step <= s <= end} for m, end in zip(self.members, self.ends)]
        snapshots: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(count)]
        window_starts = [max(n - LOSS_WINDOW, 0) for n in self.lengths]  # each member's last LOSS_WINDOW steps
        window, window_from = torch.tensor(window_starts, device=self.device), min(window_starts, default=0)
        loss_sums = torch.zeros(count, device=self.device)  # train()'s accumulator: default dtype
        names = self.param_names
        optimizer = StackedOptimizer(self.recipe, [self.params[n].detach() for n in names])
        self._apply_masks(count)
        total = max(self.lengths, default=0)
        began = time.perf_counter()
        k = count
        for t in range(total):
            while k and self.lengths[k - 1] <= t:
                k -= 1
            for j in range(k):
                if self.members[j].start_step + t in wanted[j]:
                    snapshots[j][self.members[j].start_step + t] = self._member_state(j)
            leaves = self.params if k == count else {n: self.params[n][:k].detach().requires_grad_() for n in names}
            buffers = {n: b[:k] for n, b in self.buffers.items()}
            x, y = self._inputs(t, k)
            logits = self.forward(leaves, buffers, x)
            losses = F.cross_entropy(logits.reshape(k * self.batch, -1), y.reshape(-1), reduction="none")
            losses = losses.view(k, self.batch).mean(1)
            grads = torch.autograd.grad(losses.sum(), [leaves[n] for n in names])
            lr = self._lr(t, k)
            with torch.no_grad():
                optimizer.step([self.params[n][:k] for n in names], list(grads), lr, k)
                self._apply_masks(k)
                if t >= window_from:
                    loss_sums[:k] += losses.detach() * (window[:k] <= t)
        for j in range(count):
            end = self.ends[j]
            if end in wanted[j]:
                snapshots[j][end] = self._member_state(j)
        seconds = time.perf_counter() - began
        sums = loss_sums.tolist()
        all_steps = max(sum(self.lengths), 1)
        results = [
            TrainResult(self._member_state(j), snapshots[j], sums[j] / max(min(n, LOSS_WINDOW), 1), n,
                        seconds * n / all_steps)
            for j, n in enumerate(self.lengths)
        ]
        back = [None] * count
        for position, original in enumerate(self.order):
            back[original] = results[position]
        return back  # type: ignore[return-value]
