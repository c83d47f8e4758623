"""The paper testbed on one GPU: does the search find late rewinding where the papers say it pays?

ResNet-20 on CIFAR-10 at learning rate 0.1 without warmup (configs/resnet20_cifar10.yaml),
started from rewind step 0, where Frankle et al. (2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis") find no matching subnetworks; the space holds rewind steps
0-2000, and rewinding to ~500 iterations matches to ~17 % of weights remaining. This runs
bench/science.py unchanged on it: a search, its selection and out-of-sample report, then
the chosen recipe against rewind 0 on held-out seeds, with the paired CI and the reported
gain beside it.

    python bench/gpu_science.py --heldout 8401,8402,8403 [--search-seeds 0] [--set KEY=VALUE ...]
    python bench/gpu_science.py --config configs/vgg16_cifar10.yaml --heldout ...   # VGG-16, rewind 0 vs ~1000

It needs a CUDA GPU and the CIFAR-10 python batches in <data.root>/cifar-10-batches-py/;
without either it stops at once with one line on stderr and exit status 2. Expect hours
on one GPU (160 epochs per stage, 10 lineages plus selection, report and held-out runs);
`--set train.steps=30ep --set "train.milestones=[15ep, 22ep]"` makes a shorter check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "resnet20_cifar10.yaml"))
    parser.add_argument("--search-seeds", default="0")
    parser.add_argument("--heldout", required=True, help="comma-separated held-out seeds (never used in development)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"bench/gpu_science.py: needs a CUDA GPU, and torch {torch.__version__} sees none "
              "(torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from lth_search.config import load_config

    cfg = load_config(args.config, args.overrides)
    batches = Path(cfg.data.root).expanduser() / "cifar-10-batches-py"
    if cfg.data.name == "cifar10" and not (batches / "data_batch_1").is_file():
        print(f"bench/gpu_science.py: no CIFAR-10 python batches in {batches} (set data.root)", file=sys.stderr)
        return 2
    import science

    forwarded = ["--config", args.config, "--search-seeds", args.search_seeds, "--heldout", args.heldout,
                 "--set", "prune.rewind_step=0", "--set", "train.device=cuda"]
    for override in args.overrides:
        forwarded += ["--set", override]
    if args.output_dir:
        forwarded += ["--output-dir", args.output_dir]
    return science.main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
