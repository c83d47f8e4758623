"""Lineage kinds: keys carry the kind, stages are reused, the baselines do what they say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import LTH_SEARCH, REPO, tiny_config, tiny_overrides
from lth_search.config import KINDS
from lth_search.engine.lineage.kinds import KINDS as REGISTRY
from lth_search.engine.lineage.probes import attach_probes
from lth_search.engine.lineage.walk import Lineage
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.store.content_keys import content_key


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def every_kind(one_torch_thread, data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = tiny_config(data_root, tmp_path_factory.mktemp("kinds"), prune__rounds=2, prune__rewind_step=20,
                      train__schedule="step", train__milestones="[100]")
    stages = MemoryStages()
    runs = {}
    for kind in KINDS:
        runner = Lineage(cfg, stages, kind=kind)
        attach_probes(runner)
        runs[kind] = (runner, runner.run())
    return cfg, stages, runs["imp"][0], runs


def test_every_kind_reaches_the_imp_sparsities_with_its_own_keys(every_kind) -> None:
    _, _, _, runs = every_kind
    imp = [r.sparsity for r in runs["imp"][1].rounds]
    keys = set()
    for kind, (runner, result) in runs.items():
        assert result.kind == kind and [r.round for r in result.rounds] == [1, 2]
        assert [r.sparsity for r in result.rounds] == pytest.approx(imp, abs=1e-9), kind
        for entry in runner.entries[1:]:
            assert entry.key == content_key(entry.inputs)
            assert entry.inputs.get("kind", "imp") == kind
            keys.add(entry.key)
        assert runner.entries[0].key == runs["imp"][0].entries[0].key  # one dense stage for all kinds
    assert len(keys) == 2 * len(KINDS)


def test_lineages_sharing_a_dense_stage_share_its_probe_gradient(every_kind) -> None:
    """Every kind's lineage starts from the one dense stage: its probe gradient at theta_k is kept once
    per process (probes.py `_GRADIENTS`) and is the gradient computed afresh."""
    from lth_search.engine.diagnostics import probe_gradients
    from lth_search.engine.lineage import probes

    cfg, _, imp, _ = every_kind
    dense = imp.entries[0]
    kept = [key for key in probes._GRADIENTS if key[0] == dense.key]
    assert len(kept) == 1
    size, split, names = cfg.diagnostics.probe_size, imp.data.train, sorted(imp.groups)
    fresh = probe_gradients(imp.model, dense.weights[f"rewind_{cfg.prune.rewind_step}"], split.x[:size],
                            split.y[:size], names)
    assert all(torch.equal(fresh[name], probes._GRADIENTS[kept[0]][name]) for name in names)


def test_a_second_run_reuses_every_stage(every_kind) -> None:
    cfg, stages, _, runs = every_kind
    for kind in ("lr_rewind", "synflow", "random_reinit"):
        result = Lineage(cfg, stages, kind=kind).run()
        assert result.steps_executed == 0 and all(r.reused for r in result.rounds), kind
        assert [r.val_accuracy for r in result.rounds] == [r.val_accuracy for r in runs[kind][1].rounds]


def test_baselines_differ_where_their_definitions_differ(every_kind) -> None:
    _, _, _, runs = every_kind
    imp_masks = [e.masks["mask"] for e in runs["imp"][0].entries[1:]]
    for kind in [name for name, kind in REGISTRY.items() if kind.at_imp_sparsities]:
        for round_index, (imp_mask, entry) in enumerate(zip(imp_masks, runs[kind][0].entries[1:]), start=1):
            counts = {n: int(m.sum()) for n, m in entry.masks["mask"].items()}
            same_mask = all(torch.equal(entry.masks["mask"][n], imp_mask[n]) for n in imp_mask)
            if kind in ("random_prune", "random_reinit"):  # the controls keep IMP's per-layer counts
                assert counts == {n: int(m.sum()) for n, m in imp_mask.items()}
            if kind == "oneshot":  # one round of IMP is one-shot pruning; later rounds differ
                assert same_mask == (round_index == 1)
            else:
                assert same_mask == (kind == "random_reinit"), kind
    # with a step schedule, fine-tuning (final rate) and LR rewinding (schedule from k) train differently
    finetune, rewound = runs["finetune"][0].entries[1], runs["lr_rewind"][0].entries[1]
    assert finetune.inputs["fixed_lr"] == pytest.approx(1e-3) and "fixed_lr" not in rewound.inputs
    assert not torch.equal(finetune.weights["end"]["output.weight"], rewound.weights["end"]["output.weight"])


def test_diagnostics_per_round(every_kind) -> None:
    _, _, _, runs = every_kind
    for kind, (_, result) in runs.items():
        for r in result.rounds:
            d = r.diagnostics
            assert 0 < d.sign_ticket <= 1 and 0 < d.sign_dense <= 1 and 0 < d.alignment < 1, kind
            assert d.barrier is None and d.perturbed_val_accuracy is None  # opt-in
    imp, random_prune = runs["imp"][1].rounds[-1].diagnostics, runs["random_prune"][1].rounds[-1].diagnostics
    assert imp.alignment > random_prune.alignment  # magnitude masks keep more of the gradient energy


def test_stability_and_perturbation_are_stages(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path, prune__rounds=1, diagnostics__stability="true",
                      diagnostics__perturbation=0.5, diagnostics__stability_points=3)
    stages = _Computed()
    first = Lineage(cfg, stages)
    attach_probes(first)
    d = first.run().rounds[0].diagnostics
    assert d.barrier is not None and d.barrier >= 0 and 0 < d.perturbed_val_accuracy <= 1
    assert {"stability", "perturbation"} <= set(stages.computed.values())
    stages.computed.clear()
    second = Lineage(cfg, stages)
    attach_probes(second)
    again = second.run()
    assert stages.computed == {} and again.rounds[0].diagnostics.barrier == d.barrier


class _Computed(MemoryStages):
    """Memory stages that remember which stages they computed (key -> the stage's `stage` input)."""

    def __init__(self) -> None:
        super().__init__()
        self.computed: dict[str, str] = {}

    def get_or_compute(self, key, compute, check=None):
        entry, reused = super().get_or_compute(key, compute, check)
        if not reused:
            self.computed[key] = entry.inputs["stage"]
        return entry, reused


def test_lineage_command_of_a_kind_prints_diagnostics(data_root: Path, tmp_path: Path) -> None:
    command = [LTH_SEARCH, "lineage", str(REPO / "configs/quickstart.yaml"), "--json", "--no-store",
               *[a for o in tiny_overrides(data_root, tmp_path, prune__kind="snip", prune__rounds=2,
                                           search__space__rewind_step="null") for a in ("--set", o)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["kind"] == "snip" and len(report["rounds"]) == 2
    assert {"sign_ticket", "sign_dense", "alignment", "barrier", "collapsed_layers", "warnings"} <= \
        set(report["rounds"][0]["diagnostics"])
    assert "(snip)" in done.stderr


def test_the_search_may_choose_the_kind() -> None:
    import optuna

    from lth_search.config import load_config
    from lth_search.search.space import DefineByRunSpace

    cfg = load_config(None, ["search.space.kind=[imp, lr_rewind, synflow]"])
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    DefineByRunSpace(cfg)(trial)
    assert set(trial.params) == {"kind"}
    assert cfg.with_choices({"kind": "synflow"}).prune.kind == "synflow"
    with pytest.raises(Exception, match="search.space.kind"):
        load_config(None, ["search.space.kind=[imp, lottery]"])
