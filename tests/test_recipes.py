"""The paper-recipe configs run end to end on tiny files in the real standard formats.

Real MNIST / CIFAR-10 are not shipped (no network at test time): the test writes a few
dozen images as IDX files / CIFAR python batches, shrinks the step counts, and runs the
recipe's own model, optimizer, schedule, augmentation and pruning through a lineage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from datafiles import write_cifar, write_mnist
from lth_search.config import load_config
from lth_search.engine.lineage.walk import Lineage

TINY = ["train.steps=4", "train.batch_size=8", "prune.rounds=2", "prune.rewind_steps=[0, 2]", "prune.rewind_step=2",
        "data.val_size=10", "train.milestones=[3]", "tracking.enabled=false", "search.space.rewind_step=null"]


@pytest.mark.parametrize("recipe", ["lenet300_mnist", "conv6_cifar10", "resnet20_cifar10", "vgg16_cifar10", "vit_cifar10"])
def test_paper_recipe_runs_on_tiny_standard_files(recipe: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    if recipe.endswith("mnist"):
        write_mnist(tmp_path / "mnist", gz=True, n_train=40, n_test=12)
    else:
        write_cifar(tmp_path, n=8)
    shallower = ["model.layers=2"] if recipe == "vit_cifar10" else []  # the recipe's ViT, 2 of its 6 layers
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml",
                      TINY + shallower + [f"data.root={tmp_path}", f"output_dir={tmp_path / 'runs'}"]).absolute()
    lineage = Lineage(cfg)
    result = lineage.run()
    full = load_config(REPO / "configs" / f"{recipe}.yaml")
    for r in result.rounds:
        mask = lineage.entries[r.round].masks["mask"]
        kept = sum(int(m.sum()) for m in mask.values())
        total = sum(m.numel() for m in mask.values())
        assert r.sparsity == pytest.approx(1 - kept / total)
        assert r.sparsity > 0 and r.steps == 2
    if full.prune.scope == "global" and not full.prune.layer_ratios and full.prune.output_ratio == 1:
        assert result.rounds[-1].sparsity == pytest.approx(1 - 0.8**2, abs=0.001)
