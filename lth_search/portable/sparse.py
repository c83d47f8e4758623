"""A trained ticket's network in sparse form: layers that compute with their non-zeros only.

A ticket at 95 % sparsity served as a dense network is no faster and no smaller than the
dense one. Here each pruned Linear or Conv2d can become a layer whose weight is a torch
sparse tensor (CSR or BSR; 2:4 semi-structured where CUDA supports it), so a forward pass
costs about the non-zeros: on one CPU thread a 300x784 layer at batch 64 takes 0.35x the
dense time at 95 % sparsity, and at batch 1 CSR pays only from about 95 %
(bench/sparse_inference.py measures every format and shape).

Which form pays depends on the layer's shape, its sparsity, the batch and the device, so
`choose_formats` measures it: each layer alone on the inputs it really sees, then the whole
network, which is kept in the fastest form measured (dense when nothing sparse wins).

The stored form (`sparse_tensors` / `load_sparse`) is safetensors-ready: a sparse layer
`L` stores `L.weight.crow_indices`, `L.weight.col_indices` (int32, as the CPU kernel takes them) and
`L.weight.values`; its format and shape go in the JSON spec (`layer_specs`). Plain torch
only: this file travels with the served model (see __init__.py).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

FORMATS = ("dense", "csr", "bsr", "semi_structured")
"""Forms of a layer's weight: dense, compressed sparse rows, block sparse rows, 2:4 (CUDA only)."""
SPARSE_FORMATS = FORMATS[1:]
BLOCK = 4
"""BSR block size (BLOCK x BLOCK); a block with one non-zero is stored whole."""
_PARTS = ("crow_indices", "col_indices", "values")


def semi_structured_available() -> bool:
    """2:4 semi-structured sparsity needs a CUDA device of compute capability 8.0 or newer."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


# Sparse layers ---------------------------------------------------------------------------------
def to_format(weight2d: torch.Tensor, fmt: str) -> torch.Tensor:
    """A 2-D weight in form `fmt` (its zeros dropped); ValueError for a form this device cannot use."""
    if fmt == "dense":
        return weight2d
    with warnings.catch_warnings():  # torch's "sparse support is in beta", once per process, for every user
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        if fmt == "csr":
            return _int32_indices(weight2d.to_sparse_csr())
        if fmt == "bsr":
            rows, cols = weight2d.shape
            if rows % BLOCK or cols % BLOCK:
                raise ValueError(f"bsr needs both sides divisible by {BLOCK}, got {tuple(weight2d.shape)}")
            return _int32_indices(weight2d.to_sparse_bsr((BLOCK, BLOCK)))
    if fmt == "semi_structured":
        if weight2d.device.type != "cuda" or not semi_structured_available():
            raise ValueError("2:4 semi-structured sparsity needs CUDA (compute capability >= 8.0)")
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(weight2d.half())
    raise ValueError(f"unknown sparse format {fmt!r}; formats: {', '.join(FORMATS)}")


def _int32_indices(weight: torch.Tensor) -> torch.Tensor:
    """A CSR/BSR weight with int32 indices where they fit: the CPU kernel (MKL) takes int32, and
    torch narrows int64 indices on every call (two copies a layer, ~7 % of a LeNet-300-100 forward)."""
    if weight.values().numel() >= 2**31 - 1 or max(weight.shape) >= 2**31 - 1:
        return weight
    build = torch.sparse_csr_tensor if weight.layout == torch.sparse_csr else torch.sparse_bsr_tensor
    return build(weight.crow_indices().to(torch.int32), weight.col_indices().to(torch.int32), weight.values(),
                 weight.shape, check_invariants=False)  # torch's own conversion made them: valid


class SparseLinear(nn.Module):
    """y = x W^T + b with W sparse, computed as (b + W x^T)^T, the product torch's sparse kernels have.

    The result is returned as a transposed view of a (features, batch) tensor; elementwise
    layers keep that layout, so the next sparse layer's `x^T` is contiguous for free (on one
    CPU thread this halves the time of a 300x784 CSR layer at batch 64 against transposing
    back and forth)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        super().__init__()
        self.fmt, self.out_features, self.in_features = fmt, weight.shape[0], weight.shape[1]
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.fmt == "semi_structured":
            out = F.linear(flat.to(self.weight.dtype), self.weight).to(x.dtype)
            out = out if self.bias is None else out + self.bias
        elif self.bias is None:
            out = (self.weight @ flat.T.contiguous()).T
        else:
            out = torch.addmm(self.bias[:, None], self.weight, flat.T.contiguous()).T
        return out.reshape(*lead, self.out_features)


