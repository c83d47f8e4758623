"""Why a ticket wins: the standard lottery-ticket diagnostics, pure torch.

Each function answers one question a researcher asks of a round, from weights and
masks alone (plus a probe batch or a split where the question is about the loss):

- `sign_preservation`: did the kept weights end with the sign they started with? IMP
  tickets keep most signs (Zhou et al., 2019), which is one reason random
  re-initialisation fails; the dense network's share is the reference beside it.
- `trajectory_alignment` A(m; k) = ||m * g||^2 / ||g||^2 with g the gradient of the
  loss at the rewind point theta_k on a fixed probe batch: the share of the gradient
  energy at the rewind point the mask lets through.
- `error_barrier` over `interpolation_errors`: linear-mode-connectivity instability
  (Frankle et al., 2020). Two copies trained from theta_k with different data orders are
  stable when the error along the straight line between their end weights does not rise
  above the mean of the two end errors; the rewind step at which the barrier vanishes is
  the one at which IMP starts to find matching tickets.
- `perturbed_start`: theta_k plus Gaussian noise on the kept weights, for the opt-in
  sensitivity probe (how much the exact rewind values matter).
- `layer_health`: per-layer sparsity against the target, with a warning for a layer
  pruned to (almost) nothing (layer collapse, Tanaka et al., 2020) or far off target.

Nothing here trains: the lineage (and kinds.py) decide what to train and call these on
the results, so each piece is testable on hand-computed cases.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from lth_search.engine.pruning import Mask

COLLAPSE_RATIO = 0.05
"""A layer whose kept fraction is below this share of the network's kept fraction is collapsing."""
DEVIATION_BOUND = 0.25
"""A layer whose sparsity is further than this from the target is flagged (absolute fraction)."""


@dataclass
class SignPreservation:
    """rho for the ticket (its kept weights) and for the dense network (all weights), side by side."""

    ticket: float
    dense: float


@dataclass
class LayerHealth:
    name: str
    sparsity: float
    target: float
    kept: int
    collapsed: bool
    deviates: bool


# Sign preservation ----------------------------------------------------------------------------
def sign_share(reference: dict[str, torch.Tensor], end: dict[str, torch.Tensor], mask: Mask | None,
               names: Iterable[str]) -> float:
    """Share of the (kept) weights non-zero in `reference` whose sign in `end` is the same.

    `mask` None means every weight of `names`. A kept weight that ends at exactly zero
    has lost its sign. 1.0 when no weight qualifies (nothing to contradict).
    """
    same = total = 0
    for name in names:
        ref = reference[name].detach().cpu()
        considered = ref != 0
        if mask is not None:
            considered &= mask[name].cpu()
        agree = torch.sign(end[name].detach().cpu()) == torch.sign(ref)
        same += int((agree & considered).sum())
        total += int(considered.sum())
    return same / total if total else 1.0


def sign_preservation(reference: dict[str, torch.Tensor], ticket_end: dict[str, torch.Tensor], mask: Mask,
                      dense_end: dict[str, torch.Tensor]) -> SignPreservation:
    """rho of the ticket (kept weights, `reference` -> `ticket_end`) and of the dense
    network (all prunable weights, `reference` -> `dense_end`)."""
    names = sorted(mask)
    return SignPreservation(sign_share(reference, ticket_end, mask, names), sign_share(reference, dense_end, None, names))


