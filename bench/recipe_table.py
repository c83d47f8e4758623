"""Recipes against a config's own recipe, seed by seed: is there anything in the space worth finding?

    python bench/recipe_table.py --config configs/power_check.yaml --seeds 5001,5002,5003,5004,5005 --space
    python bench/recipe_table.py --config configs/quickstart.yaml --seeds 5001,5002,5003 \\
        --recipes '[{"rate": 0.1}, {"rate": 0.05}]' --set prune.rounds=40

Every (recipe, seed) lineage is walked to its end with the product's own walk (engine/lineage
walk.py: dense replicates, rounds, the paired verdict, patience), many lineages at once as
batched packs, stages kept in a StageStore under --out so a rerun (or a wider table) reuses
them. A lineage's score is its matching sparsity s (`LineageResult.best`), as in a search.

Per recipe it prints the matching sparsity on every seed, the geometric-mean compression
1/(1-s), its ratio to the config's own recipe (the config's prune values, always the first
row) with a paired 95 % t-interval on the per-seed log ratios, and wins/ties over the seeds.
This is how a testbed is checked to hold a better recipe than its own (docs/science.md
"Testbeds"), and how a space is pruned: seeds used here are development seeds, never the
seeds a claim is reported on.

Work is split over at most 2 processes (one torch thread each), by contiguous runs of
(seed, recipe) so a seed's dense stages are trained once (a shared one waits on the store's
lease, then is reused).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from lth_search.config import ExperimentConfig, load_config, validate_config  # noqa: E402
from lth_search.errors import ConfigError  # noqa: E402
from lth_search.runs.confirmation import recipe_text  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}
"""Two-sided 95 % Student t quantiles by degrees of freedom (the stdlib has no t distribution)."""


def t_quantile(df: int) -> float:
    if df in T_975:
        return T_975[df]
    below = max(k for k in T_975 if k <= df)
    return T_975[below] if df < 30 else 1.96 + (T_975[30] - 1.96) * 30 / df


def space_recipes(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every recipe of the config's search.space (the product of its candidate lists)."""
    values = cfg.searched_values()
    names = list(values)
    return [dict(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]


def read_recipes(text: str) -> list[dict[str, Any]]:
    """--recipes: a JSON/YAML list of choice dicts, inline or in a file."""
    path = Path(text)
    raw = yaml.safe_load(path.read_text() if path.is_file() else text)
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ValueError("--recipes must be a list of choice dicts, e.g. '[{\"rate\": 0.1}]'")
    return raw


def walk_group(base: dict[str, Any], runs: list[tuple[dict[str, Any], int]], store_uri: str) -> list[dict[str, Any]]:
    """Walk the (recipe, seed) lineages of one process together; a summary per lineage, in order."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from lth_search.engine.lineage.walk import lineages_for, walk
    from lth_search.store.stages import StageStore

    cfgs = []
    for recipe, seed in runs:
        data = ExperimentConfig.model_validate(base).with_choices(recipe).model_dump(mode="json")
        data["seed"] = seed
        data["resources"]["cpu"] = 1
        cfgs.append(validate_config(data, source="recipe table config"))
    results = walk(lineages_for(cfgs, StageStore(store_uri)))
    out = []
    for result in results:
        best = result.best
        out.append({
            "sparsity": best.sparsity, "round": best.round, "rounds": len(result.rounds),
            "stop": result.stop_reason, "steps_executed": result.steps_executed, "steps_reused": result.steps_reused,
            "test_drop": result.dense.test_accuracy - result.matching_test_accuracy,
            "dense_val": result.dense.val_accuracy, "baseline_val": result.dense.baseline_val_accuracy,
            "margins": [r.margin for r in result.rounds], "margin_se": [r.margin_se for r in result.rounds],
        })
    return out


def split(runs: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Contiguous, nearly equal runs of the (seed, recipe)-sorted list: a seed stays in one part
    unless it must straddle two."""
    ordered = sorted(runs, key=lambda run: (run[1], run[0]))
    size = math.ceil(len(ordered) / parts)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def compression(sparsity: float) -> float:
    return 1.0 / (1.0 - sparsity)


def ratio_ci(own: list[float], other: list[float]) -> tuple[float, float, float]:
    """Geometric-mean compression ratio other/own with a paired 95 % t-interval on per-seed log ratios."""
    logs = [math.log(compression(o) / compression(d)) for o, d in zip(other, own)]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return math.exp(mean), float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def changed(own: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """The choices of `recipe` that differ from the config's own (how a row is named)."""
    return {k: v for k, v in recipe.items() if own.get(k) != v}


def table(recipes: list[dict[str, Any]], seeds: list[int], scores: dict[tuple[int, int], dict[str, Any]]) -> list[str]:
    lines = [f"{'#':>3} {'recipe':<58} " + " ".join(f"{s:>6}" for s in seeds)
             + f" {'geo':>6} {'ratio':>6} {'95% CI':>13} {'wins':>5} {'ties':>4}"]
    own = [scores[(0, s)]["sparsity"] for s in seeds]
    for index, recipe in enumerate(recipes):
        sp = [scores[(index, s)]["sparsity"] for s in seeds]
        geo = math.exp(sum(math.log(compression(x)) for x in sp) / len(sp))
        ratio, low, high = ratio_ci(own, sp)
        wins = sum(a > b + 1e-9 for a, b in zip(sp, own))
        ties = sum(abs(a - b) <= 1e-9 for a, b in zip(sp, own))
        name = "own: " + recipe_text(recipe) if index == 0 else recipe_text(changed(recipes[0], recipe))
        lines.append(f"{index:>3} {name[:58]:<58} " + " ".join(f"{100 * x:5.1f}%" for x in sp)
                     + f" {geo:5.2f}x {ratio:5.2f}x {low:5.2f}-{high:<6.2f}  {wins}/{len(seeds)} {ties:>4}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", required=True, help="comma-separated development seeds")
    parser.add_argument("--recipes", help="a JSON/YAML list of choice dicts (inline or a file)")
    parser.add_argument("--space", action="store_true", help="every recipe of the config's search.space")
    parser.add_argument("--out", default=str(REPO / "lth_runs" / "recipe_table"),
                        help="folder of the stage store (reruns reuse it) and recipe_table.json")
    parser.add_argument("--processes", type=int, default=2, choices=(1, 2))
    args = parser.parse_args(argv)

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        out = Path(args.out).resolve()
        cfg = load_config(args.config, [*args.overrides, f"output_dir={out}", "tracking.enabled=false"]).absolute()
        own = cfg.default_recipe()
        recipes = [own]
        extra = space_recipes(cfg) if args.space else []
        extra += read_recipes(args.recipes) if args.recipes else []
        for recipe in extra:
            full = {**own, **recipe}
            if full not in recipes:
                recipes.append(full)
        for recipe in recipes:
            try:
                cfg.with_choices(recipe)
            except ConfigError as error:
                raise ValueError(f"recipe {recipe_text(recipe)}: {error} (a recipe must lie in search.space: "
                                 "widen it with --set, e.g. --set 'search.space.rate=[0.2,0.1]')") from None
    except Exception as error:  # noqa: BLE001 - one line for any bad input
        print(f"recipe_table: {error}", file=sys.stderr)
        return 2
    if not seeds:
        print("recipe_table: --seeds is empty", file=sys.stderr)
        return 2

    base = cfg.model_dump(mode="json")
    store_uri = str(out / "store")
    runs = [(index, seed) for index in range(len(recipes)) for seed in seeds]
    groups = split(runs, args.processes)
    began = time.time()
    with ProcessPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(walk_group, base, [(recipes[i], s) for i, s in group], store_uri) for group in groups]
        scores = {run: score for group, future in zip(groups, futures) for run, score in zip(group, future.result())}
    elapsed = time.time() - began

    executed = sum(v["steps_executed"] for v in scores.values())
    rounds = sum(v["rounds"] for v in scores.values())
    print(f"{cfg.name}: {len(recipes)} recipes x {len(seeds)} seeds = {len(runs)} lineages ({rounds} rounds), "
          f"{executed} training steps executed, in {elapsed:.0f} s; tolerance {cfg.search.tolerance}, "
          f"confidence {cfg.search.confidence}, patience {cfg.prune.patience}, round cap {cfg.prune.rounds}")
    print("\n".join(table(recipes, seeds, scores)))
    capped = sorted({recipe_text(recipes[i]) for (i, _), v in scores.items() if v["stop"] == "cap"})
    if capped:
        print(f"reached the round cap (a score is a lower bound): {'; '.join(capped)}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe_table.json").write_text(json.dumps({
        "config": str(args.config), "overrides": args.overrides, "seeds": seeds, "recipes": recipes,
        "runs": [{"recipe": i, "seed": s, **scores[(i, s)]} for i, s in runs],
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
