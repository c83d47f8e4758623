"""Packs: lineage-steps/s of R lineages trained as one batched pack vs one after another.

For R in {1, 2, 4, 8, 16}, R masked lineages (own seeds, ~79 % sparse masks) train
`--steps` steps each, as a pack (engine/packs.py, "bmm" for the MLP, "vmap" for conv2)
and with the sequential trainer (engine/train.py `train`, one member after another), in
this one run, interleaved after an untimed warm-up; each is the median of `--repeats`. Models: the
quickstart MLP 40-100-100-10 on MNIST-1D (batch 100, Adam), and conv2 on the 8x8 digits
(the conv data set that needs no download). CPU at `--threads` (default 1), and CUDA too
when present.

    python bench/packs.py [--steps 500] [--conv-steps 40] [--repeats 3] [--threads 1] [--sizes 1 2 4 8 16]
    python bench/packs.py --lineages 4 [--rounds 3] [--steps 500]

Acceptance (issue 14): the MLP at R = 8 on one CPU thread >= 2.0x the sequential trainer.

`--lineages S` instead times whole IMP lineages end to end (pruning, rewinding,
evaluation, stages in memory), as a confirmation would run them: the quickstart's
recipes at rewind steps 0 and 100 x S seeds, one `walk` over all of them against `Lineage.run`
one after another (`--rounds` rounds of `--steps` steps).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from lth_search.config import load_config
from lth_search.engine.data import load_dataset
from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.engine.models import build_model
from lth_search.engine.lineage.walk import walk
from lth_search.engine.packs import choose_mode

from pack_timing import lineage_steps_per_s

REPO = Path(__file__).resolve().parents[1]
MODELS = {"mlp": ("mnist1d", "bmm"), "conv2": ("digits", "vmap")}


def bench(model: str, device: str, sizes: list[int], steps: int, repeats: int) -> dict[int, float]:
    data_name, mode = MODELS[model]
    cfg = load_config(None, [f"model.name={model}", f"data.name={data_name}", f"train.steps={steps}"])
    data = load_dataset(cfg.data, cfg.seed, device)
    auto = choose_mode(build_model(cfg.model, data.input_shape, data.num_classes, 0), device)
    print(f"\n{model} on {data_name}, {device}, batch {cfg.train.batch_size}, {cfg.train.optimizer}, {steps} steps "
          f"per lineage, median of {repeats}; pack mode {mode} (auto picks {auto} here)")
    print(f"{'R':>3} {'sequential':>12} {'pack':>12} {'ratio':>7}   (lineage-steps/s)")
    ratios = {}
    for count in sizes:
        sequential, packed = lineage_steps_per_s(cfg.model, data, cfg.train, count, steps, ["sequential", mode], repeats)
        ratios[count] = packed / sequential
        print(f"{count:>3} {sequential:>12.0f} {packed:>12.0f} {ratios[count]:>6.2f}x", flush=True)
    return ratios


def bench_lineages(seeds: int, rounds: int, steps: int) -> None:
    """Wall time of 2 recipes x `seeds` seeds of whole lineages: one pack vs one after another."""
    base = load_config(REPO / "configs" / "quickstart.yaml",
                       [f"prune.rounds={rounds}", f"train.steps={steps}", "train.device=cpu"])
    cfgs = [base.with_choices({"rewind_step": k}).model_copy(update={"seed": seed})
            for k in (0, 100) for seed in range(seeds)]
    datasets = {seed: load_dataset(base.data, seed) for seed in range(seeds)}
    def build() -> list[Lineage]:  # one store per way, as in a search: a seed's dense stage is trained once
        store = MemoryStages()
        return [Lineage(cfg, store, datasets[cfg.seed]) for cfg in cfgs]

    Lineage(base.model_copy(update={"prune": base.prune.model_copy(update={"rounds": 0})}), None, datasets[0]).run()
    lineages = build()  # data loading, model building and the warm-up above are outside both timings
    began = time.perf_counter()
    alone = [lineage.run() for lineage in lineages]
    sequential = time.perf_counter() - began
    lineages = build()
    began = time.perf_counter()
    packed = walk(lineages)
    pack = time.perf_counter() - began
    gap = max(abs(a.rounds[-1].val_accuracy - p.rounds[-1].val_accuracy) for a, p in zip(alone, packed))
    print(f"\n{len(cfgs)} quickstart lineages (rewind 0 and 100 x {seeds} seeds), {rounds} rounds of {steps} steps, "
          f"1 thread: one after another {sequential:.1f} s, as packs {pack:.1f} s: {sequential / pack:.2f}x "
          f"(largest last-round val accuracy difference {100 * gap:.1f} pp)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="steps per lineage for the MLP")
    parser.add_argument("--conv-steps", type=int, default=40, help="steps per lineage for conv2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray trial with cpu: 1 uses 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lineages", type=int, default=0, metavar="S",
                        help="time whole lineages instead: 2 recipes x S seeds, packed vs one after another")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per lineage with --lineages")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    if args.lineages:
        bench_lineages(args.lineages, args.rounds, args.steps)
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for device in devices:
        for model in args.models:
            steps = args.steps if model == "mlp" else args.conv_steps
            results[(model, device)] = bench(model, device, args.sizes, steps, args.repeats)
    mlp = results.get(("mlp", "cpu"), {})
    if 8 in mlp:
        verdict = "holds" if mlp[8] >= 2.0 else "FAILS"
        print(f"\nacceptance: MLP R=8 on {args.threads} CPU thread(s): {mlp[8]:.2f}x the sequential trainer "
              f"(target >= 2.0x): {verdict}")


if __name__ == "__main__":
    main()
