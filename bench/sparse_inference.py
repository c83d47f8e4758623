"""What sparsity buys at inference: latency and memory of each sparse form against dense (issue 23).

For the MLP, LeNet-300-100, Conv-6 and ResNet-20 shapes, pruned by global magnitude to
50/80/90/95/98 % (random initial weights: only the pattern's density matters for speed),
each network runs in every form of lth_search/portable/sparse.py: dense, CSR, BSR (4x4
blocks) and 2:4 semi-structured (only where CUDA supports it), at batch 1 and 64. Ratios
are against the dense network measured in the same run, the forms taking turns loop by loop
(`seconds_per_call`), so the machine's other load falls on all of them alike.

Columns: `time` = seconds per batch / dense seconds per batch; `bytes` = the form's
resident weight bytes / dense; `peak` = peak memory of one forward (weights plus the most
temporaries held at once) / dense; `maxdiff` = max |logit - dense logit|; `argmax` = whether
every prediction equals dense's.

The acceptance line (issue 23, 1): a LeNet-300-100 ticket at ~96 % sparsity (hidden layers
at the rate, the output layer at half of it, as the paper prunes) exported as CSR through
`lth-search best --format csr`'s own files and loader, batch 64, one thread.

    .venv/bin/python bench/sparse_inference.py                   # CPU, one thread
    .venv/bin/python bench/sparse_inference.py --device cuda     # the same on a GPU
    .venv/bin/python bench/sparse_inference.py --models lenet_300_100 --sparsities 96 --batches 64
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from lth_search.portable.architectures import build_architecture
from lth_search.portable.export import load_export, write_export
from lth_search.portable.sparse import (
    SPARSE_FORMATS,
    peak_forward_bytes,
    resident_bytes,
    seconds_per_call,
    semi_structured_available,
    sparsify,
)

SHAPES = {  # name -> (input shape, options)
    "mlp": ((40,), {"widths": [100, 100]}),
    "lenet_300_100": ((1, 28, 28), {}),
    "conv6": ((3, 32, 32), {}),
    "resnet20": ((3, 32, 32), {"width": 16}),
}


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, output_ratio: float = 1.0, seed: int = 0) -> nn.Module:
    """Zero the smallest weights: per layer at `sparsity` (the last layer at `sparsity * output_ratio`).

    Weights are redrawn first from N(0, 1/fan_in) so layers are on one scale, as trained nets are."""
    generator = torch.Generator().manual_seed(seed)
    layers = prunable(model)
    last = list(layers)[-1]
    for name, weight in layers.items():
        fan_in = weight[0].numel()
        weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(fan_in))
        rate = sparsity * (output_ratio if name == last else 1.0)
        k = int(round(rate * weight.numel()))
        if k:
            threshold = weight.abs().flatten().kthvalue(k).values
            weight[weight.abs() <= threshold] = 0
    return model.eval()


def forms(model: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """Every form of `model` this device can run."""
    out = {"dense": model}
    for fmt in SPARSE_FORMATS:
        if fmt == "semi_structured" and not (device.type == "cuda" and semi_structured_available()):
            continue
        out[fmt] = sparsify(model, fmt)
    return out


def compare(models: dict[str, nn.Module], x: torch.Tensor, budget_s: float) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        reference = models["dense"](x)
        times = seconds_per_call({name: (lambda m=m: m(x)) for name, m in models.items()}, budget_s)
        rows = {}
        for name, model in models.items():
            logits = model(x).float()
            rows[name] = {
                "time": times[name] / times["dense"],
                "bytes": resident_bytes(model) / resident_bytes(models["dense"]),
                "peak": peak_forward_bytes(model, x) / peak_forward_bytes(models["dense"], x),
                "maxdiff": float((logits - reference).abs().max()),
                "argmax": bool(torch.equal(logits.argmax(1), reference.argmax(1))),
                "dense_s": times["dense"],
            }
    return rows


def table(args: argparse.Namespace, device: torch.device) -> None:
    print(f"{'model':<14} {'sparse':>6} {'batch':>5} {'form':<16} {'time':>6} {'bytes':>6} {'peak':>6} "
          f"{'maxdiff':>8} argmax  (ratios to dense; dense time per batch)")
    for name in args.models:
        shape, options = SHAPES[name]
        for percent in args.sparsities:
            model = magnitude_prune(build_architecture(name, shape, 10, **options), percent / 100).to(device)
            models = forms(model, device)
            for batch in args.batches:
                x = torch.randn(batch, *shape, device=device)
                for form, row in compare(models, x, args.budget).items():
                    extra = f"  {1e3 * row['dense_s']:.3f} ms" if form == "dense" else ""
                    print(f"{name:<14} {percent:>5}% {batch:>5} {form:<16} {row['time']:>6.3f} {row['bytes']:>6.3f} "
                          f"{row['peak']:>6.3f} {row['maxdiff']:>8.1e} {'yes' if row['argmax'] else 'NO':>6}{extra}",
                          flush=True)


def acceptance(args: argparse.Namespace, device: torch.device) -> None:
    """Issue 23, acceptance 1: the exported CSR ticket, loaded by its own loader, against dense."""
    model = magnitude_prune(build_architecture("lenet_300_100", (1, 28, 28), 10), 0.965, output_ratio=0.5)
    kept = sum(int(torch.count_nonzero(w)) for w in prunable(model).values())
    total = sum(w.numel() for w in prunable(model).values())
    spec = {"architecture": "lenet_300_100", "input_shape": [1, 28, 28], "num_classes": 10, "options": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_export(Path(tmp) / "csr", spec, model.state_dict(), "csr")
        served = load_export(folder).to(device)
        dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        export_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    model = model.to(device)
    x = torch.randn(64, 1, 28, 28, device=device)
    rows = compare({"dense": model, "csr": served}, x, args.budget * 3)
    csr = rows["csr"]
    print(f"\nacceptance 1: LeNet-300-100 at {100 * (1 - kept / total):.2f}% sparsity, exported as CSR "
          f"({export_bytes} B vs {dense_bytes} B dense), batch 64, {torch.get_num_threads()} thread(s), {device}: "
          f"time {csr['time']:.3f}x dense ({1e3 * csr['dense_s']:.3f} ms dense), max |logit diff| "
          f"{csr['maxdiff']:.2e}, predictions identical: {csr['argmax']}  -> "
          f"{'held' if csr['time'] <= 0.4 and csr['argmax'] else 'NOT held'} (needs <= 0.4x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[50, 80, 90, 95, 98])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of timing per comparison")
    parser.add_argument("--no-table", action="store_true", help="only the acceptance line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    if not args.no_table:
        table(args, device)
    acceptance(args, device)


if __name__ == "__main__":
    main()
