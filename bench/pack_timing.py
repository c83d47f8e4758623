"""Shared by bench/packs.py and bench/gpu.py: build R masked members and time them.

Each member is a lineage's round as IMP makes it: its own seed (init and batch order)
and a ~79 %-sparse magnitude mask (seven 20 % rounds). The sequential trainer runs the
members one after another with `train(...)`; the pack runs them with `train_pack`.
"""

from __future__ import annotations

import statistics
import time

import torch

from lth_search.config import ModelConfig, TrainConfig
from lth_search.engine.data import Dataset
from lth_search.engine.models import build_model
from lth_search.engine.packs import PackMember, train_pack
from lth_search.engine.pruning import masked_state, ones_mask, prune_round


def members(cfg: ModelConfig, data: Dataset, count: int, steps: int, masked: bool = True) -> list[PackMember]:
    result = []
    for seed in range(count):
        model = build_model(cfg, data.input_shape, data.num_classes, seed)
        state = model.state_dict()
        mask = None
        if masked:
            weights = {name: p.detach() for name, p in model.named_parameters()}
            mask = ones_mask(model)
            for _ in range(7):
                mask = prune_round(weights, mask, model.prunable, 0.2)
            state = masked_state(state, mask, {})
            mask = {name: m.to(data.train.x.device) for name, m in mask.items()}
        state = {name: t.to(data.train.x.device) for name, t in state.items()}
        result.append(PackMember(state, data, seed, 0, steps, mask))
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(template, group: list[PackMember], recipe: TrainConfig, mode: str, steps: int) -> float:
    device = group[0].data.train.x.device
    _sync(device)
    began = time.perf_counter()
    results = train_pack(template, group, recipe, mode)
    float(results[-1].train_loss)
    _sync(device)
    return len(group) * steps / (time.perf_counter() - began)


def lineage_steps_per_s(cfg: ModelConfig, data: Dataset, recipe: TrainConfig, count: int, steps: int,
                        modes: list[str], repeats: int = 3, masked: bool = True) -> list[float]:
    """Per mode ("sequential", "bmm", "vmap"): the median over `repeats` of (count x steps) / seconds.

    The modes are timed interleaved (mode 1, mode 2, mode 1, ...) after one untimed warm-up
    round, so load from other processes falls on all of them alike.
    """
    group = members(cfg, data, count, steps, masked)
    template = build_model(cfg, data.input_shape, data.num_classes, 0).to(data.train.x.device)
    rates: list[list[float]] = [[] for _ in modes]
    for repeat in range(repeats + 1):
        for index, mode in enumerate(modes):
            rate = _rate(template, group, recipe, mode, steps)
            if repeat:
                rates[index].append(rate)
    return [statistics.median(r) for r in rates]
