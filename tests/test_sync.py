"""A tracking server that dies mid-search costs no result; `lth-search sync` fills MLflow in.

A real `mlflow server` (the session's, conftest.py) is killed (SIGKILL to its process
group) between two rounds of the first lineage. The lineages finish, with every stage and trial record in the
store; MLflow calls fail, are retried and reported, and never raise. After the server
restarts on the same backend, `sync_search` (what `lth-search sync NAME` runs) must
leave MLflow exactly as an uninterrupted search on the same server left its own
experiment: the same runs, metric keys, steps and values (timings aside: a stage's
steps/s is the one its store entry recorded), and masks equal to the store's.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from fault_helpers import run_cli
from lth_search.store.codec import decode_mask
from lth_search.engine.data import load_dataset
from lth_search.tracking.client import read_artifact
from lth_search.runs.search_lease import SearchLease
from lth_search.runs.summary import best_records
from lth_search.store.stage_store import StageStore
from lth_search.tracking.sync import sync_search
from lth_search.tracking.mlflow_observers import MlflowTracking
from mlflow_helpers import MlflowServer, save_search_state, search_layout, tracked_trial

TRIALS = {"t0": {"rate": 0.3}, "t1": {"rate": 0.5, "rewind_step": 20}}
TIMINGS = {"train_steps_per_s", "dense_train_steps_per_s"}


def run_search(cfg, dataset, search_id: str, kill_after_round_1=None):
    """A search's trials and finish without Ray (production runner and observers); returns
    (search tracker, records, store)."""
    store = StageStore.from_config(cfg)
    search = MlflowTracking().start(cfg, f"{cfg.output_path()}/ray/{search_id}", None)
    records = []
    for trial_id, choices in TRIALS.items():
        after = None
        if kill_after_round_1 is not None and trial_id == "t0":
            def after(round_index):
                if round_index == 1:
                    kill_after_round_1()
        _, record, _ = tracked_trial(cfg, search.parent_run_id, trial_id, choices, store, dataset, search_id, after)
        records.append(record)
    search.finish(records)
    save_search_state(cfg, search_id, search.parent_run_id)
    return search.tracker, records, store


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def trial_runs(client: MlflowClient, experiment: str) -> tuple[object, dict[str, object]]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return parents[0], {r.data.tags["lth.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_server_down_mid_search_then_sync(data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          mlflow_server: MlflowServer, quick_mlflow_retries) -> None:
    with mlflow_server.restarted() as server:  # the session's server (conftest.py)
        dataset = load_dataset(tiny_config(data_root, tmp_path).data, seed=0)
        # flush_s=0: each stage is sent as it ends, so the kill after round 1 leaves round 1 in MLflow
        common = dict(tracking__enabled="true", tracking__uri=server.url, search__tolerance=0.02, tracking__flush_s=0)
        reference = tiny_config(data_root, tmp_path / "ref", name="uninterrupted", **common)
        run_search(reference, dataset, "uninterrupted-1")

        cfg = tiny_config(data_root, tmp_path / "out", name="interrupted", **common)
        with caplog.at_level(logging.WARNING, logger="lth_search"):
            search, records, store = run_search(cfg, dataset, "interrupted-1", kill_after_round_1=server.kill)
        # The lineages completed and the store holds everything MLflow missed.
        assert [len(r.round_keys) for r in records] == [3, 3]
        assert all(store.get(key) is not None for r in records for key in [r.dense_key, *r.round_keys])
        assert search.missed and any("lth-search sync interrupted" in m for m in caplog.messages)

        server.start()  # same port, backend and artifacts
        client = MlflowClient(server.url)
        _, partial = trial_runs(client, "interrupted")
        assert sorted(m.step for m in client.get_metric_history(partial["t0"].info.run_id, "val_accuracy")) == [1]
        assert "t1" not in partial  # the second trial ran entirely while the server was down

        counts = sync_search("interrupted", output_dir=cfg.output_dir, progress=lambda line: None)
        assert counts["rounds"] == 5 and counts["dense"] == 1

        ref_parent, ref_runs = trial_runs(client, "uninterrupted")
        parent, runs = trial_runs(client, "interrupted")
        assert parent.info.run_id == search.parent_run_id and parent.info.status == "FINISHED"
        assert sorted(runs) == sorted(ref_runs) == sorted(TRIALS)
        for trial_id in TRIALS:
            expected, got = histories(client, ref_runs[trial_id].info.run_id), histories(client, runs[trial_id].info.run_id)
            assert sorted(got) == sorted(expected)
            for key in expected:
                if key in TIMINGS:
                    assert [s for s, _ in got[key]] == [s for s, _ in expected[key]]
                else:
                    assert got[key] == expected[key], key
            record = next(r for r in records if r.trial_id == trial_id)
            speeds = dict(got["train_steps_per_s"])
            for item in record.rounds:
                assert speeds[item.round] == store.get(item.key).metrics["train_steps_per_s"]
                mask_file = f"masks/round_{item.round:02d}.parquet"
                logged = decode_mask(read_artifact(client, runs[trial_id].info.run_id, mask_file))
                stored = store.get(item.key).masks["mask"]
                assert all(torch.equal(logged[n], stored[n]) for n in stored)
            assert runs[trial_id].data.params == ref_runs[trial_id].data.params
            assert runs[trial_id].info.status == "FINISHED"
        table = pq.read_table(io.BytesIO(read_artifact(client, parent.info.run_id, "tickets.parquet")))
        assert table.num_rows == 6
        assert parent.data.metrics["best_matching_sparsity"] == ref_parent.data.metrics["best_matching_sparsity"]
        search_layout(server.url, "interrupted", children=2)

        # A second sync (the command in this process, --json: one object on stdout) finds nothing missing.
        code, out, err = run_cli(["sync", "interrupted", "--output-dir", cfg.output_dir, "--json"])
        assert code == 0 and out.count("\n") == 1, out + err[-2000:]
        again = json.loads(out)
        assert again["rounds"] == 0 and again["dense"] == 0 and again["summaries"] == 0

        # While a driver holds the search (its lease), sync is refused in one line and logs nothing:
        # the driver's trials and finish log the same rounds and rewrite the same tables.
        with SearchLease(StageStore.from_config(cfg), "interrupted", "run"):
            code, out, err = run_cli(["sync", "interrupted", "--output-dir", cfg.output_dir])
        assert code == 1 and err.strip().count("\n") == 0, err
        assert "search interrupted is running already" in err and "`sync` again once it ends" in err


def test_sync_command_errors_are_one_line(tmp_path: Path) -> None:
    code, _, err = run_cli(["sync", "nosuch", "--output-dir", str(tmp_path)])
    assert code == 2
    assert err.strip().count("\n") == 0 and "no search named nosuch" in err


def test_batched_sends_leave_the_runs_per_stage_sends_leave_and_plot_the_best_trial(
        data_root: Path, tmp_path: Path) -> None:
    """A trial's run queues what it logs (tracking/pending.py) and a large search plots only its best
    trials at its finish: the runs must hold the same metrics, steps, params, masks and status as runs
    that sent every stage as it ended, and the plot must be on the best trial, not the other."""
    dataset = load_dataset(tiny_config(data_root, tmp_path).data, seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = dict(tracking__enabled="true", tracking__uri=uri, search__tolerance=0.02, search__num_trials=2)
    each = tiny_config(data_root, tmp_path / "each", name="each", tracking__flush_s=0, **common)
    run_search(each, dataset, "each-1")
    batched = tiny_config(data_root, tmp_path / "batched", name="batched", tracking__flush_s=3600,
                          tracking__trial_plots=1, **common)
    _, records, _ = run_search(batched, dataset, "batched-1")

    client = MlflowClient(uri)
    _, each_runs = trial_runs(client, "each")
    _, runs = trial_runs(client, "batched")
    for trial_id in TRIALS:
        expected, got = histories(client, each_runs[trial_id].info.run_id), histories(client, runs[trial_id].info.run_id)
        assert sorted(got) == sorted(expected)
        assert all(got[key] == expected[key] for key in expected if key not in TIMINGS)
        assert runs[trial_id].data.params == each_runs[trial_id].data.params
        assert runs[trial_id].info.status == "FINISHED" and runs[trial_id].data.tags["lth.complete"] == "1"
        names = {a.path for a in client.list_artifacts(runs[trial_id].info.run_id, "masks")}
        assert names == {a.path for a in client.list_artifacts(each_runs[trial_id].info.run_id, "masks")} != set()

    def plotted(run) -> bool:
        return "plots/accuracy_vs_sparsity.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    assert all(plotted(run) for run in each_runs.values())  # a search of <= trial_plots lineages: every trial
    best = best_records(records, 1)[0].trial_id
    assert {trial_id for trial_id, run in runs.items() if plotted(run)} == {best}


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_the_finish_keeps_every_summary_metric_of_a_complete_run(metric: str) -> None:
    # The finish keeps only the summary metrics of each complete run (issue 24: a run's ~60 others
    # were ~10 MB at 1,000 trials); a summary name it dropped would make every run look stale.
    from lth_search.engine.lineage.results import DenseResult, LineageResult, RoundResult
    from lth_search.tracking.layout import is_summary_metric, summary_metrics

    stage = dict(test_accuracy=0.6, train_loss=0.5, train_steps_per_s=9.0, reused=0, steps=80, val_loss=1.1, test_loss=1.2)
    rounds = [RoundResult(val_accuracy=0.64, key=f"r{r}", round=r, sparsity=1 - 0.8 ** r, matches=True, **stage)
              for r in (1, 2)]
    result = LineageResult(DenseResult(val_accuracy=0.65, key="dense", **stage), rounds, 160, 0, 0.01, metric=metric)
    summary = summary_metrics(result)
    assert metric == "accuracy" or "matching_val_loss" in summary
    assert all(is_summary_metric(name) for name in summary)
    assert not any(is_summary_metric(name) for name in ("val_accuracy", "sparsity", "layer_sparsity/fc1", "dense_val_accuracy"))


def test_a_failed_round_logs_no_margin_and_a_judged_one_does() -> None:
    # A failed round's verdict has margin -inf; MLflow would store -1.8e308 for it, which reads
    # as a number in tickets.csv and flattens every trial's margin chart.
    from lth_search.engine.lineage.results import RoundResult
    from lth_search.tracking.layout import round_metrics

    stage = dict(test_accuracy=0.1, train_loss=float("nan"), train_steps_per_s=9.0, reused=0, steps=80, key="r1")
    failed = round_metrics(RoundResult(val_accuracy=0.1, round=1, sparsity=0.2, matches=False, margin=float("-inf"),
                                       failed="training loss is nan", **stage))
    assert failed["matches"] == 0.0 and failed["failed"] == 1.0 and "margin" not in failed
    judged = round_metrics(RoundResult(val_accuracy=0.6, round=1, sparsity=0.2, matches=False, margin=-0.02, **stage))
    assert judged["margin"] == -0.02 and judged["failed"] == 0.0


def test_a_search_larger_than_trial_plots_times_inference_only_for_its_best_trials(
        data_root: Path, tmp_path: Path) -> None:
    """A search of more lineages than `tracking.trial_plots` times no round's inference gains as its
    trials go (a tenth of each round's training in the trial's slot, issue 24); its finish times every
    round of its best trials before the tickets table is written, so their rows carry the gains and
    the other trials' rows do not; and those of the trial a confirmation chose, once."""
    import pyarrow.csv

    from lth_search.tracking.child_runs import read_child_runs
    from lth_search.tracking.sync import detailed_trials, time_best_trials

    dataset = load_dataset(tiny_config(data_root, tmp_path).data, seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(data_root, tmp_path, name="large", tracking__enabled="true", tracking__uri=uri,
                      search__num_trials=2, search__tolerance=0.02, tracking__trial_plots=1,
                      tracking__measure_inference="true", tracking__inference_budget_s=0.02)
    search, records, _ = run_search(cfg, dataset, "large-1")

    client = MlflowClient(uri)
    parent, runs = trial_runs(client, "large")
    best = best_records(records, 1)[0]
    timed = {trial_id: {m.step for m in client.get_metric_history(run.info.run_id, "inference/latency_b1")}
             for trial_id, run in runs.items()}
    assert timed[best.trial_id] == set(range(1, len(best.round_keys) + 1)) != set()
    assert [steps for trial_id, steps in timed.items() if trial_id != best.trial_id] == [set()]
    table = pyarrow.csv.read_csv(io.BytesIO(read_artifact(client, parent.info.run_id, "tickets.csv"))).to_pylist()
    gains = {(row["trial_id"].removeprefix("trial "), row["round"]): row["inference_latency_b1"] for row in table}
    assert all((value is not None) == (trial_id == best.trial_id) for (trial_id, _), value in gains.items())
    assert any(value is not None for value in gains.values())

    # the trial a confirmation chose (the default recipe can win it from outside the best few) is timed too
    other = next(r for r in records if r.trial_id != best.trial_id)
    chosen = detailed_trials(cfg, records, other.trial_id)
    assert time_best_trials(search, chosen, read_child_runs(search)) == {
        runs[other.trial_id].info.run_id}
    steps = {m.step for m in client.get_metric_history(runs[other.trial_id].info.run_id, "inference/latency_b1")}
    assert steps == set(range(1, len(other.round_keys) + 1))
    assert time_best_trials(search, chosen, read_child_runs(search)) == set()  # once
