"""best_ticket / lth-search best / tickets: the right ticket under each criterion, read from MLflow alone.

Runs with known numbers are logged through the very tracker API trials use, with
hand-made RoundResult / StageEntry values, so the test knows every answer. A real
tiny lineage then checks that a fetched ticket, retrained with its recipe and seed,
reproduces the accuracy the search reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from fault_helpers import run_cli
from lth_search.config import ExperimentConfig
from lth_search.engine.data import load_dataset
from lth_search.errors import ConfigError, TrackingError, UnknownTrackingName
from lth_search.engine.lineage.results import DenseResult, LineageResult, RoundResult
from lth_search.engine.models import build_model
from lth_search.engine.pruning import layer_sparsity
from lth_search.store.entry import StageEntry
from lth_search.store.stage_store import StageStore
from lth_search.ticket_text import format_tickets
from lth_search.tickets import Ticket
from lth_search.tracking.ticket_reader import best_ticket, list_tickets
from lth_search.tracking.trial_run import TrialTracker
from lth_search.engine.packs import PackMember, choose_mode, train_pack
from lth_search.engine.train import evaluate
from lth_search.tracking.mlflow_observers import MlflowTracking
from mlflow_helpers import tracked_trial

DENSE_VAL = 0.60
# trial -> (choices, rounds as (sparsity, val, test)); tolerance 0.02, so "matching" means val >= 0.58.
KNOWN = {
    "A": ({"rate": 0.2}, [(0.20, 0.610, 0.601), (0.36, 0.595, 0.590), (0.49, 0.570, 0.565)]),
    "B": ({"rate": 0.5, "scope": "layerwise"}, [(0.50, 0.585, 0.580), (0.75, 0.581, 0.575), (0.875, 0.550, 0.540)]),
    "C": ({"rate": 0.3, "init_scale": 0.5}, [(0.50, 0.500, 0.495), (0.75, 0.590, 0.585)]),
}
ANSWERS = [  # (criterion, trial, round)
    # the search's best ticket: where each trial's unbroken matching run ends (patience 1 here). C misses
    # its round 1, so its later pass at 75 % is no ticket (the old rule took it); B's run ends at 75 %
    ({}, "B", 2),
    ({"max_accuracy_drop": 0.05}, "B", 3),  # 0.55 is exactly 0.05 below dense: still matching
    ({"max_accuracy_drop": 0.001}, "A", 1),
    ({"min_sparsity": 0.3}, "A", 2),        # best val at >= 30%
    ({"min_sparsity": 0.8}, "B", 3),
]


def fake_trial(cfg: ExperimentConfig, parent: str, trial_id: str, choices: dict, rounds: list, seed: int) -> dict:
    """Log a trial with known numbers through TrialTracker; returns its masks by round."""
    trial_cfg = cfg.with_choices(choices)
    tracker = TrialTracker.start(trial_cfg, parent, trial_id, choices)
    model = build_model(trial_cfg.model, (40,), 10, seed)
    state = model.state_dict()
    dense = DenseResult(val_accuracy=DENSE_VAL, test_accuracy=0.59, train_loss=1.0, train_steps_per_s=900.0,
                        reused=0, steps=200, key=f"dense-{trial_id}")
    result = LineageResult(dense, [], 200, 0, trial_cfg.search.tolerance)
    tracker.log_dense(result, StageEntry(key=dense.key, kind="dense", inputs={}, metrics={},
                                         weights={f"rewind_{trial_cfg.prune.rewind_step}": state}))
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for index, (sparsity, val, test) in enumerate(rounds, start=1):
        mask = {name: torch.rand(state[name].shape, generator=generator) >= sparsity for name in model.prunable}
        round_result = RoundResult(
            round=index, sparsity=sparsity, val_accuracy=val, test_accuracy=test, train_loss=0.5,
            train_steps_per_s=1000.0, reused=0, steps=200, key=f"{trial_id}-{index}", layer_sparsity=layer_sparsity(mask),
        )
        result.rounds.append(round_result)
        trained = {name: value * mask[name] if name in mask else value for name, value in state.items()}
        tracker.log_round(round_result, StageEntry(key=round_result.key, kind="round", inputs={}, metrics={},
                                                   masks={"mask": mask}, weights={"end": trained}))
        masks[index] = mask
    tracker.finish(result)
    assert not tracker.io.missed
    return {"run_id": tracker.run_id, "masks": masks, "state": state}


def fake_search(cfg: ExperimentConfig, trials: dict, tmp: Path, tag: str) -> tuple[str, dict]:
    search = MlflowTracking().start(cfg, str(tmp / tag), None)
    logged = {t: fake_trial(cfg, search.parent_run_id, t, c, r, seed=i) for i, (t, (c, r)) in enumerate(trials.items())}
    search.finish([])
    return search.parent_run_id, logged


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """A fresh MLflow database: experiment `known` (one search), then `newer` (two searches)."""
    tmp = tmp_path_factory.mktemp("tickets")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = dict(tracking__enabled="true", tracking__uri=uri, search__tolerance=0.02)
    cfg = tiny_config(data_root, tmp / "out", name="known", **base)
    parent, logged = fake_search(cfg, KNOWN, tmp, "known-1")
    newer = tiny_config(data_root, tmp / "out", name="newer", **base)
    first, _ = fake_search(newer, {"N": ({"rate": 0.2}, [(0.2, 0.605, 0.600)])}, tmp, "newer-1")
    second, _ = fake_search(newer, {"M": ({"rate": 0.4}, [(0.4, 0.601, 0.596)])}, tmp, "newer-2")
    return {"uri": uri, "parent": parent, "trials": logged, "newer": (first, second), "tmp": tmp}


@pytest.mark.parametrize("criterion, trial, round_index", ANSWERS)
def test_best_ticket_criteria(known: dict, criterion: dict, trial: str, round_index: int) -> None:
    ticket = best_ticket(experiment="known", tracking_uri=known["uri"], **criterion)
    sparsity, val, test = KNOWN[trial][1][round_index - 1]
    assert (ticket.trial_id, ticket.round) == (trial, round_index)
    assert ticket.run_id == known["trials"][trial]["run_id"]
    assert (ticket.sparsity, ticket.val_accuracy, ticket.test_accuracy) == (sparsity, val, test)
    assert ticket.metrics["dense_val_accuracy"] == DENSE_VAL
    assert ticket.params == KNOWN[trial][0]
    assert ticket.config.prune.rate == KNOWN[trial][0]["rate"] and ticket.config.search.tolerance == 0.02
    expected_mask = known["trials"][trial]["masks"][round_index]
    assert all(torch.equal(ticket.mask[n], expected_mask[n]) for n in expected_mask) and set(ticket.mask) == set(expected_mask)
    state = known["trials"][trial]["state"]
    assert all(torch.equal(ticket.rewind_weights[n], state[n]) for n in state)


def test_best_ticket_errors_and_defaults(known: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TrackingError, match="no ticket at sparsity >= 95.00%"):
        best_ticket(experiment="known", min_sparsity=0.95, tracking_uri=known["uri"])
    with pytest.raises(UnknownTrackingName, match="--experiment: no MLflow experiment 'nope'; experiments with lth-search runs: newer, known"):
        best_ticket(experiment="nope", tracking_uri=known["uri"])
    with pytest.raises(ConfigError, match="fraction"):  # a usage error (exit 2), not a runtime failure
        best_ticket(experiment="known", max_accuracy_drop=2, tracking_uri=known["uri"])
    # No experiment: the most recently created one holding a search; its latest search by default.
    first, second = known["newer"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", known["uri"])
    latest = best_ticket()
    assert (latest.experiment, latest.search_run_id, latest.trial_id) == ("newer", second, "M")
    assert best_ticket(search_run_id=first).trial_id == "N"
    rows = list_tickets(experiment="known")
    assert [(r["trial_id"], r["round"]) for r in rows] == [(t, i) for t in "ABC" for i in range(1, len(KNOWN[t][1]) + 1)]
    assert [r["matching"] for r in rows] == [True, True, False, True, True, False, False, True]
    assert len(format_tickets(rows).splitlines()) == 1 + len(rows)


def test_best_and_tickets_commands(known: dict, tmp_path: Path) -> None:
    """The commands run in this process (cli.main; the console script itself: test_served.py)."""
    uri = known["uri"]
    code, out, err = run_cli(["best", "--json", "--tracking-uri", uri, "--experiment", "known",
                              "--out", str(tmp_path / "ticket")])
    assert code == 0, err
    summary = json.loads(out)
    for key in ("run_id", "round", "sparsity", "val_accuracy", "test_accuracy", "dense_val_accuracy", "params"):
        assert key in summary
    assert (summary["run_id"], summary["round"], summary["test_accuracy"]) == (known["trials"]["B"]["run_id"], 2, 0.575)
    assert summary["params"] == {"rate": 0.5, "scope": "layerwise"}
    assert summary["model_uri"] == "models:/known@best"  # the default criterion's ticket is the registered one
    saved = Ticket.load(tmp_path / "ticket")
    files = sorted(p.name for p in (tmp_path / "ticket").iterdir())
    assert files == ["config.json", "mask.safetensors", "rewind.safetensors", "ticket.json", "trained.safetensors"]
    assert all(torch.equal(saved.mask[n], m) for n, m in known["trials"]["B"]["masks"][2].items())

    code, out, err = run_cli(["tickets", "--tracking-uri", uri, "--experiment", "known"])
    assert code == 0, err
    assert len(out.strip().splitlines()) == 9 and "layerwise" in out

    code, out, err = run_cli(["best", "--tracking-uri", uri, "--experiment", "known", "--min-sparsity", "0.99"])
    assert code == 1 and out == ""  # a valid command that found nothing: runtime failure
    assert err.count("\n") == 1 and "no ticket at sparsity >= 99.00%" in err


@pytest.fixture(scope="module")
def retrain_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database for the retraining tests (an experiment each)."""
    return f"sqlite:///{tmp_path_factory.mktemp('retrain') / 'mlflow.db'}"


