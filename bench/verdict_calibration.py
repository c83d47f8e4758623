"""Is the verdict calibrated? Pass rates of networks whose true margin is known, against the nominal.

    python bench/verdict_calibration.py --draws 24 --seed-base 910000 --out /tmp/calibration

A draw is one quickstart split (its seed) with `replicates + 1` dense networks trained on
it (seeds s, s+1, ...): the last is judged as if it were a ticket against the others, so
its true margin is 0, and the verdict's standard error has the same parts it has in a
search (val sampling, the replicates' seed spread). Known deficits are made exactly by
marking d * n of its correct val examples wrong. Per draw and per case:

- boundary, tolerance 0: true margin 0 = -tolerance. A test at confidence c passes with
  probability 1 - c (the rate at which a ticket as bad as the tolerance allows is called
  matching); it refuses with probability c.
- boundary, tolerance t: a deficit of exactly t under tolerance t: the same promise.
- as good as dense, tolerance t: true margin 0, passes with Phi(t / se - z) (the power).
- twice the tolerance: deficit 2t under tolerance t: passes (almost) never.

Printed: each case's pass rate with a 95 % Wilson interval beside the rate the test
promises, and the margins' standard errors. Dense stages go through a store under
`--out`, so a rerun with more draws trains only the new ones. Seeds: pick a base nobody
used (the default is for development; docs/science.md lists the ones reported).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def wilson(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial rate."""
    if n == 0:
        return 0.0, 1.0
    p = passes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--draws", type=int, default=24, help="independent splits (at least 20)")
    parser.add_argument("--seed-base", type=int, default=910_000, help="draw i uses split seed base + 10 i")
    parser.add_argument("--replicates", type=int, default=None, help="the bar's dense replicates (default: the config's)")
    parser.add_argument("--tolerance", type=float, default=None, help="default: the config's search.tolerance")
    parser.add_argument("--confidence", type=float, default=None, help="default: the config's search.confidence")
    parser.add_argument("--out", default="/tmp/lth-verdict-calibration", help="folder of the store (reused)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override KEY=VALUE")
    args = parser.parse_args(argv)

    import torch

    from lth_search.config import load_config
    from lth_search.engine.lineage.objective import paired_verdict, unpack_correct
    from lth_search.engine.lineage.walk import lineages_for, walk
    from lth_search.store.stage_store import StageStore

    torch.set_num_threads(1)
    base = load_config(args.config, args.overrides)
    k = args.replicates or base.prune.dense_replicates
    tolerance = base.search.tolerance if args.tolerance is None else args.tolerance
    confidence = base.search.confidence if args.confidence is None else args.confidence
    cfgs = [load_config(args.config, [*args.overrides, f"seed={args.seed_base + 10 * i}", "prune.rounds=0",
                                      f"prune.dense_replicates={k + 1}", f"output_dir={args.out}",
                                      "tracking.enabled=false"]).absolute() for i in range(args.draws)]
    began = time.perf_counter()
    lineages = lineages_for(cfgs, StageStore(str(Path(args.out) / "store")))
    walk(lineages)
    print(f"{args.draws} draws x {k + 1} dense networks ready in {time.perf_counter() - began:.0f} s "
          f"(seeds {args.seed_base}..{args.seed_base + 10 * (args.draws - 1)} step 10)")

    rng = np.random.default_rng(args.seed_base)
    cases = {  # name -> (tolerance, deficit, promised pass rate)
        "boundary, tolerance 0": (0.0, 0.0, 1 - confidence),
        f"boundary, deficit {100 * tolerance:g} pp": (tolerance, tolerance, 1 - confidence),
        "as good as dense": (tolerance, 0.0, None),
        f"deficit {200 * tolerance:g} pp": (tolerance, 2 * tolerance, 0.0),
    }
    passes = {name: 0 for name in cases}
    ses = []
    for lineage in lineages:
        correct = [unpack_correct(e.metrics["val_correct"]["bits"], e.metrics["val_correct"]["n"])
                   for e in lineage.replicates]
        judged, bar = correct[-1], correct[:-1]
        for name, (tol, deficit, _) in cases.items():
            ticket = judged.copy()
            if deficit:
                right = np.flatnonzero(ticket)
                ticket[rng.choice(right, size=round(deficit * ticket.size), replace=False)] = False
            verdict = paired_verdict(ticket, bar, tol, confidence)
            passes[name] += verdict.matches
            if name == "as good as dense":
                ses.append(verdict.se)
    n = len(lineages)
    z = statistics.NormalDist().inv_cdf(confidence)
    se = statistics.fmean(ses)
    print(f"verdict: lower bound of the margin at confidence {confidence:g} (z {z:.2f}) >= -tolerance "
          f"{100 * tolerance:g} pp; {k} replicates; margin standard error {100 * se:.2f} pp "
          f"(range {100 * min(ses):.2f}-{100 * max(ses):.2f})")
    print(f"{'case':<28} {'passed':>7} {'rate':>6} {'95% CI':>15} {'promised':>9}")
    for name, (tol, _, promised) in cases.items():
        if promised is None:
            promised = statistics.NormalDist().cdf(tol / se - z)
        low, high = wilson(passes[name], n)
        print(f"{name:<28} {passes[name]:>3}/{n:<3} {100 * passes[name] / n:5.1f}% "
              f"[{100 * low:5.1f}, {100 * high:5.1f}]% {100 * promised:8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
