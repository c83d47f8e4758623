"""The honest measure of the search: does the recipe it chooses beat plain IMP on seeds it never saw,
and does the gain it reports hold there?

    python bench/science.py --search-seeds 0,1 --heldout 8101,8102,8103,8104,8105,8106
    python bench/science.py --config configs/power_check.yaml --search-seeds 0,1 --heldout ...

For each search seed:

1. runs a whole search (local Ray, no MLflow) with the config: trials, early stopping,
   selection on fresh seeds, and, when a searched recipe won, its gain over the default
   measured on reporting seeds (the gain the console prints, with its 95 % interval);
2. walks the chosen recipe and the default recipe (the config's prune values) as plain
   lineages on `--heldout` seeds, which neither the search, its selection nor its report
   used (all lineages of a search seed as one walk: packs, stages through one store);
3. prints per held-out seed the matching sparsity and test drop of both, then the held-out
   ratio (geometric-mean compression, chosen over default) with its paired 95 % interval
   and wins, beside the reported gain, and whether the reported interval covers it.

When the search keeps the default, both held-out lineages are the same and the ratio is
1.00x by construction: the search gained nothing and claimed nothing. Report only seed sets
you did not look at while developing (docs/science.md lists the ones used).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lth_search.api import run_search  # noqa: E402
from lth_search.config import ExperimentConfig, load_config, validate_config  # noqa: E402
from lth_search.runs.confirmation import PairedRatio, RecipeScore, confirm_seeds, recipe_text, report_seeds  # noqa: E402


def heldout_scores(cfg: ExperimentConfig, recipes: dict[str, dict[str, Any]], seeds: list[int],
                   store_root: Path) -> dict[str, RecipeScore]:
    """Every recipe on every held-out seed, walked to its end as one walk (packs), through one store."""
    import torch

    from lth_search.engine.lineage.walk import lineages_for, walk
    from lth_search.store.stage_store import StageStore

    torch.set_num_threads(1)
    plan = [(name, seed) for name in recipes for seed in seeds]
    cfgs = []
    for name, seed in plan:
        data = cfg.with_choices(recipes[name]).model_dump(mode="json")
        data["seed"] = seed
        cfgs.append(validate_config(data))
    results = walk(lineages_for(cfgs, StageStore(str(store_root))))
    scores = {name: RecipeScore(recipes[name], name == "default") for name in recipes}
    for (name, seed), result in zip(plan, results):
        score = scores[name]
        score.seeds.append(seed)
        score.sparsities.append(result.best.sparsity)
        score.test_drops.append(result.dense.test_accuracy - result.matching_test_accuracy)
    return scores


def one_search(args: argparse.Namespace, search_seed: int, heldout: list[int], output: Path) -> dict[str, Any] | None:
    cfg = load_config(args.config, [*args.overrides, f"seed={search_seed}", f"output_dir={output / f'search-{search_seed}'}",
                                    "tracking.enabled=false"]).absolute()
    used = set(confirm_seeds(cfg)) | set(report_seeds(cfg)) | set(range(cfg.seed, cfg.seed + cfg.prune.dense_replicates))
    clash = sorted(set(heldout) & used)
    if clash:
        print(f"science: --heldout {clash} are seeds search seed {search_seed} uses; choose others", file=sys.stderr)
        return None
    began = time.time()
    summary = run_search(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    search_s = time.time() - began
    confirmation = summary.get("confirmation") or {}
    default = cfg.default_recipe()
    chosen = confirmation["chosen"]["recipe"] if confirmation else (summary["best"] or {}).get("choices", default)
    began = time.time()
    scores = heldout_scores(cfg, {"chosen": chosen, "default": default}, heldout, output / "heldout-store")
    ratio = PairedRatio.of(scores["chosen"], scores["default"], 0.95)
    reported = confirmation.get("reported")
    low, high = confirmation.get("gain_ci", [1.0, 1.0])
    high = math.inf if high is None else high
    print(f"search seed {search_seed}: {summary['trials']} trials, search and confirmation {search_s:.0f} s; "
          f"held-out seeds {heldout} in {time.time() - began:.0f} s")
    print(f"  chosen recipe:  {recipe_text(chosen)}" + ("  (the default)" if chosen == default else ""))
    print(f"  {'seed':>8}  {'chosen':>8} {'drop':>8}   {'default':>8} {'drop':>8}")
    for i, seed in enumerate(heldout):
        c, d = scores["chosen"], scores["default"]
        print(f"  {seed:>8}  {100 * c.sparsities[i]:7.1f}% {100 * c.test_drops[i]:+7.2f}pp"
              f"   {100 * d.sparsities[i]:7.1f}% {100 * d.test_drops[i]:+7.2f}pp")
    covered = low - 1e-9 <= ratio.gain <= high + 1e-9
    print(f"  held-out ratio chosen/default {ratio.gain:.2f}x (95% CI {ratio.low:.2f}-{ratio.high:.2f}), "
          f"better on {ratio.wins}/{ratio.seeds}; reported gain {confirmation.get('gain', 1.0):.2f}x "
          f"(95% CI {low:.2f}-{high:.2f}{'' if reported else ', default kept'}): "
          f"{'covers' if covered else 'does NOT cover'} the held-out ratio")
    return {"search_seed": search_seed, "chosen": chosen, "heldout_ratio": ratio.to_json(),
            "reported_gain": confirmation.get("gain", 1.0), "reported_ci": [low, high], "covered": covered}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--search-seeds", default="0", help="comma-separated search seeds")
    parser.add_argument("--heldout", required=True, help="comma-separated held-out seeds (never used in development)")
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    args = parser.parse_args(argv)
    heldout = [int(s) for s in args.heldout.split(",") if s.strip()]
    output = Path(args.output_dir or tempfile.mkdtemp(prefix="lth-science-"))
    rows = []
    for search_seed in [int(s) for s in args.search_seeds.split(",") if s.strip()]:
        row = one_search(args, search_seed, heldout, output)
        if row is None:
            return 2
        rows.append(row)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
