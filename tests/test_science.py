"""Science: on MNIST-1D, IMP tickets at ~91 % sparsity beat random pruning at equal counts.

Measured while writing this test (quickstart recipe, global 20 %/round, 11 rounds =
91.4 % sparsity, rewind to step 0, val split of 1000): IMP val minus random-pruning val
= 8.3, 8.1, 12.8, 10.1 pp for seeds 0-3 (IMP ~55-60 %, random ~47-50 %, random
re-initialisation ~49-52 %). The standard error of one val accuracy is ~1.6 pp here, of a
difference ~2.2 pp. The test asserts a mean margin of at least 4 pp over three seeds (half
the smallest single-seed margin seen) and IMP ahead on every seed; it reports the random
re-initialisation control without asserting on it.
"""

from __future__ import annotations

import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from lth_search.config import load_config
from lth_search.engine.lineage.kinds import KINDS
from lth_search.engine.lineage.walk import Lineage

from conftest import REPO

SEEDS = (0, 1, 2)
MIN_MEAN_MARGIN = 0.04


def imp_and_controls(seed: int, data_root: Path, output_dir: Path) -> tuple:
    """One seed's IMP lineage to 11 rounds and its two controls at the final mask (one torch thread):
    (seed, sparsity, dense val, IMP val, IMP test, random-prune val, test, random-reinit val, test)."""
    import torch

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"seed={seed}", "prune.rounds=11", "prune.patience=12", "prune.dense_replicates=1",
        "data.mnist1d_samples=5000", "data.val_size=1000",  # the data these margins were measured on
        "prune.rate=0.2", "prune.scope=global", "prune.rewind_step=0",
        "prune.init_scale=0", f"data.root={data_root}", f"output_dir={output_dir}", "tracking.enabled=false",
    ]).absolute()
    lineage = Lineage(cfg)
    result = lineage.run()
    dense, ticket = lineage.entries[0], lineage.entries[-1]
    shuffled, _ = lineage.stage(KINDS["random_prune"].round_job(lineage, dense, ticket, len(result.rounds)))
    reinit, _ = lineage.stage(KINDS["random_reinit"].round_job(lineage, dense, ticket, len(result.rounds)))
    final = result.rounds[-1]
    return (seed, final.sparsity, result.dense.val_accuracy, final.val_accuracy, final.test_accuracy,
            shuffled.metrics["val_accuracy"], shuffled.metrics["test_accuracy"],
            reinit.metrics["val_accuracy"], reinit.metrics["test_accuracy"])


@pytest.mark.slow
def test_imp_beats_random_pruning_at_90_percent(data_root: Path, tmp_path: Path) -> None:
    # The seeds are independent lineages: one fresh process each (spawned, not forked from a
    # process holding Ray), sharing the machine's cores and one store.
    with ProcessPoolExecutor(len(SEEDS), mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(imp_and_controls, SEEDS, [data_root] * len(SEEDS), [tmp_path] * len(SEEDS)))
    margins = []
    for seed, sparsity, _, imp_val, _, random_val, *_ in rows:
        assert sparsity == pytest.approx(1 - 0.8**11, abs=0.005), seed
        margins.append(imp_val - random_val)
    print("\nseed sparsity dense_val imp_val imp_test random_prune_val/test random_reinit_val/test")
    for row in rows:
        print("{} {:.4f} {:.3f} {:.3f} {:.3f} {:.3f}/{:.3f} {:.3f}/{:.3f}".format(*row))
    assert all(m > 0 for m in margins), margins
    assert statistics.mean(margins) >= MIN_MEAN_MARGIN, margins
