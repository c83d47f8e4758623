"""Training throughput: our masked trainer against a plain dense PyTorch loop.

Both loops train the same model (MNIST-1D MLP by default) with the same batch size,
optimizer and device-resident data; ours additionally re-applies an 80 %-sparse mask
after every step, schedules the lr by step and draws seeded batches. Each is timed
several times, interleaved, in this one run; the medians and their ratio are printed.

    python bench/throughput.py [--steps 1500] [--repeats 5] [--model mlp] [--batch 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lth_search.config import load_config
from lth_search.engine.data import load_dataset, resolve_device
from lth_search.engine.models import build_model
from lth_search.engine.pruning import ones_mask, prune_round
from lth_search.engine.train import train


def plain_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, batch: int, steps: int) -> float:
    """The baseline: the shortest honest dense loop (random batches by index, Adam)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    per_epoch = len(x) // batch
    began = time.perf_counter()
    for step in range(steps):
        idx = perm[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        loss = loss_fn(model(x.index_select(0, idx)), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    float(loss.detach())  # wait for the device, as ours does once at the end
    return steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray trial with cpu: 1 uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(None, [f"model.name={args.model}", f"train.batch_size={args.batch}",
                             f"train.steps={args.steps}", f"train.device={args.device}"])
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data, cfg.seed, device)
    model = build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed).to(device)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    mask = ones_mask(model)
    for _ in range(7):  # ~79 % sparse, as after several IMP rounds
        mask = prune_round(weights, mask, model.prunable, 0.2)
    mask = {name: m.to(device) for name, m in mask.items()}
    init = {k: v.clone() for k, v in model.state_dict().items()}

    ours, plain = [], []
    for repeat in range(args.repeats + 1):  # the first pass warms both up and is dropped
        model.load_state_dict(init)
        result = train(model, data, cfg.train, cfg.seed, 0, args.steps, mask=mask)
        model.load_state_dict(init)
        base = plain_loop(model, data.train.x, data.train.y, cfg.train.lr, args.batch, args.steps)
        if repeat:
            ours.append(result.steps_per_s)
            plain.append(base)
    ours_median, plain_median = statistics.median(ours), statistics.median(plain)
    print(f"device {device}, model {args.model}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}")
    print(f"masked trainer (lth-search): {ours_median:8.0f} steps/s  (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"plain dense PyTorch loop:    {plain_median:8.0f} steps/s  (runs: {', '.join(f'{v:.0f}' for v in plain)})")
    print(f"ratio masked/plain: {ours_median / plain_median:.3f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
