"""Pruning at initialisation: SNIP, GraSP and SynFlow scores, and masks at a sparsity.

These are the baselines a lottery ticket has to beat without any training before the
mask is chosen (Frankle et al., 2021, "Pruning neural networks at initialization: why
are we missing the mark?"). Each method scores every prunable weight at the start
weights theta (the initialisation, or the rewind point theta_k) and keeps the top
scores globally:

- SNIP (Lee et al., 2019): |dL/dc| at c = 1 for a connection mask c, i.e. |g * theta|
  with g the loss gradient on a data batch (connection sensitivity).
- GraSP (Wang et al., 2020): theta * (H g), H the Hessian and g the gradient of the loss
  on a batch (logits divided by a temperature, 200 as in the paper). Weights whose
  removal would reduce the gradient flow most are kept; the score is signed.
- SynFlow (Tanaka et al., 2020): data-free. All parameters replaced by their absolute
  values, R = sum of the network's output on an all-ones input, score |dR/dtheta *
  theta|; pruned iteratively (100 steps, kept fraction shrinking exponentially), which
  is what avoids layer collapse at extreme sparsity. Computed in float64: the products
  of many absolute weights overflow float32 in deep networks.

Every method keeps at least one weight per layer unless `allow_empty` is set: a layer
with nothing kept disconnects the network (layer collapse), and a comparison against
IMP (which never empties a layer) would then measure that, not the scores.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from lth_search.engine.pruning import Mask, prune_lowest_scores

METHODS = ("snip", "grasp", "synflow")
GRASP_TEMPERATURE = 200.0
SYNFLOW_ITERATIONS = 100


def _work_copy(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    work = copy.deepcopy(model)
    work.load_state_dict(state)
    if dtype is not None:
        work = work.to(dtype)
    for parameter in work.parameters():  # frozen weights (a pretrained base under LoRA) are scored too
        parameter.requires_grad_(True)
    return work.eval()


def snip_scores(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                names: Sequence[str]) -> dict[str, torch.Tensor]:
    """|g * theta| per weight of `names` at `state` on the batch (x, y)."""
    work = _work_copy(model, state)
    params = dict(work.named_parameters())
    loss = nn.functional.cross_entropy(work(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def grasp_scores(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 names: Sequence[str], temperature: float = GRASP_TEMPERATURE) -> dict[str, torch.Tensor]:
    """theta * (H g) per weight of `names`: g the gradient of the tempered loss, H its Hessian.

    Hg is one Hessian-vector product: the gradient of g . stop_grad(g).
    """
    work = _work_copy(model, state)
    params = [dict(work.named_parameters())[n] for n in names]
    loss = nn.functional.cross_entropy(work(x) / temperature, y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * g.detach()).sum() for g in grads)
    hessian_grad = torch.autograd.grad(dot, params)
    return {n: (p * hg).detach() for n, p, hg in zip(names, params, hessian_grad)}


def synflow_scores(model: nn.Module, state: dict[str, torch.Tensor], input_shape: Sequence[int],
                   names: Sequence[str], mask: Mask | None = None) -> dict[str, torch.Tensor]:
    """|dR/dtheta * theta| with every parameter and buffer made non-negative, R = sum f(1).

    `mask` (if given) zeroes pruned weights first, as in SynFlow's iterations. Eval mode,
    so batch norm uses its (initial) running statistics, as the reference code does.
    """
    work = _work_copy(model, state, torch.float64)
    with torch.no_grad():
        for tensor in work.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
        if mask is not None:
            params = dict(work.named_parameters())
            for name, kept in mask.items():
                params[name].mul_(kept.to(params[name].device))
    params = dict(work.named_parameters())
    device = next(iter(params.values())).device
    output = work(torch.ones((1, *input_shape), dtype=torch.float64, device=device))
    grads = torch.autograd.grad(output.sum(), [params[n] for n in names])
    return {n: (g * params[n]).detach().abs() for n, g in zip(names, grads)}


def _pruned_count(mask: Mask, sparsity: float) -> int:
    total = sum(m.numel() for m in mask.values())
    return int(sparsity * total + 0.5)


def prune_at_init(
    method: str,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    names: Sequence[str],
    sparsity: float,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    allow_empty: bool = False,
    iterations: int = SYNFLOW_ITERATIONS,
) -> Mask:
    """The mask `method` chooses at `state`, pruning round(sparsity * total) weights globally.

    SNIP and GraSP need a batch (x, y); SynFlow needs `input_shape` and prunes in
    `iterations` steps to kept fractions (1 - sparsity) ** (i / iterations).
    """
    if method not in METHODS:
        raise ValueError(f"prune-at-init method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    params = dict(model.named_parameters())
    mask: Mask = {n: torch.ones_like(params[n], dtype=torch.bool, device="cpu") for n in names}
    target = _pruned_count(mask, sparsity)
    protect = not allow_empty
    if method == "synflow":
        if input_shape is None:
            raise ValueError("synflow needs the input shape")
        density = 1.0 - sparsity
        for i in range(1, iterations + 1):
            scores = synflow_scores(model, state, input_shape, names, mask)
            goal = _pruned_count(mask, 1.0 - density ** (i / iterations)) if i < iterations else target
            already = sum(int((~m).sum()) for m in mask.values())
            mask = prune_lowest_scores(scores, mask, goal - already, protect)
        return mask
    if x is None or y is None:
        raise ValueError(f"{method} needs a data batch")
    scores = snip_scores(model, state, x, y, names) if method == "snip" else grasp_scores(model, state, x, y, names)
    return prune_lowest_scores(scores, mask, target, protect)
