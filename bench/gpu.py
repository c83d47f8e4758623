"""GPU throughput: steps/s of the MLP, conv6, ResNet-20 and a ViT, alone and in packs of 4 and 16.

Run it unchanged on one CUDA GPU (it takes a few minutes, well under 5): it needs no
data files (inputs are random tensors of the real shapes, which is all a step's speed
depends on) and prints, per model,

- single: steps/s of one masked lineage with the ordinary trainer (engine/train.py),
- dense/masked: steps/s of the dense network over the ~79 %-sparse masked one (the cost
  of re-applying the mask after every step; 1.00 means free),
- pack 4, pack 16: lineage-steps/s of packs (engine/packs.py, batched on the GPU) and
  their gain over single;
- one key: whether a member trained alone (a pack of one) and at position 2 of a pack of 4
  ends with byte-identical weights (one stage key, one result; if "no", the pack size must
  enter the stage key on this device).

Recipes: MLP 40-100-100-10 batch 100 Adam 1e-2 (quickstart); conv6 batch 60 Adam 3e-4
(Frankle & Carbin); ResNet-20 batch 128 SGD 0.1 momentum 0.9 wd 1e-4 (open_lth); the ViT of
configs/vit_cifar10.yaml (patch 4, d_model 192, 6 layers, 3 heads) batch 128 AdamW 1e-3.
Without CUDA it stops at once with one line on stderr and exit status 2.

    python bench/gpu.py [--repeats 3] [--scale 1.0] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

NO_CUDA = "bench/gpu.py: needs a CUDA GPU, and torch {version} sees none (torch.cuda.is_available() is False)"

# model name, input shape, training overrides, steps timed per lineage
CASES = [
    ("mlp", (40,), ["train.optimizer=adam", "train.lr=0.01", "train.batch_size=100"], 300),
    ("conv6", (3, 32, 32), ["train.optimizer=adam", "train.lr=0.0003", "train.batch_size=60"], 60),
    ("resnet20", (3, 32, 32), ["train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9", "train.weight_decay=0.0001",
                               "train.batch_size=128"], 30),
    ("vit", (3, 32, 32), ["train.optimizer=adamw", "train.lr=0.001", "train.batch_size=128", "model.patch=4",
                          "model.d_model=192", "model.heads=3", "model.layers=6", "model.ff_width=384"], 30),
]


def synthetic(input_shape: tuple[int, ...], device: torch.device, size: int = 4096):
    """A Dataset of random inputs and labels of the given shape (speed does not depend on content)."""
    from lth_search.engine.data import Dataset, Split

    generator = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randn(n, *input_shape, generator=generator).to(device),  # noqa: E731
                            torch.randint(0, 10, (n,), generator=generator).to(device))
    return Dataset("synthetic", split(size), split(256), split(256), 10, tuple(input_shape), "synthetic")


def same_bytes_alone_and_packed(cfg, data, mode: str, steps: int) -> bool:
    """Member 2 of a pack of 4 against the same member alone: identical weights, bit for bit?"""
    from lth_search.engine.models import build_model
    from lth_search.engine.packs import PackMember, train_pack

    template = build_model(cfg.model, data.input_shape, data.num_classes, 0).to(data.train.x.device)
    members = [PackMember(build_model(cfg.model, data.input_shape, data.num_classes, seed).state_dict(), data, seed,
                          0, steps) for seed in range(4)]
    alone = train_pack(template, [members[2]], cfg.train, mode)[0].state
    packed = train_pack(template, members, cfg.train, mode)[2].state
    return all(torch.equal(alone[name], packed[name]) for name in alone)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the timed steps (shorter or longer runs)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda; cpu only to try the script (briefly, with --scale) where there is no GPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2

    from lth_search.config import load_config
    from lth_search.engine.models import build_model
    from lth_search.engine.packs import choose_mode
    from pack_timing import lineage_steps_per_s

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"torch {torch.__version__}, {where}; steps/s, median of {args.repeats}")
    print(f"{'model':<9} {'single':>8} {'dense/masked':>13} {'pack 4':>9} {'pack 16':>9}  (lineage-steps/s; gain vs single)")
    began = time.perf_counter()
    for name, shape, overrides, steps in CASES:
        steps = max(1, int(steps * args.scale))
        cfg = load_config(None, [f"model.name={name}", f"train.steps={steps}", f"train.device={args.device}", *overrides])
        data = synthetic(shape, device)
        mode = choose_mode(build_model(cfg.model, data.input_shape, data.num_classes, 0), device)
        rate = lambda count, modes, masked=True: lineage_steps_per_s(  # noqa: E731
            cfg.model, data, cfg.train, count, steps, modes, args.repeats, masked)
        dense, = rate(1, ["sequential"], masked=False)
        single, = rate(1, ["sequential"])
        pack4, = rate(4, [mode])
        pack16, = rate(16, [mode])
        same = same_bytes_alone_and_packed(cfg, data, mode, max(2, steps // 3))
        print(f"{name:<9} {single:>8.1f} {dense / single:>13.2f} {pack4:>9.1f} {pack16:>9.1f}  "
              f"({pack4 / single:.1f}x, {pack16 / single:.1f}x; pack mode {mode}; one key: {'yes' if same else 'NO'})",
              flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
