"""Packs: lineages trained in lockstep as one batched network give what they give alone."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lth_search.engine.data import Dataset, load_dataset
from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.engine.models import build_model
from lth_search.engine.lineage.walk import lineages_for, walk
from lth_search.engine.packs import PackMember, train_pack
from lth_search.engine.pruning import ones_mask, prune_round, random_mask_like
from lth_search.engine.train import train
from lth_search.store.stage_store import StageStore

from conftest import REPO, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Three members: two seeds, one rewinding later (it leaves the pack early), and one sharing
# member 0's dense stage with other pruning choices (that stage is trained once).
MEMBERS = [
    {"seed": 0},
    {"seed": 1, "prune__rewind_step": 20, "prune__rate": 0.3},
    {"seed": 0, "prune__init_scale": "measured", "prune__scope": "layerwise"},
]


def _double(data: Dataset) -> Dataset:
    return dataclasses.replace(data, **{k: dataclasses.replace(getattr(data, k), x=getattr(data, k).x.double())
                                        for k in ("train", "val", "test")})


def _lineages(data_root: Path, tmp_path: Path, dtype: torch.dtype, store=None) -> list[Lineage]:
    lineages = []
    for extra in MEMBERS:
        cfg = tiny_config(data_root, tmp_path, train__device="cpu", **extra)
        data = load_dataset(cfg.data, cfg.seed)
        data = _double(data) if dtype == torch.float64 else data
        lineage = Lineage(cfg, store if store is not None else MemoryStages(), data)
        lineage.model.to(dtype)
        lineages.append(lineage)
    return lineages


def test_float64_pack_members_have_the_lone_lineages_masks_at_every_round(data_root: Path, tmp_path: Path) -> None:
    lone = _lineages(data_root, tmp_path, torch.float64)
    lone_results = [lineage.run() for lineage in lone]
    packed = _lineages(data_root, tmp_path, torch.float64, store=MemoryStages())
    pack_results = walk(packed)
    for alone, member, alone_result, pack_result in zip(lone, packed, lone_results, pack_results):
        assert [e.key for e in member.entries] == [e.key for e in alone.entries]
        assert len(member.entries) == 4
        for round_index, (a, p) in enumerate(zip(alone.entries[1:], member.entries[1:]), start=1):
            for name in a.masks["mask"]:
                assert torch.equal(a.masks["mask"][name], p.masks["mask"][name]), (round_index, name)
            assert p.metrics["val_accuracy"] == pytest.approx(a.metrics["val_accuracy"], abs=1e-9)
        assert [r.sparsity for r in pack_result.rounds] == [r.sparsity for r in alone_result.rounds]
    # member 2 shares member 0's dense stage: trained once, reused by the other
    assert [r.dense.reused for r in pack_results] == [0, 0, 1]
    assert pack_results[2].steps_reused == pack_results[0].dense.steps


def _stage_files(store_root: Path) -> dict[str, bytes]:
    """Every weight and mask file of a store, by '<key>/<file>'."""
    return {f"{path.parent.name}/{path.name}": path.read_bytes()
            for path in sorted((store_root / "stages").glob("*/*/*"))
            if path.suffix in (".safetensors", ".parquet")}


def test_a_stage_key_stores_the_same_bytes_alone_or_in_any_pack(data_root: Path, tmp_path: Path) -> None:
    """One key, one result (float32, CPU): 8 mixed recipes walked as one pack store, under every
    key, the bytes each stores walked alone, whatever their pack position and pack-mates; and a
    lineage with 3 dense replicates stores the same bytes with resources.pack 1 and 8."""
    recipes = [
        {"seed": 0}, {"seed": 1, "prune__rate": 0.3}, {"seed": 0, "prune__rewind_step": 20},
        {"seed": 2, "prune__scope": "layerwise", "prune__init_scale": "measured"},
        {"seed": 1, "prune__output_ratio": 0.5, "prune__rewind_step": 20},
        {"seed": 3, "train__schedule": "step", "train__milestones": "[100]"}, {"seed": 0, "prune__init_scale": 1.0},
        {"seed": 4, "prune__dense_replicates": 2},
    ]
    cfgs = [tiny_config(data_root, tmp_path, train__device="cpu", **recipe) for recipe in recipes]
    alone_store, pack_store = tmp_path / "alone", tmp_path / "pack"
    for cfg in cfgs:
        Lineage(cfg, StageStore(str(alone_store))).run()
    walk(lineages_for(cfgs, StageStore(str(pack_store))))
    alone, packed = _stage_files(alone_store), _stage_files(pack_store)
    assert len(alone) >= 8 * 3 and set(alone) == set(packed)
    assert [name for name in alone if alone[name] != packed[name]] == []

    replicated = {"prune__dense_replicates": 3, "prune__rounds": 2}
    for pack in (1, 8):
        cfg = tiny_config(data_root, tmp_path, train__device="cpu", resources__pack=pack, **replicated)
        Lineage(cfg, StageStore(str(tmp_path / f"replicates{pack}"))).run()
    one, eight = _stage_files(tmp_path / "replicates1"), _stage_files(tmp_path / "replicates8")
    assert len(one) == 3 * 4 + 2 * 3 and one == eight  # 3 dense x (end, val, rewind 0, 20); 2 rounds x (end, val, mask)


def test_pack_stages_go_through_the_store_and_stored_members_are_skipped(data_root: Path, tmp_path: Path) -> None:
    store = StageStore(str(tmp_path / "store"))
    first = tiny_config(data_root, tmp_path, train__device="cpu")
    second = tiny_config(data_root, tmp_path, train__device="cpu", seed=1)
    Lineage(first, store).run()
    results = walk(lineages_for([first, second], store))
    assert results[0].dense.reused == 1 and all(r.reused == 1 for r in results[0].rounds)
    assert results[0].steps_executed == 0
    assert results[1].dense.reused == 0 and all(r.reused == 0 for r in results[1].rounds)
    assert all(store.contains(key) for key in Lineage(second, store).stage_keys())
    again = Lineage(second, store).run()  # a lone lineage reuses what the pack stored
    assert again.steps_executed == 0 and [r.val_accuracy for r in again.rounds] == [r.val_accuracy for r in results[1].rounds]


def test_a_lineage_handed_over_between_rounds_walks_on_elsewhere_to_the_same_stages(
        data_root: Path, tmp_path: Path) -> None:
    """`walk(handover=...)` leaves a lineage between two rounds (a confirmation pack giving runs to
    an idle worker): it stops there with no stop reason, and a walk elsewhere on the same store
    fetches its stages so far and trains only the rest, to the very bytes of a walk never split."""
    cfgs = [tiny_config(data_root, tmp_path, train__device="cpu", seed=seed) for seed in (0, 1)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    walk(lineages_for(cfgs, StageStore(str(whole))))
    asked: list[list[int]] = []

    def hand_second_at_round_2(walking: list[int]) -> list[int]:
        asked.append(walking)
        return [1] if len(asked) == 2 else []

    store = StageStore(str(split))
    results = walk(lineages_for(cfgs, store), handover=hand_second_at_round_2)
    assert asked == [[0, 1], [0, 1], [0]]  # before rounds 1, 2 and 3
    assert len(results[1].rounds) == 1 and results[1].stop_reason == ""
    assert results[0].stop_reason == "cap" and len(results[0].rounds) == 3
    walked_on = walk(lineages_for(cfgs[1:], store))[0]
    assert walked_on.dense.reused and [r.reused for r in walked_on.rounds] == [1, 0, 0]
    assert _stage_files(whole) == _stage_files(split)


@pytest.mark.parametrize("mode, optimizer", [("bmm", "sgd"), ("bmm", "adam"), ("bmm", "adamw"), ("vmap", "adam")])
def test_train_pack_equals_train_per_member(data_root: Path, tmp_path: Path, mode: str, optimizer: str) -> None:
    """Different seeds, data splits, start steps (so lr schedule positions) and masks; float64."""
    cfg = tiny_config(data_root, tmp_path, train__steps=60)
    recipe = cfg.train.model_copy(update={
        "optimizer": optimizer, "lr": 0.05 if optimizer == "sgd" else 0.01, "momentum": 0.9 if optimizer == "sgd" else 0.0,
        "nesterov": optimizer == "sgd", "weight_decay": 1e-3, "schedule": "step", "milestones": [30], "warmup_steps": 5,
    })
    splits = [_double(load_dataset(cfg.data, seed)) for seed in (0, 1)]
    members = []
    for seed, start in [(0, 0), (1, 10), (2, 20)]:
        model = build_model(cfg.model, splits[0].input_shape, splits[0].num_classes, seed).double()
        weights = {n: p.detach() for n, p in model.named_parameters()}
        mask = random_mask_like(prune_round(weights, ones_mask(model), model.prunable, 0.6), seed) if seed else None
        state = {k: v * mask[k] if mask and k in mask else v.clone() for k, v in model.state_dict().items()}
        members.append(PackMember(state, splits[seed % 2], seed, start, None, mask, snapshot_steps=range(61)))
    template = build_model(cfg.model, splits[0].input_shape, splits[0].num_classes, 0).double()
    packed = train_pack(template, members, recipe, mode)
    for member, result in zip(members, packed):
        template.load_state_dict(member.state)
        alone = train(template, member.data, recipe, member.seed, member.start_step, mask=member.mask,
                      snapshot_steps=member.snapshot_steps)
        assert result.steps == alone.steps == 60 - member.start_step
        assert sorted(result.snapshots) == sorted(alone.snapshots) == list(range(member.start_step, 61))
        for name, value in alone.state.items():
            assert torch.allclose(result.state[name], value, rtol=0, atol=1e-12), name
        assert result.train_loss == pytest.approx(alone.train_loss, rel=1e-6)
        for step, snapshot in result.snapshots.items():  # masked weights exactly zero after every step
            assert all(bool((snapshot[n][~m] == 0).all()) for n, m in (member.mask or {}).items()), step


def test_gpu_bench_without_cuda_fails_with_one_clear_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"bench/gpu.py: needs a CUDA GPU, and torch {torch.__version__} sees none (torch.cuda.is_available() is False)"
    ]


def test_gpu_science_bench_without_cuda_fails_with_one_clear_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_science.py"), "--heldout", "8401"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"bench/gpu_science.py: needs a CUDA GPU, and torch {torch.__version__} sees none "
        "(torch.cuda.is_available() is False)"
    ]
