"""Searches on a real local Ray with real Optuna: reports, reuse, the objective, ASHA.

Each test runs a tiny search (MLP [32], 200 steps per stage, 3 rounds) on the session's
Ray, or reads the session's shared tracked search (conftest.py), and judges it by what it
left on disk: Ray's result files, the store's manifests and trial records, and the Optuna
journal.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from search_helpers import expected_matching, load_study, manifests, search_config, trial_records, trial_results

from lth_search.errors import ConfigError
from lth_search.api import best_ticket, resume_search, run_search

pytestmark = pytest.mark.slow


def test_small_search_reports_each_round_and_trains_dense_once(tracked_search):
    # the session's shared tracked search (conftest.py): 4 recipes, no ASHA, tolerance 0.02
    cfg, summary, lines, out = tracked_search.cfg, tracked_search.summary, tracked_search.lines, tracked_search.tmp
    assert cfg.search.tolerance == 0.02 and not cfg.search.asha.enabled

    histories = trial_results(summary["results_path"])
    assert len(histories) == 4 and summary["trials"] == 4 and summary["finished"] == 4
    for rows in histories.values():
        # one report per round, training_iteration = round
        assert [r["training_iteration"] for r in rows] == [1, 2, 3]
        assert [r["round"] for r in rows] == [1, 2, 3]
        # the running objective is the matching sparsity over the rounds reported so far
        dense_val = rows[0]["dense_val_accuracy"]
        for i, row in enumerate(rows):
            seen = [(r["sparsity"], r["val_accuracy"]) for r in rows[: i + 1]]
            assert row["matching_sparsity"] == pytest.approx(expected_matching(dense_val, seen, 0.02))
        assert all(r["dense_val_accuracy"] == dense_val for r in rows)

    # the dense stage exists once and exactly one trial trained it; every other trial reused it
    dense = [m for m in manifests(out / "store") if m["kind"] == "dense"]
    assert len(dense) == 1
    records = trial_records(out / "store", cfg.name)
    assert len(records) == 4
    trained_dense = [r for r in records.values() if dense[0]["key"] in r["attempts"][0]["executed_keys"]]
    assert len(trained_dense) == 1
    for trial_id, rows in histories.items():
        if records[trial_id] is not trained_dense[0]:
            assert rows[0]["steps_reused"] >= 200  # the dense stage's steps came from the store

    # Optuna was told each trial's final objective
    study = load_study(out, cfg.name, summary["search_id"])
    told = {t.number: t.value for t in study.trials}
    for trial_id, rows in histories.items():
        assert told[records[trial_id]["optuna_trial"]] == pytest.approx(rows[-1]["matching_sparsity"])
    # ... under the objective's name, each trial linked to its Ray trial and its MLflow run
    assert study.metric_names == ["matching_sparsity"]
    client = MlflowClient(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.experiment_name()).experiment_id
    runs = {r.data.tags["lth.trial_id"]: r.info.run_id for r in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")}
    by_number = {t.number: t for t in study.trials}
    for trial_id in histories:
        attrs = by_number[records[trial_id]["optuna_trial"]].user_attrs
        assert attrs["ray_trial_id"] == trial_id and attrs["mlflow_run_id"] == runs[trial_id]

    # the summary names the best lineage and prints the MLflow command
    best = max(rows[-1]["matching_sparsity"] for rows in histories.values())
    assert summary["best"]["matching_sparsity"] == pytest.approx(best)
    assert any(line.startswith("best ticket:") for line in lines)
    assert any("mlflow ui --backend-store-uri sqlite:///" in line for line in lines)
    assert summary["steps_executed"] + summary["steps_reused"] == sum(
        rows[-1]["steps_executed"] + rows[-1]["steps_reused"] for rows in histories.values()
    )


def test_the_saved_search_state_keeps_no_history_of_ended_trials(tracked_search):
    # Ray snapshots its state at every trial checkpoint; an ended trial's metric windows and
    # its Optuna handle were carried into every snapshot and kept in the driver (issue 24)
    from ray.tune import ExperimentAnalysis
    from ray.tune.search.optuna import OptunaSearch

    results = tracked_search.summary["results_path"]
    trials = ExperimentAnalysis(results).trials
    assert len(trials) == 4 and all(t.status == "TERMINATED" for t in trials)
    for trial in trials:
        assert trial.run_metadata.metric_analysis == {} and trial.run_metadata.metric_n_steps == {}
        assert trial.last_result["matching_sparsity"] is not None and trial.last_result["done"]
        kept = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
        assert kept.checkpoint is not None and kept.metrics == {}  # the result's copy beside it is dropped
    searcher = OptunaSearch()
    searcher.restore_from_dir(results)  # Ray's own saved searcher, as Tuner.restore reads it
    assert searcher._ot_trials == {} and len(searcher._completed_trials) == 4


def test_asha_stops_a_lineage_worse_at_equal_sparsity_and_optuna_is_told_pruned(ray_local, data_root, tmp_path):
    # ASHA's clock is the sparsity level (20 %-prunes). The default rate-0.2 lineage (enqueued
    # first; one trial at a time) records its val margin at rungs 1, 2 and 4 (59 % sparsity);
    # a rate-0.8 lineage jumps to level 7 (80 %) in its first round and is compared at rung 4,
    # far worse there: stopped. A repeat of a recipe walks it again from the store.
    cfg = search_config(data_root, tmp_path, {
        "seed": 7,
        "prune.rounds": 7,
        "search.num_trials": 6,
        "search.max_concurrent": 1,
        "search.sampler": "random",
        "search.space.rate": "[0.2, 0.8]",
        "search.space.rewind_step": "null",
        "search.asha.grace_period": 1,
        "search.asha.reduction_factor": 2,
    })
    summary = run_search(cfg, progress=lambda _: None)

    histories = trial_results(summary["results_path"])
    records = trial_records(tmp_path / "store", cfg.name)
    stopped = {t: rows for t, rows in histories.items() if records[t]["status"] == "stopped"}
    assert stopped, "ASHA stopped no lineage"
    assert summary["stopped_by_asha"] == len(stopped)
    assert all(len(rows) < 7 for rows in stopped.values())

    study = load_study(tmp_path, cfg.name, summary["search_id"])
    by_number = {t.number: t for t in study.trials}
    assert by_number[0].params["rate"] == 0.2 and by_number[0].state.name == "COMPLETE"  # the default, first
    for trial_id in stopped:
        optuna_trial = by_number[records[trial_id]["optuna_trial"]]
        assert optuna_trial.state.name == "PRUNED"
        assert optuna_trial.params["rate"] == 0.8


def test_two_objectives_tell_optuna_both_values(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {"search.objectives": 2, "search.num_trials": 2,
                                              "search.space.rate": "[0.2, 0.4]", "prune.rounds": 2})
    summary = run_search(cfg, progress=lambda _: None)
    study = load_study(tmp_path, cfg.name, summary["search_id"])
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    records = trial_records(tmp_path / "store", cfg.name)
    told = {t.number: t.values for t in study.trials}
    for trial_id, rows in trial_results(summary["results_path"]).items():
        last = rows[-1]
        assert told[records[trial_id]["optuna_trial"]] == pytest.approx(
            [last["matching_sparsity"], last["matching_val_accuracy"]])


def test_a_search_without_rounds_reports_the_dense_stage_once(ray_local, data_root, tmp_path):
    cfg = search_config(data_root, tmp_path, {"prune.rounds": 0, "search.num_trials": 1})
    summary = run_search(cfg, progress=lambda _: None)
    (rows,) = trial_results(summary["results_path"]).values()
    assert [(r["training_iteration"], r["round"], r["matching_sparsity"]) for r in rows] == [(1, 0, 0.0)]
    assert summary["finished"] == 1


def test_resume_of_an_unknown_search_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        resume_search("nope", output_dir=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "no search named nope" in message and "lth-search run" in message


def test_confirmation_selects_on_fresh_seeds_and_reports_the_gain_on_others(ray_local, data_root, tmp_path):
    # Every round matches (tolerance 0.99), so a lineage's score is its rate's sparsity after 3
    # rounds: rate 0.5 (87.5 %) beats the default rate 0.2 (48.8 %) on every seed, by 8 / 1.95.
    # It wins the selection and its gain is measured on reporting seeds that chose nothing.
    cfg = search_config(data_root, tmp_path, {
        "search.confirm_seeds": 2, "search.report_seeds": 2, "search.confirm_top_k": 1, "search.tolerance": 0.99,
        "search.num_trials": 2, "search.space.rewind_step": "null", "tracking.enabled": "true",
    })
    lines: list[str] = []
    summary = run_search(cfg, progress=lines.append)
    confirmation = summary["confirmation"]
    selection, reporting = confirmation["seeds"], confirmation["report_seeds"]
    assert len(selection) == len(reporting) == 2 and not {cfg.seed, *selection} & set(reporting)
    recipes = [s["recipe"] for s in confirmation["scores"]]
    assert recipes[0] == cfg.default_recipe() == {"rate": 0.2} and recipes[1] == {"rate": 0.5}
    assert all(s["seeds"] == selection for s in confirmation["scores"])  # paired: same seeds
    assert confirmation["chosen"]["recipe"] == {"rate": 0.5} and summary["best"]["choices"] == {"rate": 0.5}
    default, chosen = confirmation["report"]
    assert default["seeds"] == chosen["seeds"] == reporting
    gain = (1 / (1 - 0.875)) / (1 / (1 - 0.488))
    assert confirmation["gain"] == pytest.approx(gain, rel=0.01)
    assert confirmation["gain_ci"][0] <= confirmation["gain"] <= confirmation["gain_ci"][1]
    assert any("took no part in any choice" in line for line in lines)
    assert any(line.strip().startswith(f"gain of the search over the config's own recipe: {confirmation['gain']:.2f}x") for line in lines)

    # selection and reporting lineages are lineages of their own (fresh seeds: their own dense stages)
    dense_seeds = {m["inputs"]["seed"] for m in manifests(tmp_path / "store") if m["kind"] == "dense"}
    assert dense_seeds == {cfg.seed, *selection, *reporting}

    ticket = best_ticket(experiment=cfg.name, tracking_uri=cfg.tracking_uri())
    assert ticket.params == {"rate": 0.5} and ticket.trial_id == summary["best"]["trial_id"]
    assert ticket.summary()["confirmation"]["gain"] == pytest.approx(confirmation["gain"])
