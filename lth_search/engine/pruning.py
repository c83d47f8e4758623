"""Masks: magnitude pruning by round, random controls, and the rescale at rewind.

A mask maps each prunable parameter name to a bool tensor of the parameter's shape
(True = kept). Masks only ever shrink: a round prunes among the weights its input mask
keeps, so the masks of a lineage are nested.

At rewind the survivors can be rescaled (`init_scale`): by density ** (-alpha/2), by the
sum of squares the mask kept ("measured"), or by the activation variance measured on a
probe batch (`calibrated_factors`, which needs the model and data).

Every count here is exact and every tie is broken deterministically (a stable sort over
the layers in name order, then flat index): the same inputs give the same mask on any
device, which the content-addressed store relies on.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lth_search.config.prune import check_init_scale
from lth_search.errors import ConfigError
from lth_search.store.codec import Mask

SCOPES = ("global", "layerwise")


# Building masks -----------------------------------------------------------------------------
def ones_mask(model: nn.Module) -> Mask:
    """The dense mask of `model`: every weight in `model.prunable` kept."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool) for name in model.prunable}


def _round(x: float) -> int:
    """Round half up (Python's round() would send 2.5 to 2 and 3.5 to 4)."""
    return math.floor(x + 0.5)


def check_layer_groups(groups: dict[str, str], layer_ratios: dict[str, float], names: list[str] | None = None) -> None:
    """ConfigError unless every group of `layer_ratios` is a group of the model's prunable layers.

    The lineage calls it as soon as the model is built, before the dense stage trains.
    """
    present = {groups[n] for n in (groups if names is None else names)}
    unknown = sorted(set(layer_ratios) - present)
    if unknown:
        raise ConfigError(
            f"prune.layer_ratios: group(s) {', '.join(unknown)} not in this model (its groups: {', '.join(sorted(present))})"
        )


def _effective_rates(
    groups: dict[str, str], names: list[str], rate: float, layer_ratios: dict[str, float], output_ratio: float
) -> dict[str, float]:
    check_layer_groups(groups, layer_ratios, names)
    return {name: min(rate * _multiplier(groups[name], layer_ratios, output_ratio), 1.0) for name in names}


def _multiplier(group: str, layer_ratios: dict[str, float], output_ratio: float) -> float:
    return layer_ratios.get(group, 1.0) * (output_ratio if group == "output" else 1.0)


def _partitions(rates: dict[str, float], scope: str) -> list[tuple[float, list[str]]]:
    """Layers pruned jointly: each layer alone (layerwise), or all layers of equal rate (global)."""
    if scope == "layerwise":
        return [(rates[name], [name]) for name in sorted(rates)]
    by_rate: dict[float, list[str]] = {}
    for name in sorted(rates):
        by_rate.setdefault(rates[name], []).append(name)
    return sorted(by_rate.items())


def _partition_count(rate: float, names: list[str], counts: dict[str, int]) -> int:
    """round(rate * remaining), leaving every layer that still has a weight at least one."""
    kept = [counts[n] for n in names]
    return min(_round(rate * sum(kept)), sum(kept) - sum(1 for k in kept if k > 0))


def _kept_counts(mask: Mask) -> dict[str, int]:
    return {name: int(kept.sum()) for name, kept in mask.items()}


