"""What a round's sparsity buys: the peak memory from a layout's cached temporaries is the measured one."""

from __future__ import annotations

import pytest
import torch

from lth_search.engine import sparsity_gains
from lth_search.engine.sparsity_gains import example_inputs, measure_gains
from lth_search.portable.architectures import build_architecture
from lth_search.portable.sparse import peak_forward_bytes, sparsify


def _pruned(name: str, shape: tuple[int, ...], sparsity: float, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_architecture(name, shape, 10, **options).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # built uninitialised
            parameter.normal_(0, 0.1)
            if parameter.dim() > 1:
                parameter.mul_(torch.rand_like(parameter) >= sparsity)
    return model


@pytest.mark.parametrize("name, shape, options", [
    ("mlp", (40,), {"widths": [100, 100]}),
    ("conv2", (3, 16, 16), {}),
])
def test_the_cached_temporaries_give_the_peak_a_fresh_profile_measures(name, shape, options):
    sparsity_gains._TEMPORARIES.clear()
    first = measure_gains(_pruned(name, shape, 0.2, **options), shape, 8, budget_s=0.002)
    assert len(sparsity_gains._TEMPORARIES) == 2  # the dense and the CSR layout, profiled once each
    model = _pruned(name, shape, 0.9, **options)
    again = measure_gains(model, shape, 8, budget_s=0.002)
    assert len(sparsity_gains._TEMPORARIES) == 2  # the same layouts: no profiler run
    x = example_inputs(model, shape, 8)
    with torch.no_grad():
        fresh = peak_forward_bytes(sparsify(model, "csr"), x) / peak_forward_bytes(model, x)
    assert again.peak_memory == pytest.approx(fresh, rel=1e-9)
    assert again.peak_memory < first.peak_memory  # fewer non-zeros, fewer resident bytes


def test_a_stage_measured_once_in_a_process_is_not_timed_again():
    model = _pruned("mlp", (40,), 0.5, widths=[100, 100])
    calls: list[int] = []

    def measure():
        calls.append(1)
        return measure_gains(model, (40,), 8, budget_s=0.002)

    first = sparsity_gains.stage_gains("k" * 64, 8, measure)
    again = sparsity_gains.stage_gains("k" * 64, 8, measure)
    other_batch = sparsity_gains.stage_gains("k" * 64, 16, measure)
    assert len(calls) == 2 and again is first and other_batch is not first
