"""What a round's sparsity buys at inference: non-zeros, bytes, latency and peak memory against dense.

Accuracy says whether a ticket is good; these say whether it is worth having. For one
trained round (its end weights) this measures, in one process so the ratios share the
machine's load (portable/sparse.py `seconds_per_call`):

- `nonzero_params`: parameters that are not zero (biases and norms count; they are kept);
- `export_bytes` / `dense_bytes`: the CSR export (`best --format csr`'s `weights.safetensors`)
  against the dense weights;
- `latency_b1`, `latency_batch`: CSR forward time over dense at batch 1 and at
  `tracking.serve_batch` (the export's form, every pruned layer sparse; the registered model
  serves the form measured fastest, which may be dense);
- `peak_memory`: peak memory of one forward at `serve_batch`, CSR over dense (weights plus the
  most temporaries held at once).

Not part of any stage: timings differ run to run, and a stage's bytes must not. The
tracking layer logs them beside each round (`inference/...` metrics). Costs about
`budget_s` of timing per round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from lth_search.portable.export import write_safetensors
from lth_search.portable.sparse import (
    peak_forward_bytes,
    resident_bytes,
    seconds_per_call,
    sparse_tensors,
    sparsify,
)

METRICS = ("nonzero_params", "export_bytes", "dense_bytes", "latency_b1", "latency_batch", "peak_memory")
"""Logged as `inference/<name>` per round (tracking/layout.py)."""


@dataclass
class SparsityGains:
    nonzero_params: int
    export_bytes: int
    dense_bytes: int
    latency_b1: float
    latency_batch: float
    peak_memory: float

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def example_inputs(model: nn.Module, input_shape: tuple[int, ...], batch: int, vocab_size: int = 0) -> torch.Tensor:
    """Inputs of the model's shape (speed depends on shapes, not values): token ids or N(0, 1)."""
    generator = torch.Generator().manual_seed(0)
    if vocab_size:
        return torch.randint(vocab_size, (batch, *input_shape), generator=generator)
    return torch.randn((batch, *input_shape), generator=generator)


_TEMPORARIES: dict[tuple, int] = {}
"""The most bytes a forward's temporaries hold at once, by the network's layout (each tensor's
name, shape, dtype and layout: dense or CSR) and the input's shape. They depend on shapes,
not on how many weights are non-zero (measured: the quickstart MLP 76,800 B and conv6
318,767,104 B at 20, 50, 90 and 99 % sparsity), so one profiler run per layout serves every
round of every trial in the process; each run costs ~6 ms, as much as a tiny round's timing."""


def _peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak forward bytes: the model's resident bytes plus its layout's temporaries."""
    layout = tuple((name, tuple(t.shape), t.dtype, t.layout) for name, t in model.state_dict().items())
    key = (type(model).__qualname__, layout, tuple(x.shape), x.dtype, x.device.type)
    resident = resident_bytes(model)
    if key not in _TEMPORARIES:
        _TEMPORARIES[key] = peak_forward_bytes(model, x) - resident
    return resident + _TEMPORARIES[key]


STAGES_KEPT = 512
_BY_STAGE: dict[tuple[str, int], SparsityGains] = {}
"""The gains measured in this process by (stage key, batch), oldest first."""


def stage_gains(key: str, batch: int, measure: Callable[[], SparsityGains]) -> SparsityGains:
    """The gains of the stage `key` at `batch`, measured once per process: a stage key is its
    weights, so a lineage that reuses a stored round (46 % of the quickstart's steps) logs the
    gains already measured for it instead of timing the same network again."""
    found = _BY_STAGE.get((key, batch))
    if found is None:
        found = _BY_STAGE[(key, batch)] = measure()
        while len(_BY_STAGE) > STAGES_KEPT:
            _BY_STAGE.pop(next(iter(_BY_STAGE)))
    return found


@torch.no_grad()
def measure_gains(model: nn.Module, input_shape: tuple[int, ...], batch: int, budget_s: float = 0.2,
                  vocab_size: int = 0) -> SparsityGains:
    """The gains of trained `model` (pruned entries zero), on CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = model.to("cpu").eval()
        sparse = sparsify(model, "csr")
        ratios = []
        for size in (1, batch):
            x = example_inputs(model, input_shape, size, vocab_size)
            spent = seconds_per_call({"dense": lambda: model(x), "csr": lambda: sparse(x)}, budget_s / 2)
            ratios.append(spent["csr"] / spent["dense"])
        peak = _peak(sparse, x) / max(_peak(model, x), 1)
    finally:
        torch.set_num_threads(threads)
    dense_state = {k: v for k, v in model.state_dict().items()}
    return SparsityGains(
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        export_bytes=len(write_safetensors(sparse_tensors(sparse))),
        dense_bytes=len(write_safetensors(dense_state)),
        latency_b1=ratios[0], latency_batch=ratios[1], peak_memory=peak,
    )