def _magnitudes(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    values = weight.detach().to(positions.device).reshape(-1)[positions].abs()
    return values.to(torch.promote_types(values.dtype, torch.float32))


def _prune(weights: dict[str, torch.Tensor], mask: Mask, rates: dict[str, float], scope: str) -> Mask:
    result, counts = dict(mask), _kept_counts(mask)
    for rate, names in _partitions(rates, scope):
        count = _partition_count(rate, names, counts)
        if count > 0:
            result.update(_prune_smallest(weights, mask, names, count))
    return {name: result[name] for name in mask}


def _prune_smallest(
    weights: dict[str, torch.Tensor], mask: Mask, names: list[str], count: int, protect: bool = True
) -> Mask:
    """Remove the `count` smallest-magnitude kept weights jointly across `names`.

    Each layer's largest kept weight is protected (unless `protect` is False), so no
    layer is emptied. Ties fall on the earlier weight (layers in name order, then flat
    index) via a stable sort.
    """
    flat_masks = [mask[n].reshape(-1) for n in names]
    positions = [torch.nonzero(m, as_tuple=True)[0] for m in flat_masks]
    magnitudes = torch.cat([_magnitudes(weights[n], p) for n, p in zip(names, positions)])
    offsets = torch.tensor([0] + [len(p) for p in positions], device=magnitudes.device).cumsum(0)
    order = torch.argsort(magnitudes, stable=True)
    layer_of = torch.searchsorted(offsets[1:], order, right=True)
    rank = torch.arange(len(order), device=order.device)
    last = torch.full((len(names),), -1, dtype=torch.long, device=order.device)
    last = last.scatter_reduce(0, layer_of, rank, reduce="amax")
    candidate = torch.ones(len(order), dtype=torch.bool, device=order.device)
    if protect:
        candidate[last[last >= 0]] = False
    chosen = order[candidate][:count]
    chosen_layer = torch.searchsorted(offsets[1:], chosen, right=True)
    result = {}
    for index, name in enumerate(names):
        local = chosen[chosen_layer == index] - offsets[index]
        flat = flat_masks[index].clone()
        flat[positions[index][local]] = False
        result[name] = flat.reshape(mask[name].shape)
    return result


def _check_inputs(weights: dict[str, torch.Tensor], mask: Mask, groups: dict[str, str], scope: str) -> None:
    if scope not in SCOPES:
        raise ConfigError(f"prune.scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
    for name, kept in mask.items():
        if name not in weights or name not in groups:
            raise ValueError(f"mask layer {name!r} has no weights or no layer group")
        if kept.dtype != torch.bool or kept.shape != weights[name].shape:
            raise ValueError(f"mask of {name!r} must be bool of shape {tuple(weights[name].shape)}")


def prune_round(
    weights: dict[str, torch.Tensor],
    mask: Mask,
    groups: dict[str, str],
    rate: float,
    scope: str = "global",
    layer_ratios: dict[str, float] | None = None,
    output_ratio: float = 1.0,
) -> Mask:
    """One IMP round: prune a fraction of the *remaining* weights by magnitude of `weights`.

    A layer's effective rate is `rate * layer_ratios.get(group, 1)`, times `output_ratio`
    for the output layer (capped at 1). `layerwise` prunes round(rate_l * remaining_l) of
    each layer's smallest kept weights (Frankle & Carbin's LeNet ladder). `global` pools
    the layers that share an effective rate and prunes round(rate * remaining) of the
    pool's smallest kept weights jointly. With all multipliers 1 that is ordinary global
    magnitude pruning (open_lth's default); with e.g. output_ratio 0.5 the output layer
    is pruned on its own at half rate while the others stay global. Partitioning by rate
    is what lets group ratios mean something under global scope without giving up the
    cross-layer competition where the rates agree. No layer loses its last weight.
    Returns a new mask; `mask` is not modified.
    """
    if not 0 < rate < 1:
        raise ConfigError(f"prune.rate: must lie in (0, 1), got {rate}")
    if not output_ratio > 0:
        raise ConfigError(f"prune.output_ratio: must be > 0, got {output_ratio}")
    _check_inputs(weights, mask, groups, scope)
    rates = _effective_rates(groups, sorted(mask), rate, dict(layer_ratios or {}), output_ratio)
    return _prune(weights, mask, rates, scope)


def prune_to_sparsity(
    weights: dict[str, torch.Tensor],
    groups: dict[str, str],
    sparsity: float,
    scope: str = "global",
    layer_ratios: dict[str, float] | None = None,
    output_ratio: float = 1.0,
) -> Mask:
    """One-shot pruning of the dense `weights` (names in `groups`) to overall `sparsity`.

    The layers' rates keep the proportions of `prune_round` (group ratios, output ratio);
    the common base rate is found by bisection so the pruned fraction of all prunable
    weights is as close to `sparsity` as the integer counts allow.
    """
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must lie in [0, 1), got {sparsity}")
    dense = {name: torch.ones_like(weights[name], dtype=torch.bool) for name in groups}
    _check_inputs(weights, dense, groups, scope)
    if sparsity == 0:
        return dense
    names = sorted(dense)
    total = sum(m.numel() for m in dense.values())
    ratios, counts = dict(layer_ratios or {}), _kept_counts(dense)

    def pruned(base: float) -> int:
        rates = _effective_rates(groups, names, base, ratios, output_ratio)
        return sum(_partition_count(r, ns, counts) for r, ns in _partitions(rates, scope))

    target = _round(sparsity * total)
    low, high = 0.0, 1.0 / min(1.0, *(_multiplier(groups[n], ratios, output_ratio) for n in names))
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if pruned(middle) < target else (low, middle)
    base = min((low, high), key=lambda b: (abs(pruned(b) - target), b))
    return _prune(weights, dense, _effective_rates(groups, names, base, ratios, output_ratio), scope)


def prune_lowest_scores(scores: dict[str, torch.Tensor], mask: Mask, count: int, protect: bool = True) -> Mask:
    """Remove the `count` lowest-*scoring* kept weights of `mask` jointly across its layers.

    For saliency scores of any sign (GraSP's are signed): the scores are replaced by
    their global ranks (exact in float64) and pruned like magnitudes, so ties, the
    device independence and the protection of each layer's best weight (`protect`) are
    those of `prune_round`. `count` is capped at what can go.
    """
    names = sorted(mask)
    flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
    ranks = torch.empty_like(flat)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(len(flat), dtype=torch.float64)
    pieces = dict(zip(names, ranks.split([mask[n].numel() for n in names])))
    rank_weights = {n: pieces[n].reshape(mask[n].shape) for n in names}
    cpu_mask = {n: mask[n].cpu() for n in names}
    kept = sum(int(m.sum()) for m in cpu_mask.values())
    floor = sum(1 for m in cpu_mask.values() if bool(m.any())) if protect else 0
    count = max(0, min(count, kept - floor))
    result = _prune_smallest(rank_weights, cpu_mask, names, count, protect) if count else cpu_mask
    return {n: result[n].to(mask[n].device) for n in mask}


def random_mask_like(mask: Mask, seed: int) -> Mask:
    """The random-pruning control: each layer keeps as many weights as in `mask`, at
    uniformly random positions (seeded, drawn on CPU so every device gets the same mask)."""
    generator = torch.Generator().manual_seed(int(seed))
    result = {}
    for name in sorted(mask):
        kept = mask[name]
        flat = torch.zeros(kept.numel(), dtype=torch.bool)
        flat[torch.randperm(kept.numel(), generator=generator)[: int(kept.sum())]] = True
        result[name] = flat.reshape(kept.shape).to(kept.device)
    return {name: result[name] for name in mask}


# Rewinding ----------------------------------------------------------------------------------
def _check_init_scale(init_scale: float | str) -> float | str:
    """The schema's rule (config/prune.py), for callers that bypass the config."""
    if init_scale == "calibrated":
        raise ValueError("init_scale 'calibrated' needs a data batch: use calibrated_factors")
    try:
        return check_init_scale(init_scale)
    except ValueError as error:
        raise ConfigError(f"prune.init_scale: {error}") from None


def rescale_factors(rewind_weights: dict[str, torch.Tensor], mask: Mask, init_scale: float | str) -> dict[str, float]:
    """Per-layer factor applied to the surviving weights at rewind.

    A number alpha gives density ** (-alpha / 2): alpha 0 is the plain rewind, alpha 1
    restores the pre-activation variance when the mask is random (kept fraction d of the
    weights keeps fraction d of the variance). Magnitude masks keep the *large* weights,
    i.e. more than d of the variance, so alpha 1 overshoots there; "measured" instead
    scales each layer so its kept sum of squares equals its full sum of squares in the
    rewind weights. That restores the first layer exactly for any mask and the next
    ones closely; for deep IMP masks see `calibrated_factors`. A layer with nothing kept
    gets 1.0.
    """
    init_scale = _check_init_scale(init_scale)
    factors = {}
    for name, kept in mask.items():
        count = int(kept.sum())
        if count == 0:
            factors[name] = 1.0
        elif init_scale == "measured":
            weight = rewind_weights[name].detach().double()
            kept_squares = float((weight * kept.to(weight.device)).pow(2).sum())
            factors[name] = math.sqrt(float(weight.pow(2).sum()) / kept_squares) if kept_squares > 0 else 1.0
        else:
            factors[name] = (count / kept.numel()) ** (-float(init_scale) / 2)
    return factors


def rewind_weights(rewind_state: dict[str, torch.Tensor], mask: Mask, init_scale: float | str) -> dict[str, torch.Tensor]:
    """A full copy of `rewind_state` with prunable tensors masked and rescaled by `init_scale`.

    Everything not in the mask (biases, batch norm, buffers) is copied unchanged.
    """
    missing = sorted(set(mask) - set(rewind_state))
    if missing:
        raise ValueError(f"rewind state lacks masked layers: {', '.join(missing)}")
    return masked_state(rewind_state, mask, rescale_factors(rewind_state, mask, init_scale))


def masked_state(state: dict[str, torch.Tensor], mask: Mask, factors: dict[str, float]) -> dict[str, torch.Tensor]:
    """A full copy of `state`: tensor * mask * factor for masked layers, the rest cloned."""
    result = {}
    for name, tensor in state.items():
        if name in mask:
            kept = mask[name].to(tensor.device)
            result[name] = (tensor.detach() * kept * factors.get(name, 1.0)).to(tensor.dtype)
        else:
            result[name] = tensor.detach().clone()
    return result


def _output_variances(model: nn.Module, modules: dict[str, nn.Module], probe: torch.Tensor) -> dict[str, float]:
    """Per-unit variance of each module's output on `probe` (over batch and spatial axes,
    averaged over units/channels), keyed in the order the forward pass reaches them."""
    variances: dict[str, float] = {}

    def hook(name: str):
        def record(_module, _inputs, output):
            flat = output.detach().transpose(0, 1).reshape(output.shape[1], -1).double()
            variances.setdefault(name, float(flat.var(dim=1).mean()))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return variances


@torch.no_grad()
def calibrated_factors(
    model: nn.Module, rewind_state: dict[str, torch.Tensor], mask: Mask, probe: torch.Tensor
) -> dict[str, float]:
    """Rescale factors that restore each prunable layer's *output* variance on `probe`.

    The weight-based rules cannot see that a mask chosen from trained magnitudes keeps
    weights whose signs line up across layers, so the masked network's activations grow
    with depth even when each layer's sum of squares is restored ("measured"). This
    measures instead: layer by layer in forward order, the factor is set so the layer's
    pre-activation variance on `probe` (a data batch) equals the dense network's at the
    rewind point. Runs on a copy of `model` in eval mode (one forward pass per layer);
    a layer the forward pass never reaches keeps its "measured" factor.
    """
    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    owners = {name: work.get_submodule(name.rsplit(".", 1)[0]) for name in mask}
    owners = {name: module for name, module in owners.items() if params[name] is module.weight}
    work.load_state_dict(rewind_state)
    dense = _output_variances(work, owners, probe)
    factors = rescale_factors(rewind_state, mask, "measured")
    for name in [n for n in dense if n in owners]:
        work.load_state_dict(masked_state(rewind_state, mask, factors))
        kept = _output_variances(work, {name: owners[name]}, probe)[name]
        if kept > 0:
            factors[name] *= math.sqrt(dense[name] / kept)
    return factors


def apply_mask_(model: nn.Module, mask: Mask) -> None:
    """Zero the pruned weights of `model` in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, kept in mask.items():
            params[name].mul_(kept.to(params[name].device))


# Measuring ----------------------------------------------------------------------------------
def density(mask: Mask) -> float:
    """Fraction of all prunable weights kept (1.0 for an empty mask)."""
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / total if total else 1.0


def sparsity(mask: Mask) -> float:
    """Fraction of all prunable weights pruned."""
    return 1.0 - density(mask)


def layer_sparsity(mask: Mask) -> dict[str, float]:
    """Fraction pruned in each layer."""
    return {name: 1.0 - int(m.sum()) / m.numel() for name, m in mask.items()}


def group_sparsity(mask: Mask, groups: dict[str, str]) -> dict[str, float]:
    """Fraction pruned in each layer group (attn, mlp, embed, output, ...), over the group's weights."""
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, m in mask.items():
        group = groups[name]
        kept[group] = kept.get(group, 0) + int(m.sum())
        total[group] = total.get(group, 0) + m.numel()
    return {group: 1.0 - kept[group] / total[group] for group in sorted(total)}
