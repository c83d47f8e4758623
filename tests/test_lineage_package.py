"""The lottery loop's shape (engine/lineage/): one place for keys, one walk, one kind registry.

Read from the package's source (AST), so a second key builder or a second walk cannot
creep back in unnoticed, and checked on real lineages: every kind, searched or not, is
judged by the same paired verdict against the same replicates with the same patience.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import tiny_config
from lth_search.config import KINDS as CONFIG_KINDS
from lth_search.engine.lineage.kinds import KINDS
from lth_search.engine.lineage.stages import MemoryStages
from lth_search.runs.trial import VAL_MARGIN, run_trial

PACKAGE = Path(__file__).resolve().parents[1] / "lth_search"
KEYS = PACKAGE / "engine" / "lineage" / "keys.py"
WALK = PACKAGE / "engine" / "lineage" / "walk.py"


def _modules() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def _names_used(tree: ast.Module) -> set[str]:
    """Every name and attribute a module mentions (calls, imports, references)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.FunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            found.update(alias.name for alias in node.names)
    return found


def test_stage_keys_are_built_only_in_engine_lineage_keys() -> None:
    """`content_key` (sha256 of canonical JSON) is defined by the store and called by keys.py alone."""
    users = sorted(str(path.relative_to(PACKAGE)) for path, tree in _modules().items()
                   if "content_key" in _names_used(tree))
    assert users == ["engine/lineage/keys.py", "store/content_keys.py"]
    # and every stage's inputs carry the one STAGE_FORMAT, defined there
    definers = [path for path, tree in _modules().items()
                if any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "STAGE_FORMAT" for t in node.targets)
                       for node in ast.walk(tree))]
    assert definers == [KEYS]


def test_there_is_one_walk() -> None:
    """Only walk.py judges rounds and trains the baseline (`add_round`, `replicate_seeds`): kinds,
    packs, trials, confirmation and compare all go through `walk`."""
    walkers = sorted(str(path.relative_to(PACKAGE)) for path, tree in _modules().items()
                     if {"add_round", "paired_verdict", "replicate_seeds"} & _names_used(tree)
                     and path.name != "objective.py")
    assert walkers == ["engine/lineage/walk.py"]
    gone = {"KindLineage", "LineagePack", "run_trial_pack", "run_pack_step", "start_result", "DEFAULT_KINDS"}
    assert not [(str(path), gone & _names_used(tree)) for path, tree in _modules().items() if gone & _names_used(tree)]


def test_the_kind_registry_is_the_configs_list_of_kinds() -> None:
    assert tuple(KINDS) == CONFIG_KINDS
    assert all(kind.name == name for name, kind in KINDS.items())
    assert {name for name, kind in KINDS.items() if kind.iterative} == {"imp", "lr_rewind", "finetune"}


@pytest.mark.parametrize("kind", ["imp", "random_prune"])
def test_a_searched_kind_is_judged_like_imp(one_torch_thread, data_root: Path, tmp_path: Path, kind: str) -> None:
    """search.space.kind spanning imp and random_prune: both kinds' rounds are judged paired
    against the same dense replicates with prune.patience, and report that margin to ASHA."""
    base = tiny_config(data_root, tmp_path, prune__dense_replicates=2, prune__patience=2, prune__rounds=2,
                       search__space__kind="[imp, random_prune]")
    cfg = base.with_choices({"kind": kind})
    reports: list[dict] = []
    result = run_trial(cfg, MemoryStages(), lambda r, key, metrics: reports.append(metrics))
    assert result.kind == kind and result.patience == 2
    assert result.dense.replicates == 2 and len(result.dense.replicate_keys) == 2
    assert len(result.rounds) == 2
    for round_result, metrics in zip(result.rounds, reports):
        assert round_result.matches is not None and round_result.margin_se > 0
        assert metrics[VAL_MARGIN] == round_result.margin


def test_no_two_modules_share_a_file_name() -> None:
    """A module's name says what it is, across the whole package (compare.py, tickets.py, ... once each)."""
    names = [path.name for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"]
    assert sorted({name for name in names if names.count(name) > 1}) == []
