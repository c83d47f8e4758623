"""A ticket whose pruning removed whole neurons or channels, rebuilt as a smaller dense network.

Unstructured sparsity needs sparse kernels to pay; a unit (a hidden neuron, a conv
channel) none of whose outputs is used can simply be cut out, leaving an ordinary dense
network with fewer units that any runtime runs faster (`prune.structure: channel` prunes
that way: a filter and the consumer's matching input weights together).

A unit of layer l is cut when nothing it computes reaches the output:

- its outgoing weights (the consumer's input column, or the block of flattened features it
  feeds after the last conv) are all zero: exact whatever the unit computes; or
- its incoming weights are all zero and relu(bias) is 0: it outputs zero; or
- its incoming weights are zero and its consumer is a Linear layer: its constant output
  relu(b) is folded into the consumer's bias (exact up to float rounding). (A conv
  consumer cannot take the fold: zero padding makes a constant input non-constant at the
  borders.)

Handles the plain chains: `mlp` / `lenet_300_100` and Conv-2/4/6. Plain torch only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

STRUCTURED_ARCHITECTURES = ("mlp", "lenet_300_100", "conv2", "conv4", "conv6")


def _chain(model: nn.Module) -> tuple[list[str], list[int]]:
    """The model's layers in order and, per boundary, how many consumer inputs each unit feeds."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    spreads = []
    for before, after in zip(names, names[1:]):
        a, b = model.get_submodule(before), model.get_submodule(after)
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.Linear):
            spreads.append(b.in_features // a.out_channels)
        else:
            spreads.append(1)
    return names, spreads


def _columns(weight: torch.Tensor, units: int, spread: int) -> torch.Tensor:
    """The consumer's weights grouped by producing unit: (units, out, spread[, kh, kw])."""
    if weight.dim() == 2:
        return weight.reshape(weight.shape[0], units, spread).transpose(0, 1)
    return weight.transpose(0, 1)


@torch.no_grad()
def shrink(model: nn.Module, spec: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """(smaller dense model, its spec, its state) computing what `model` computes.

    `spec` is `model.json`'s description of `model` (see ticket_model.py); ValueError for an
    architecture without a plain chain of layers."""
    arch = spec.get("architecture")
    if arch not in STRUCTURED_ARCHITECTURES:
        raise ValueError(f"structured export handles {', '.join(STRUCTURED_ARCHITECTURES)}, not {arch or spec.get('factory')!r}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names, spreads = _chain(model)
    widths: list[int] = []
    for index, (name, spread) in enumerate(zip(names[:-1], spreads)):
        consumer = names[index + 1]
        weight, bias = state[f"{name}.weight"], state.get(f"{name}.bias")
        units = weight.shape[0]
        grouped = _columns(state[f"{consumer}.weight"], units, spread)
        unused = (grouped.reshape(units, -1) == 0).all(dim=1)
        silent = (weight.reshape(units, -1) == 0).all(dim=1)
        constant = torch.zeros(units) if bias is None else torch.relu(bias)
        folds = silent & ~unused & (constant != 0)
        if folds.any() and isinstance(model.get_submodule(consumer), nn.Linear) and f"{consumer}.bias" in state:
            feed = constant[folds].repeat_interleave(spread)
            cols = torch.arange(units * spread).reshape(units, spread)[folds].reshape(-1)
            state[f"{consumer}.bias"] += state[f"{consumer}.weight"][:, cols] @ feed
        elif folds.any():
            silent = silent & ~folds  # a conv consumer: keep the constant channels
        keep = ~(unused | silent)
        if not keep.any():
            keep[0] = True  # a layer of width zero is no network: keep one (its output is unused)
        state[f"{name}.weight"] = weight[keep]
        if bias is not None:
            state[f"{name}.bias"] = bias[keep]
        cols = torch.arange(units * spread).reshape(units, spread)[keep].reshape(-1)
        state[f"{consumer}.weight"] = state[f"{consumer}.weight"][:, cols]
        widths.append(int(keep.sum()))
    small_spec = copy.deepcopy(spec)
    options = small_spec.setdefault("options", {})
    if arch in ("mlp", "lenet_300_100"):
        small_spec["architecture"] = "mlp"
        options["widths"] = widths
    else:
        convs = sum(isinstance(model.get_submodule(n), nn.Conv2d) for n in names)
        plan, conv_widths = [], iter(widths[:convs])
        for item in model_plan(model):
            plan.append(item if item == "M" else next(conv_widths))
        options["plan"], options["fc"] = plan, widths[convs:]
    small_spec["structured_from"] = {"architecture": arch, "widths": [model.get_submodule(n).weight.shape[0]
                                                                        for n in names[:-1]]}
    from .ticket_model import build_network

    small = build_network(small_spec)
    small.load_state_dict(state)
    return small.eval(), small_spec, state


def model_plan(model: nn.Module) -> list[int | str]:
    """A ConvNet's feature plan as architectures.py writes it: channel counts and "M" for pools."""
    plan: list[int | str] = []
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            plan.append(module.out_channels)
        elif isinstance(module, nn.MaxPool2d):
            plan.append("M")
    return plan
