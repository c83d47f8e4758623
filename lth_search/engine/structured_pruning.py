"""Structured rounds: pruning whole neurons/filters, blocks or n:m groups instead of single weights.

Unstructured magnitude pruning finds tickets; hardware pays only for structure. A round
with `prune.structure` other than `unstructured` removes, by magnitude:

- `channel`: whole units (a Linear layer's neuron, a conv's filter) scored by the mean
  |weight| of their row, together with the consumer's weights that read them (the next
  layer's input column, or the block of flattened features after the last conv). A unit
  nothing reads is cut out at export (portable/structured.py): the ticket is a smaller
  dense network. The output layer's units (the classes) are never pruned. Chain models only.
- `block:N`: N x N blocks of each weight's (out, in*kh*kw) matrix, scored by their mean
  |weight| (edge blocks by their own size); a block goes whole.
- `n:m`: the unstructured round first, then at most n of every m consecutive weights of a
  row kept (the largest): the 2:4 pattern GPUs' semi-structured kernels run.

Rates, scopes and ratios mean what they mean for weights (pruning.py), counted in units or
blocks: `layerwise` prunes round(rate_l * remaining_l) of each layer's, `global` pools the
layers that share an effective rate. No layer loses its last unit or block. Ties fall on the
earlier one (layers in name order, then index), so equal inputs give equal masks anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from lth_search.engine.pruning import _effective_rates, _partitions, _round, prune_round
from lth_search.errors import ConfigError
from lth_search.portable.structured import STRUCTURED_ARCHITECTURES, _chain
from lth_search.store.codec import Mask

Chain = tuple[list[str], list[int]]
"""A chain model's weight names in order and, per boundary, how many consumer inputs one unit feeds."""


def channel_chain(model: nn.Module, model_name: str) -> Chain:
    """The chain `channel` pruning walks; ConfigError (one line) for a model without one."""
    if model_name not in STRUCTURED_ARCHITECTURES:
        raise ConfigError(f"prune.structure: channel needs a chain model ({', '.join(STRUCTURED_ARCHITECTURES)}), "
                          f"not {model_name!r}; use block:N or n:m")
    names, spreads = _chain(model)
    return [f"{name}.weight" for name in names], spreads


def structured_round(weights: dict[str, torch.Tensor], mask: Mask, groups: dict[str, str], rate: float, scope: str,
                     structure: str, layer_ratios: dict[str, float] | None = None, output_ratio: float = 1.0,
                     chain: Chain | None = None) -> Mask:
    """One round of `structure` (see the module docstring); returns a new mask."""
    ratios = dict(layer_ratios or {})
    if structure == "unstructured":
        return prune_round(weights, mask, groups, rate, scope, ratios, output_ratio)
    if structure == "channel":
        if chain is None:
            raise ValueError("channel pruning needs the model's chain (channel_chain)")
        return _channel_round(weights, mask, groups, rate, scope, ratios, output_ratio, chain)
    if structure.startswith("block:"):
        return _block_round(weights, mask, groups, rate, scope, ratios, output_ratio, int(structure.split(":")[1]))
    n, m = (int(part) for part in structure.split(":"))
    pruned = prune_round(weights, mask, groups, rate, scope, ratios, output_ratio)
    return {name: _n_of_m(weights[name], kept, n, m) for name, kept in pruned.items()}


