"""Stage reuse: training steps a set of lineages executes through one store, two at a time.

A fixed set of 12 IMP lineages over a small discrete space (rate in {0.2, 0.4} x rewind
step in {0, k} x init_scale in {0, measured}, plus repeated choices and shorter prefixes
of the same choices) on MNIST-1D with a small MLP. All share one dense stage; some share
whole prefixes of rounds. They run as `lth-search lineage --json` processes, two at a
time (one intra-op thread each, for 2 cores), against one fresh store.

Printed: the training steps executed (the sum of every lineage's `steps_executed`), the
unique-stage lower bound (the steps of each distinct stage key once: dense = T, round =
T - rewind_step), their ratio (1.00 means no stage was ever trained twice, even when
two lineages needed it at the same moment), the steps every lineage would train without
a store, and the saving 1 - executed / without.

    python bench/reuse.py [--steps 400] [--rewind 40] [--data-root ~/.cache/lth_search/data] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lth_search.config import load_config
from lth_search.engine.lineage.walk import Lineage

CONCURRENCY = 2


def lineage_set(k: int) -> list[dict[str, object]]:
    """The fixed lineages (search choices and round count), in launch order.

    The first two are identical, so they race for every stage; later duplicates and
    shorter prefixes find their stages already stored.
    """
    grid = [
        {"prune.rate": rate, "prune.rewind_step": rewind, "prune.init_scale": scale, "prune.rounds": 3}
        for rate in (0.2, 0.4) for rewind in (0, k) for scale in (0.0, "measured")
    ]
    return [
        grid[0], dict(grid[0]),                               # the same lineage twice, at once
        grid[1], grid[2], grid[3],
        {**grid[2], "prune.rounds": 2},                       # a prefix of grid[2]
        grid[4], grid[5], grid[6],
        {**grid[7], "prune.rounds": 1},                       # a prefix of grid[7], before it
        grid[7],
        dict(grid[5]),                                        # a repeat
    ]


def base_overrides(args: argparse.Namespace, output_dir: Path) -> list[str]:
    return [
        "data.name=mnist1d", f"data.root={args.data_root}", "model.name=mlp", "model.widths=[64, 64]",
        f"train.steps={args.steps}", f"prune.rewind_steps=[0, {args.rewind}]", f"output_dir={output_dir}",
        "tracking.enabled=false", "train.device=cpu",
    ]


def choice_overrides(choices: dict[str, object]) -> list[str]:
    return [f"{key}={value}" for key, value in choices.items()]


def describe(choices: dict[str, object]) -> str:
    return (f"rate {choices['prune.rate']}, rewind {choices['prune.rewind_step']:>3}, "
            f"init_scale {choices['prune.init_scale']!s:>8}, rounds {choices['prune.rounds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="train.steps T of every stage")
    parser.add_argument("--rewind", type=int, default=40, help="the late rewind step k (the other is 0)")
    parser.add_argument("--data-root", default=str(Path("~/.cache/lth_search/data").expanduser()))
    parser.add_argument("--keep", help="put the output folder (store included) here instead of a temporary one")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lth-bench-reuse-"))
    output_dir = work / "out"
    if output_dir.exists():
        raise SystemExit(f"{output_dir} exists; the benchmark needs a fresh store")
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "bench-reuse.yaml"
    config_file.write_text("name: bench-reuse\n")
    lineages = lineage_set(args.rewind)
    base = base_overrides(args, output_dir)

    # The lower bound, from keys alone (no training): every distinct stage once.
    stage_steps: dict[str, int] = {}
    without_store = 0
    expected_keys = []
    for choices in lineages:
        cfg = load_config(None, base + choice_overrides(choices)).absolute()
        lineage = Lineage(cfg)
        keys = lineage.stage_keys()
        steps = [lineage.total_steps] + [lineage.total_steps - cfg.prune.rewind_step] * cfg.prune.rounds
        stage_steps.update(zip(keys, steps))
        without_store += sum(steps)
        expected_keys.append(keys)
    unique = sum(stage_steps.values())

    command = str(Path(sys.executable).with_name("lth-search"))
    if not Path(command).exists():
        command = shutil.which("lth-search") or "lth-search"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(choices: dict[str, object]) -> dict:
        argv = [command, "lineage", str(config_file), "--json"]
        for assignment in base + choice_overrides(choices):
            argv += ["--set", assignment]
        done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"lineage {describe(choices)} failed:\n{done.stderr}")
        return json.loads(done.stdout)

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        reports = list(pool.map(run, lineages))
    wall = time.perf_counter() - began

    for choices, report, keys in zip(lineages, reports, expected_keys):
        reported = [report["dense"]["key"]] + [r["key"] for r in report["rounds"]]
        if reported != keys:
            raise SystemExit(f"lineage {describe(choices)} walked other stages than its stage_keys()")
    executed = sum(r["steps_executed"] for r in reports)

    print(f"{len(lineages)} lineages, concurrency {CONCURRENCY}, mnist1d, MLP [64, 64], T = {args.steps}, "
          f"rewind steps {{0, {args.rewind}}}, store {output_dir / 'store'}")
    for index, (choices, report) in enumerate(zip(lineages, reports), 1):
        print(f"  {index:2d}. {describe(choices)}: executed {report['steps_executed']:5d}, "
              f"reused {report['steps_reused']:5d}  (stages reused: dense {report['dense']['reused']}, "
              f"rounds {[r['reused'] for r in report['rounds']]})")
    print(f"training steps executed:          {executed}")
    print(f"unique-stage lower bound:         {unique}  ({len(stage_steps)} distinct stages)")
    print(f"ratio executed / unique:          {executed / unique:.2f}")
    print(f"steps without a store:            {without_store}")
    print(f"saving (1 - executed / without):  {100 * (1 - executed / without_store):.1f} %")
    print(f"wall time: {wall:.1f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if executed != unique:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