@pytest.mark.parametrize("init_scale", ["measured", "calibrated"])
def test_retraining_the_ticket_reproduces_its_accuracy(data_root: Path, tmp_path: Path, init_scale: str,
                                                       retrain_uri: str) -> None:
    uri, experiment = retrain_uri, f"retrain-{init_scale}"
    cfg = tiny_config(data_root, tmp_path / "out", name=experiment, tracking__enabled="true", tracking__uri=uri,
                      search__tolerance=0.5)  # every round matches: the registered @best is a ticket of this trial
    dataset = load_dataset(cfg.data, cfg.seed)
    search = MlflowTracking().start(cfg, str(tmp_path / "ray"), None)
    choices = {"rate": 0.5, "rewind_step": 20, "init_scale": init_scale}
    _, _, result = tracked_trial(cfg, search.parent_run_id, "t0", choices, StageStore.from_config(cfg), dataset)
    search.finish([])

    ticket = best_ticket(experiment=experiment, min_sparsity=0.7, tracking_uri=uri)
    assert (ticket.round, ticket.rewind_step, ticket.config.prune.init_scale) == (2, 20, init_scale)
    assert ticket.rescale == result.rounds[1].rescale  # the factors the trial used, from MLflow alone
    model = ticket.rewound_model()
    state = model.state_dict()
    for name, kept in ticket.mask.items():
        assert not state[name][~kept].any()  # pruned weights are zero at the rewind point
        if not kept.all():  # and the survivors of a pruned layer are rescaled by the logged factor
            expected = ticket.rewind_weights[name][kept] * ticket.rescale[name]
            assert torch.allclose(state[name][kept], expected)
    cfg_t = ticket.config
    data = load_dataset(cfg_t.data, cfg_t.seed)
    # retrained by the arithmetic the stage was trained with (a pack of one, engine/packs.py)
    member = PackMember(model.state_dict(), data, cfg_t.seed, ticket.rewind_step, mask=ticket.mask)
    model.load_state_dict(train_pack(model, [member], cfg_t.train, choose_mode(model, "cpu"))[0].state)
    accuracy = evaluate(model, data.test, cfg_t.train.eval_batch_size)
    reported = result.rounds[1].test_accuracy
    assert ticket.test_accuracy == reported
    assert abs(accuracy - reported) <= 0.005
    assert accuracy == reported  # exact on CPU: same weights, mask, batches and seed
    assert MlflowClient(uri).get_model_version_by_alias(experiment, "best").tags["lth.run_id"] == ticket.run_id


def test_a_trials_first_attempt_creates_its_run_and_a_retry_finds_it(data_root: Path, tmp_path: Path) -> None:
    """A trial whose record the store does not hold never opened a run (a run is opened after the
    record is saved): its run is created without a search of the experiment's runs. A retry (the
    store holds its record) finds the run its earlier attempt opened."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(data_root, tmp_path / "out", name="attempts", tracking__enabled="true", tracking__uri=uri)
    search = MlflowTracking().start(cfg, str(tmp_path / "attempts-1"), None)
    runs: list[str] = []
    for first_attempt in (True, False, True):  # the third: told "first" though a run exists, so it shows
        tracker = TrialTracker.start(cfg, search.parent_run_id, "t1", {}, first_attempt=first_attempt)
        assert tracker.run_id is None  # opened when the trial first logs
        assert tracker.ensure_run()
        runs.append(tracker.run_id)
    assert runs[1] == runs[0] and runs[2] != runs[0]
