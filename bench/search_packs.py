"""The quickstart search with and without packs, in one run: wall time and its ratio.

Runs the quickstart search (configs/quickstart.yaml, plus any --set overrides) twice,
each in a fresh temporary output_dir (no stage shared between the two) on its own
local Ray: first with `resources.pack=1` (every lineage and dense replicate trained on
its own, as before packs), then with the config's `resources.pack` (a lineage's dense
replicates as one pack; the confirmation runs dealt into packs, one per worker). Same
seeds, same trials. Prints, per variant, the wall time of `run_search`, the training
seconds its stages took, and the confirmed winner, then the ratio of the wall times.

    python bench/search_packs.py [--set KEY=VALUE ...] [--order packs-first]

Float32 packs sum in another order than lone training, so the two searches' numbers
differ in the last bits and may occasionally tip a verdict: the winners are printed so
a reader sees whether the two searches agreed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from search_overhead import REPO, training_seconds  # noqa: E402  (bench/ is the script's directory)

from lth_search.config import load_config  # noqa: E402
from lth_search.search.driver import run_search  # noqa: E402


def one_search(config: str, overrides: list[str], pack: int | None) -> dict:
    output = Path(tempfile.mkdtemp(prefix="lth-bench-packs-"))
    extra = [f"resources.pack={pack}"] if pack is not None else []
    cfg = load_config(config, [*overrides, *extra, f"output_dir={output}"])
    try:
        began = time.perf_counter()
        summary = run_search(cfg, progress=lambda _: None)
        wall = time.perf_counter() - began
        train_s, steps, stages = training_seconds(output / "store")
    finally:
        shutil.rmtree(output, ignore_errors=True)
    chosen = (summary.get("confirmation") or {}).get("chosen") or {}
    winner = f"{chosen.get('recipe')} at {chosen.get('compression', 0):.2f}x" if chosen else "none"
    return {"pack": cfg.resources.pack, "wall": wall, "train_s": train_s, "steps": steps, "stages": stages,
            "winner": winner}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--order", choices=("packs-last", "packs-first"), default="packs-last",
                        help="which variant runs first (run both orders to see any drift of the machine)")
    args = parser.parse_args()
    variants = [1, None] if args.order == "packs-last" else [None, 1]
    runs = {}
    for pack in variants:
        run = one_search(args.config, args.overrides, pack)
        runs["packs" if pack is None else "alone"] = run
        print(f"resources.pack={run['pack']:<3} wall {run['wall']:7.1f} s   training {run['train_s']:7.1f} s over "
              f"{run['stages']} stages ({run['steps']} steps)   winner: {run['winner']}", flush=True)
    alone, packs = runs["alone"], runs["packs"]
    print(f"wall time, packs against pack=1: {alone['wall'] / packs['wall']:.2f}x faster "
          f"({alone['wall']:.1f} s -> {packs['wall']:.1f} s); training seconds {alone['train_s']:.1f} -> "
          f"{packs['train_s']:.1f}")


if __name__ == "__main__":
    main()
