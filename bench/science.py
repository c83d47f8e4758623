"""The honest measure of the search: does the recipe it chooses beat plain IMP on seeds it never saw?

    python bench/science.py                                   # quickstart config, search seed 0
    python bench/science.py --search-seed 3 --heldout 7001,7002,7003,7004,7005
    python bench/science.py --config configs/quickstart.yaml --set search.num_trials=24

1. Runs a whole search (local Ray, no MLflow) with the config: trials, early stopping,
   confirmation on fresh seeds; the chosen recipe is the confirmed one.
2. Re-runs the chosen recipe and the default recipe (the config's prune values) as plain
   lineages on held-out seeds: seeds neither the search nor its confirmation used.
3. Prints, per held-out seed and over them: matching sparsity, compression 1/(1-s), test
   accuracy drop from dense at the matching round; then the geometric-mean compression of
   the chosen recipe over the default's, and the mean test drop of each.

When the search keeps the default recipe, the two re-runs are the same lineages (the
second comes from the store) and the ratio is 1.00x by construction: the search then
gained nothing, and cost nothing in quality. Held-out lineages run two at a time, one
torch thread each.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lth_search.api import run_lineage_command, run_search  # noqa: E402
from lth_search.config import ExperimentConfig, load_config, validate_config  # noqa: E402
from lth_search.runs.confirmation import confirm_seeds, recipe_text  # noqa: E402


def heldout_lineage(base: dict[str, Any], recipe: dict[str, Any], seed: int) -> dict[str, float]:
    """One held-out lineage: the recipe on `seed`; its score and the test drop at it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = ExperimentConfig.model_validate(base).with_choices(recipe)
    data = cfg.model_dump(mode="json")
    data["seed"] = seed
    data["resources"]["cpu"] = 1
    result = run_lineage_command(validate_config(data), track=False)
    best = result.best
    return {
        "sparsity": best.sparsity,
        "compression": 1.0 / (1.0 - best.sparsity),
        "test_drop": result.dense.test_accuracy - result.matching_test_accuracy,
        "rounds": len(result.rounds),
    }


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--heldout", default="7001,7002,7003,7004,7005", help="comma-separated held-out seeds")
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    heldout = [int(s) for s in args.heldout.split(",") if s.strip()]
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="lth-science-"))
    cfg = load_config(args.config, [*args.overrides, f"seed={args.search_seed}", f"output_dir={output}",
                                    "tracking.enabled=false"]).absolute()
    confirm = set(confirm_seeds(cfg))
    clash = sorted(set(heldout) & (confirm | {cfg.seed}))
    if clash:
        print(f"science: --heldout {clash} are seeds the search uses; choose others", file=sys.stderr)
        return 2

    began = time.time()
    summary = run_search(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    search_s = time.time() - began
    confirmation = summary.get("confirmation")
    default = cfg.default_recipe()
    chosen = confirmation["chosen"]["recipe"] if confirmation else (summary["best"] or {}).get("choices", default)

    base = cfg.model_dump(mode="json")
    jobs = [(name, recipe, seed) for seed in heldout for name, recipe in (("chosen", chosen), ("default", default))]
    began = time.time()
    with ProcessPoolExecutor(max_workers=2) as pool:
        futures = {(name, seed): pool.submit(heldout_lineage, base, recipe, seed) for name, recipe, seed in jobs}
        results = {key: future.result() for key, future in futures.items()}
    heldout_s = time.time() - began

    print(f"search seed {cfg.seed}: {summary['trials']} trials in {search_s:.0f} s; held-out seeds {heldout} in {heldout_s:.0f} s")
    print(f"chosen recipe:  {recipe_text(chosen)}" + ("  (the default)" if chosen == default else ""))
    print(f"default recipe: {recipe_text(default)}")
    print(f"{'seed':>8}  {'chosen sparsity':>15} {'compr':>6} {'test drop':>9}   {'default sparsity':>16} {'compr':>6} {'test drop':>9}")
    for seed in heldout:
        c, d = results[("chosen", seed)], results[("default", seed)]
        print(f"{seed:>8}  {100 * c['sparsity']:14.1f}% {c['compression']:5.2f}x {100 * c['test_drop']:+8.2f}pp"
              f"   {100 * d['sparsity']:15.1f}% {d['compression']:5.2f}x {100 * d['test_drop']:+8.2f}pp")
    chosen_c = geomean([results[("chosen", s)]["compression"] for s in heldout])
    default_c = geomean([results[("default", s)]["compression"] for s in heldout])
    chosen_drop = sum(results[("chosen", s)]["test_drop"] for s in heldout) / len(heldout)
    default_drop = sum(results[("default", s)]["test_drop"] for s in heldout) / len(heldout)
    print(f"geometric-mean compression: chosen {chosen_c:.2f}x, default {default_c:.2f}x -> "
          f"ratio chosen/default {chosen_c / default_c:.2f}x")
    print(f"mean test drop at the matching round: chosen {100 * chosen_drop:+.2f} pp, default {100 * default_drop:+.2f} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