# Trajectory alignment -------------------------------------------------------------------------
def probe_gradients(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Gradient of the cross-entropy on (x, y) at `state` for the parameters `names`.

    Runs on a copy in eval mode, so the caller's model, its mode and its grads are untouched;
    frozen weights (a pretrained base under LoRA) get their gradient too on that copy.
    """
    work = copy.deepcopy(model).eval()
    work.load_state_dict(state)
    params = dict(work.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    loss = nn.functional.cross_entropy(work(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {name: g.detach() for name, g in zip(names, grads)}


def trajectory_alignment(gradients: dict[str, torch.Tensor], mask: Mask) -> float:
    """A(m; k) = ||m * g||^2 / ||g||^2 over the masked layers (1.0 for a zero gradient)."""
    kept = total = 0.0
    for name, kept_mask in mask.items():
        g2 = gradients[name].detach().double().pow(2)
        total += float(g2.sum())
        kept += float((g2 * kept_mask.to(g2.device)).sum())
    return kept / total if total > 0 else 1.0


# Linear mode connectivity ---------------------------------------------------------------------
def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t) * a + t * b for floating tensors; other entries (counters) are taken from a."""
    return {n: ((1 - t) * v + t * b[n]).to(v.dtype) if v.is_floating_point() else v.clone() for n, v in a.items()}


def interpolation_points(count: int) -> list[float]:
    """`count` evenly spaced points on [0, 1], end points included (count >= 2)."""
    if count < 2:
        raise ValueError(f"need at least 2 interpolation points, got {count}")
    return [i / (count - 1) for i in range(count)]


@torch.no_grad()
def interpolation_errors(model: nn.Module, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor, points: Sequence[float]) -> list[float]:
    """Classification error on (x, y) at each point t of the line (1 - t) a + t b (eval mode, on a copy)."""
    work = copy.deepcopy(model).eval()
    errors = []
    for t in points:
        work.load_state_dict(interpolate(a, b, t))
        errors.append(1.0 - float((work(x).argmax(dim=1) == y).float().mean()))
    return errors


def error_barrier(points: Sequence[float], errors: Sequence[float]) -> float:
    """Frankle et al.'s instability: max_t error(t) minus the mean of the two end errors.

    `points` must start at 0 and end at 1. Zero for identical end points; a pair whose
    ends differ in error has a barrier of at least half that difference by definition.
    """
    if len(points) != len(errors) or len(points) < 2 or points[0] != 0 or points[-1] != 1:
        raise ValueError("points must run from 0 to 1 and match the errors")
    return max(errors) - (errors[0] + errors[-1]) / 2


# Perturbation ----------------------------------------------------------------------------------
def perturbed_start(state: dict[str, torch.Tensor], mask: Mask, epsilon: float, seed: int) -> dict[str, torch.Tensor]:
    """`state` with N(0, (epsilon * s_l)^2) noise on each layer's kept weights, s_l the
    standard deviation of that layer's kept weights (so epsilon is relative, comparable
    across layers); pruned weights stay zero. Drawn on CPU with a private generator."""
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, tensor in state.items():
        if name not in mask:
            out[name] = tensor.detach().clone()
            continue
        kept = mask[name].cpu()
        values = tensor.detach().cpu()
        scale = float(values[kept].double().std()) if int(kept.sum()) > 1 else 0.0
        noise = torch.randn(values.shape, generator=generator, dtype=torch.float64) * (epsilon * scale)
        out[name] = ((values + noise.to(values.dtype)) * kept).to(tensor.device)
    return out


# Layer health ----------------------------------------------------------------------------------
def layer_health(mask: Mask, target: float | dict[str, float], collapse_ratio: float = COLLAPSE_RATIO,
                 deviation_bound: float = DEVIATION_BOUND) -> list[LayerHealth]:
    """Each layer's sparsity against its target (one number for all layers, or per layer).

    Collapsed: nothing kept, or a kept fraction below `collapse_ratio` times the whole
    mask's kept fraction (so an output layer left with 1 weight in 1000 at 90 % overall
    sparsity is collapsed, while every layer at 99.9 % of a 99.9 % mask is not).
    """
    total = sum(m.numel() for m in mask.values())
    density = sum(int(m.sum()) for m in mask.values()) / total if total else 1.0
    rows = []
    for name in sorted(mask):
        kept = int(mask[name].sum())
        layer_density = kept / mask[name].numel()
        goal = target[name] if isinstance(target, dict) else target
        sparsity = 1.0 - layer_density
        collapsed = kept == 0 or layer_density < collapse_ratio * density
        rows.append(LayerHealth(name, sparsity, goal, kept, collapsed, abs(sparsity - goal) > deviation_bound))
    return rows


def health_warnings(rows: Sequence[LayerHealth]) -> list[str]:
    """One line per collapsed or off-target layer (empty when all is well)."""
    lines = []
    for row in rows:
        if row.collapsed:
            lines.append(f"layer {row.name} collapsed: {row.kept} weights kept ({100 * row.sparsity:.2f}% pruned)")
        elif row.deviates:
            lines.append(f"layer {row.name} at {100 * row.sparsity:.1f}% sparsity, target {100 * row.target:.1f}%")
    return lines