def _select(scores: list[torch.Tensor], alive: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Per layer, which of its alive items (units or blocks) are among the `count` lowest scores,
    each layer keeping its best alive item."""
    flat = torch.cat([torch.where(a, s.double(), torch.tensor(float("inf"), dtype=torch.float64))
                      for s, a in zip(scores, alive)])
    sizes = [len(s) for s in scores]
    protected = torch.zeros(len(flat), dtype=torch.bool)
    start = 0
    for size, a, s in zip(sizes, alive, scores):
        if a.any():
            best = torch.where(a, s.double(), torch.tensor(-float("inf"), dtype=torch.float64))
            protected[start + int(torch.argsort(best, descending=True, stable=True)[0])] = True
        start += size
    order = torch.argsort(flat, stable=True)
    order = order[~protected[order] & torch.isfinite(flat[order])][:count]
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[order] = True
    return list(torch.split(chosen, sizes))


def _partitioned(rates: dict[str, float], scope: str, scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """name -> items to prune: round(rate * alive items) per partition of layers (pruning.py's partitions)."""
    chosen = {}
    for rate, names in _partitions(rates, scope):
        count = _round(rate * sum(int(alive[n].sum()) for n in names))
        for name, picked in zip(names, _select([scores[n] for n in names], [alive[n] for n in names], count)):
            chosen[name] = picked
    return chosen


def _channel_round(weights: dict[str, torch.Tensor], mask: Mask, groups: dict[str, str], rate: float, scope: str,
                   ratios: dict[str, float], output_ratio: float, chain: Chain) -> Mask:
    names, spreads = chain
    producers = names[:-1]
    rates = _effective_rates(groups, producers, rate, ratios, output_ratio)
    scores, alive = {}, {}
    for name in producers:
        kept = mask[name].reshape(mask[name].shape[0], -1)
        values = (weights[name].detach().cpu().reshape(kept.shape).abs() * kept).double()
        scores[name], alive[name] = values.mean(dim=1), kept.any(dim=1)
    chosen = _partitioned(rates, scope, scores, alive)
    result = {name: kept.clone() for name, kept in mask.items()}
    for index, name in enumerate(producers):
        units = chosen[name]
        if not units.any():
            continue
        result[name][units] = False
        consumer, spread = names[index + 1], spreads[index]
        if result[consumer].dim() == 2:  # Linear: the columns the unit's `spread` features feed
            grouped = result[consumer].view(result[consumer].shape[0], -1, spread)
            grouped[:, units, :] = False
        else:  # Conv2d: the input channel
            result[consumer][:, units] = False
    return {name: result[name] for name in mask}


def _blocks(tensor: torch.Tensor, side: int, fill: float | bool) -> torch.Tensor:
    """(rows/side, cols/side, side, side) blocks of a weight's (out, -1) matrix, the edges padded with `fill`."""
    matrix = tensor.reshape(tensor.shape[0], -1)
    rows, cols = matrix.shape
    padded = torch.full((-(-rows // side) * side, -(-cols // side) * side), fill, dtype=matrix.dtype)
    padded[:rows, :cols] = matrix
    return padded.reshape(padded.shape[0] // side, side, padded.shape[1] // side, side).permute(0, 2, 1, 3)


def _block_round(weights: dict[str, torch.Tensor], mask: Mask, groups: dict[str, str], rate: float, scope: str,
                 ratios: dict[str, float], output_ratio: float, side: int) -> Mask:
    rates = _effective_rates(groups, sorted(mask), rate, ratios, output_ratio)
    scores, alive = {}, {}
    for name, kept in mask.items():
        magnitude = _blocks((weights[name].detach().cpu().abs() * kept).double(), side, 0.0)
        real = _blocks(torch.ones(kept.shape, dtype=torch.bool), side, False)
        scores[name] = (magnitude.sum(dim=(2, 3)) / real.sum(dim=(2, 3))).reshape(-1)
        alive[name] = _blocks(kept.cpu(), side, False).any(dim=3).any(dim=2).reshape(-1)
    chosen = _partitioned(rates, scope, scores, alive)
    result = {}
    for name, kept in mask.items():
        rows, cols = kept.shape[0], kept[0].numel()
        gone = chosen[name].reshape(-(-rows // side), -(-cols // side))
        expanded = gone.repeat_interleave(side, 0).repeat_interleave(side, 1)[:rows, :cols]
        result[name] = kept & ~expanded.reshape(kept.shape).to(kept.device)
    return result


def _n_of_m(weight: torch.Tensor, kept: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`kept` with at most n of every m consecutive entries of a row left: the largest |weight|."""
    rows = kept.reshape(kept.shape[0], -1).cpu()
    cols = rows.shape[1]
    width = -(-cols // m) * m
    score = torch.full((rows.shape[0], width), -1.0, dtype=torch.float64)
    score[:, :cols] = torch.where(rows, weight.detach().cpu().reshape(rows.shape).abs().double(), -1.0)
    grouped = score.reshape(rows.shape[0], -1, m)
    order = torch.argsort(grouped, dim=2, descending=True, stable=True)
    top = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, order[..., :n], True)
    allowed = top.reshape(rows.shape[0], width)[:, :cols]
    return (rows & allowed).reshape(kept.shape).to(kept.device)