class SparseConv2d(nn.Module):
    """A convolution as a sparse matrix times the unfolded input (im2col): groups=1 only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, conv: dict[str, Any]) -> None:
        super().__init__()
        self.fmt, self.conv = fmt, dict(conv)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        n, height, width = x.shape[0], x.shape[2], x.shape[3]
        kh, kw = c["kernel_size"]
        (ph, pw), (sh, sw), (dh, dw) = c["padding"], c["stride"], c["dilation"]
        out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (N, C*kh*kw, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C*kh*kw, N*L)
        if self.fmt == "semi_structured":
            out = (F.linear(cols.T.to(self.weight.dtype), self.weight).T).to(x.dtype)
        else:
            out = self.weight @ cols  # (out, N*L)
        out = out.reshape(-1, n, out_h * out_w).transpose(0, 1).reshape(n, -1, out_h, out_w)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _conv_options(module: nn.Conv2d) -> dict[str, Any]:
    if isinstance(module.padding, str):
        raise ValueError("string padding is not supported in sparse form")
    return {"kernel_size": list(module.kernel_size), "padding": list(module.padding),
            "stride": list(module.stride), "dilation": list(module.dilation), "out_channels": module.out_channels}


def convertible(module: nn.Module) -> bool:
    """Layers that have a sparse form: Linear and ungrouped, zero-padded Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) is nn.Linear  # not attention's out_proj (a subclass its parent reads directly)


def sparse_layer(module: nn.Module, fmt: str) -> nn.Module:
    """`module` (Linear or Conv2d) with its weight in form `fmt`; the module itself for dense."""
    if fmt == "dense":
        return module
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.Conv2d):
        return SparseConv2d(to_format(weight.reshape(weight.shape[0], -1), fmt), bias, fmt, _conv_options(module))
    return SparseLinear(to_format(weight, fmt), bias, fmt)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the layers that have a sparse form and hold zeros in their weight."""
    return [name for name, module in model.named_modules()
            if name and isinstance(module, (nn.Linear, nn.Conv2d)) and convertible(module)
            and bool((module.weight == 0).any())]


def sparsify(model: nn.Module, formats: dict[str, str] | str, inplace: bool = False) -> nn.Module:
    """`model` with the named layers in their form (`formats`: layer -> format, or one format for
    every candidate layer); layers a form does not fit (BSR of an odd shape) stay dense."""
    model = model if inplace else copy.deepcopy(model)
    chosen = formats if isinstance(formats, dict) else {name: formats for name in candidate_layers(model)}
    for name, fmt in chosen.items():
        try:
            _set_module(model, name, sparse_layer(model.get_submodule(name), fmt))
        except ValueError:
            continue
    return model


def layer_formats(model: nn.Module) -> dict[str, str]:
    """The form of every sparse layer of a sparsified model."""
    return {name: m.fmt for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}


# Stored form -------------------------------------------------------------------------------------
def sparse_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a sparsified model as plain (safetensors-ready) tensors: dense state entries
    as they are, a sparse weight as its CSR/BSR parts (int32 indices)."""
    tensors: dict[str, torch.Tensor] = {}
    sparse = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    for key, value in model.state_dict().items():
        if key in sparse:
            if sparse[key].fmt == "semi_structured":  # stored dense (half): rebuilt on the GPU at load
                tensors[key] = value.to_dense().float().contiguous()
                continue
            parts = (value.crow_indices(), value.col_indices(), value.values())
            for part, data in zip(_PARTS, parts):
                data = data.to(torch.int32) if part != "values" else data
                tensors[f"{key}.{part}"] = data.detach().cpu().contiguous()
        else:
            tensors[key] = value.detach().cpu().contiguous()
    return tensors


def layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """JSON-ready description of the sparse layers: format, the weight's 2-D shape, conv options."""
    specs: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            specs[name] = {"format": m.fmt, "shape": [m.out_features, m.in_features]}
        elif isinstance(m, SparseConv2d):
            specs[name] = {"format": m.fmt, "shape": list(m.weight.shape), "conv": m.conv}
    return specs


