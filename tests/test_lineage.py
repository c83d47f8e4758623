"""IMP lineages: the stage chain, sparsity ladder, exact zeros, keys, controls, CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import LTH_SEARCH, REPO, tiny_config
from lth_search.store.content_keys import content_key
from lth_search.engine.lineage.kinds import KINDS
from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.engine.pruning import layer_sparsity


@pytest.fixture(scope="module")
def walked(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = tiny_config(data_root, tmp_path_factory.mktemp("lineage"), prune__rewind_step=20)
    lineage = Lineage(cfg)
    seen: list[int] = []
    result = lineage.run(on_round=lambda r, _: seen.append(r.round))
    return cfg, lineage, result, seen


def test_rounds_follow_the_pruning_ladder(walked) -> None:
    cfg, lineage, result, seen = walked
    assert seen == [1, 2, 3] and [r.round for r in result.rounds] == [1, 2, 3]
    for r in result.rounds:
        assert r.sparsity == pytest.approx(1 - 0.8**r.round, abs=0.005)
        assert r.steps == 200 - 20  # retrain from the rewind step to T
    assert result.steps_executed == 200 + 3 * 180 and result.steps_reused == 0
    assert 0.2 < result.dense.val_accuracy <= 1 and 0.2 < result.dense.test_accuracy <= 1


def test_end_weights_are_exactly_zero_where_pruned(walked) -> None:
    _, lineage, _, _ = walked
    for entry in lineage.entries[1:]:
        mask = entry.masks["mask"]
        for name, kept in mask.items():
            assert bool((entry.weights["end"][name][~kept] == 0).all()), name
        assert entry.metrics["layer_sparsity"] == pytest.approx(layer_sparsity(mask))


def test_masks_are_nested_and_stage_keys_chain(walked) -> None:
    _, lineage, _, _ = walked
    masks = [e.masks["mask"] for e in lineage.entries[1:]]
    for earlier, later in zip(masks, masks[1:]):
        assert all(bool((later[n] <= earlier[n]).all()) for n in earlier)
    assert [e.key for e in lineage.entries] == lineage.stage_keys()
    assert lineage.entries[1].inputs["parent"] == lineage.entries[0].key
    assert set(lineage.entries[0].weights) == {"rewind_0", "rewind_20", "end", "val"}


def test_search_choices_never_change_the_dense_key(data_root: Path, tmp_path: Path) -> None:
    base = Lineage(tiny_config(data_root, tmp_path))
    for change in ({"prune__rate": 0.4}, {"prune__rewind_step": 20}, {"prune__scope": "layerwise"},
                   {"prune__init_scale": "measured"}, {"prune__rounds": 5}):
        other = Lineage(tiny_config(data_root, tmp_path, **change))
        assert other.stage_keys()[0] == base.stage_keys()[0], change
        assert other.stage_keys()[1] != base.stage_keys()[1] or "prune__rounds" in change
    for change in ({"seed": 1}, {"train__lr": 0.02}, {"model__widths": "[33]"}, {"prune__rewind_steps": "[0, 20, 40]"}):
        assert Lineage(tiny_config(data_root, tmp_path, **change)).stage_keys()[0] != base.stage_keys()[0], change


def test_memory_stages_reuse_within_a_process(data_root: Path, tmp_path: Path) -> None:
    stages = MemoryStages()
    cfg = tiny_config(data_root, tmp_path, prune__rounds=1)
    first = Lineage(cfg, stages).run()
    second = Lineage(cfg, stages).run()
    assert first.steps_executed == 400 and second.steps_executed == 0 and second.steps_reused == 400
    assert [r.val_accuracy for r in first.rounds] == [r.val_accuracy for r in second.rounds]
    assert second.rounds[0].reused == 1 and second.dense.reused == 1


def test_controls_keep_per_layer_counts(walked) -> None:
    _, lineage, _, _ = walked
    dense, ticket = lineage.entries[0], lineage.entries[-1]
    round_index = len(lineage.entries) - 1
    shuffled, reused = lineage.stage(KINDS["random_prune"].round_job(lineage, dense, ticket, round_index))
    assert not reused
    imp, rnd = ticket.masks["mask"], shuffled.masks["mask"]
    assert {n: int(m.sum()) for n, m in imp.items()} == {n: int(m.sum()) for n, m in rnd.items()}
    assert any(not torch.equal(imp[n], rnd[n]) for n in imp)
    reinit, _ = lineage.stage(KINDS["random_reinit"].round_job(lineage, dense, ticket, round_index))
    assert all(torch.equal(reinit.masks["mask"][n], imp[n]) for n in imp)
    assert reinit.key != shuffled.key and shuffled.key == content_key(shuffled.inputs)


def test_quickstart_lineage_command(data_root: Path, tmp_path: Path) -> None:
    """Acceptance: the README's lineage example, sparsity 1-0.8^r within 0.5 pp, exact zeros."""
    command = [LTH_SEARCH, "lineage", str(REPO / "configs/quickstart.yaml"), "--set", "prune.rounds=5",
               "--set", "prune.rate=0.2", "--set", "prune.scope=global", "--set", "prune.patience=6", "--json",
               "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"data.root={data_root}",
               "--set", "tracking.enabled=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"dense", "rounds", "steps_executed", "steps_reused"} <= set(report)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    for r in report["rounds"]:
        assert abs(r["sparsity"] - (1 - 0.8 ** r["round"])) < 0.005
        assert {"sparsity", "val_accuracy", "test_accuracy", "reused", "train_steps_per_s"} <= set(r)
    replicates = report["dense"]["replicates"]  # the dense baseline: more dense stages, same split
    assert replicates == len(report["dense"]["replicate_keys"]) >= 1
    assert report["steps_executed"] == (replicates + 5) * 1500 and report["steps_reused"] == 0
    assert len([l for l in done.stderr.splitlines() if l.startswith("round ")]) == 5
    from lth_search.store.stage_store import StageStore

    store = StageStore(str(tmp_path / "runs" / "store"))
    for r in report["rounds"]:
        entry = store.get(r["key"])
        for name, kept in entry.masks["mask"].items():
            assert bool((entry.weights["end"][name][~kept] == 0).all())