def load_sparse(model: nn.Module, specs: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """`model` (built dense, untrained) with `tensors` loaded and the layers of `specs` in their form.

    A semi-structured layer falls back to CSR where CUDA cannot run it."""
    state = dict(tensors)
    formats: dict[str, str] = {}
    for name, spec in specs.items():
        key, fmt = f"{name}.weight", spec["format"]
        module = model.get_submodule(name)
        if fmt in ("csr", "bsr"):
            crow, col, values = (state.pop(f"{key}.{part}") for part in _PARTS)
            build = torch.sparse_csr_tensor if fmt == "csr" else torch.sparse_bsr_tensor
            dense = build(crow.long(), col.long(), values, tuple(spec["shape"]), check_invariants=True).to_dense()
        else:
            dense = state.pop(key)
            fmt = fmt if semi_structured_available() and next(model.parameters()).is_cuda else "csr"
        state[key] = dense.reshape(module.weight.shape)
        formats[name] = fmt
    model.load_state_dict(state)
    return sparsify(model, formats, inplace=True)


# Measuring ---------------------------------------------------------------------------------------
def seconds_per_call(runs: dict[str, Callable[[], Any]], budget_s: float = 0.2, loop_s: float = 0.002,
                     hopeless: float = 4.0) -> dict[str, float]:
    """Seconds per call of each of `runs`: the fastest of many short timed loops (about `loop_s`
    each), the runs taking turns loop by loop, so a ratio between them is measured under the same
    load of the machine. The minimum is what the code costs; short loops make it likely that
    some of them ran without another process taking the core.

    The loops stop at `budget_s` by the clock (at least 3 rounds; a small budget shortens the
    loops so that 3 rounds fit), so a caller's budget is what the timing costs. A run whose
    single call takes more than `hopeless` times the fastest run's is timed by that call alone: a
    sparse convolution at batch 64 can take seconds a call, and the rounds would take minutes to
    say it loses."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    began = time.perf_counter()
    once: dict[str, float] = {}
    for name, run in runs.items():
        run()
        sync()
        start = time.perf_counter()
        run()
        sync()
        once[name] = max(time.perf_counter() - start, 1e-7)
    fastest = min(once.values())
    timed = {name: run for name, run in runs.items() if once[name] <= hopeless * fastest}
    loop_s = min(loop_s, budget_s / (3 * len(timed)))
    calls = {name: max(1, int(loop_s / once[name])) for name in timed}
    best = {name: (float("inf") if name in timed else once[name]) for name in runs}
    rounds = 0
    while rounds < 3 or time.perf_counter() - began < budget_s:
        for name, run in timed.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
        rounds += 1
    return best


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors hold in memory (a sparse weight: its indices and values)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
            total += sum(part.numel() * part.element_size() for part in parts)
        elif tensor.layout == torch.strided:
            total += tensor.numel() * tensor.element_size()
        else:  # semi-structured: packed values plus metadata
            total += sum(t.numel() * t.element_size() for t in (tensor.packed, tensor.meta) if t is not None)
    return total


@torch.no_grad()
def peak_forward_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Peak memory of one forward pass: the model's resident bytes plus the most its temporaries
    (activations, im2col buffers) held at once. On CUDA, torch's allocator peak; on CPU, the
    profiler's allocation record replayed in time order.

    The autograd profiler (the same Kineto record underneath), not `torch.profiler.profile`:
    that one's start asks `hasattr(torch, "_inductor")`, which imports the inductor (sympy and
    all) to read one cudagraphs flag, 1.4 s of a core the first time in every process (each
    trial actor, each `lth-search lineage`), against 17 ms. Same peaks (checked on the quickstart
    MLP dense and CSR, conv6 and the transformer)."""
    if example.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(example)
        torch.cuda.synchronize()
        return resident_bytes(model) + torch.cuda.max_memory_allocated() - base
    with _native_stderr_silenced(), torch.autograd.profiler.profile(use_cpu=True, profile_memory=True) as prof:
        model(example)
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.function_events
                     if event.self_cpu_memory_usage)
    held = top = 0
    for _, change in changes:
        held += change
        top = max(top, held)
    return resident_bytes(model) + top


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null meanwhile: torch's profiler (kineto) prints `profiler_start` /
    `profiler_stop` lines from C++ that no logging setting silences."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0].detach())) for name in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def choose_formats(model: nn.Module, example: torch.Tensor, formats: tuple[str, ...] = ("csr", "bsr"),
                   budget_s: float = 0.1, margin: float = 0.9) -> tuple[dict[str, str], dict[str, float]]:
    """(layer -> form, seconds per batch of each whole-model plan): the plans are dense, every
    candidate layer in one form, and each layer in the form fastest for it alone on the input
    it sees for `example`. Whole models are compared (layout effects between consecutive
    sparse layers count); a sparse plan wins when it takes at most `margin` of the dense time,
    so timing noise does not pick a form that does not pay."""
    model = model.eval()
    names = candidate_layers(model)
    if not names:
        return {}, {}
    inputs = _layer_inputs(model, names, example)
    mixed: dict[str, str] = {}
    for name in names:
        layer, x = model.get_submodule(name), inputs[name]
        runs = {"dense": (lambda layer=layer, x=x: layer(x))}
        for fmt in formats:
            try:
                runs[fmt] = lambda candidate=sparse_layer(layer, fmt), x=x: candidate(x)
            except ValueError:
                continue
        spent = seconds_per_call(runs, budget_s / len(names))
        best = min(spent, key=spent.get)
        if best != "dense":
            mixed[name] = best
    plans: dict[str, dict[str, str]] = {fmt: {name: fmt for name in names} for fmt in formats}
    if mixed and mixed not in plans.values():
        plans["mixed"] = mixed
    models = {plan: sparsify(model, chosen) for plan, chosen in plans.items()}
    runs = {"dense": lambda: model(example), **{plan: (lambda m=m: m(example)) for plan, m in models.items()}}
    spent = seconds_per_call(runs, budget_s * len(runs))
    best = chosen_plan(spent, margin)
    return ({} if best == "dense" else layer_formats(models[best])), spent


def chosen_plan(spent: dict[str, float], margin: float = 0.9) -> str:
    """The plan `choose_formats` keeps from its timings: the fastest sparse plan when it takes at most
    `margin` of the dense time, else "dense" (one rule for the choice and for what a spec says was chosen)."""
    sparse = {plan: seconds for plan, seconds in spent.items() if plan != "dense"}
    if not sparse or "dense" not in spent:
        return "dense"
    fastest = min(sparse, key=sparse.get)
    return fastest if sparse[fastest] <= margin * spent["dense"] else "dense"
