"""`lth-search compare`: kinds side by side at the IMP sparsities; table, plot, files and an MLflow run."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from conftest import LTH_SEARCH, REPO, tiny_overrides


def _command(data_root: Path, tmp_path: Path, *extra: str, **overrides: object) -> list[str]:
    sets = tiny_overrides(data_root, tmp_path / "runs", prune__rounds=2, search__space__rewind_step="null", **overrides)
    return [LTH_SEARCH, "compare", str(REPO / "configs/quickstart.yaml"), *[a for o in sets for a in ("--set", o)],
            *extra]


def _table(command: list[str]) -> list[str]:
    """The lines `lth-search compare` prints, once it has succeeded."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_compare_writes_table_plot_rows_and_an_mlflow_run(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = _command(data_root, tmp_path, "--kinds", "imp,random_prune,synflow", "--seeds", "0,1", "--out", str(out),
                       tracking__enabled="true", diagnostics__stability_steps="[0, 20]")
    table = _table(command)
    assert table[0].startswith("compare quickstart: seeds 0,1")
    assert table[1].startswith("dense instability barrier (val error, two data orders from theta_k): k=0: ")
    body = [line.split() for line in table[3:]]
    assert [(row[0], row[1]) for row in body] == [(k, r) for k in ("imp", "random_prune", "synflow") for r in ("1", "2")]
    assert {row[2] for row in body if row[1] == "2"} == {"36.00%"}  # every kind at the IMP sparsity
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 3 * 2 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    assert all(0 < float(r["sign_preservation"]) <= 1 for r in rows), rows  # every kind's rho, IMP's included
    report = json.loads((out / "compare.json").read_text())
    assert report["steps_executed"] > 0 and len(report["summary"]) == 6
    assert set(report["dense_barriers"]) == {"0", "1"}
    assert all(set(b) == {"0", "20"} and min(b.values()) >= 0 for b in report["dense_barriers"].values())

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], "tags.`lth.role` = 'compare'")
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "synflow/test_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")}
    assert "plots/compare_accuracy_vs_sparsity.png" in artifacts

    again = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps_executed"] == 0  # every stage from the store


def test_compare_rejects_an_unknown_kind(data_root: Path, tmp_path: Path) -> None:
    done = subprocess.run(_command(data_root, tmp_path, "--kinds", "imp,lottery"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("lth-search: error: kinds: unknown lottery (valid: imp,")
    assert not (tmp_path / "runs").exists()


def test_kinds_with_identical_rows_share_one_line_in_the_plot() -> None:
    """Fine-tuning under a constant schedule is learning-rate rewinding: one line, named for both."""
    from lth_search.tracking.plots import compare_lines

    def row(kind: str, sparsity: float, val: float) -> dict:
        return {"kind": kind, "sparsity": sparsity, "val_mean": val, "test_mean": val - 0.01}

    rows = [row("imp", 0.2, 0.6), row("imp", 0.36, 0.61), row("lr_rewind", 0.2, 0.58), row("lr_rewind", 0.36, 0.57),
            row("finetune", 0.36, 0.57), row("finetune", 0.2, 0.58), row("one_shot", 0.2, 0.58), row("one_shot", 0.36, 0.5)]
    assert compare_lines(rows) == [("imp", "imp"), ("lr_rewind = finetune", "lr_rewind"), ("one_shot", "one_shot")]


def test_a_loss_judged_comparison_tables_plots_and_logs_the_loss(data_root: Path, tmp_path: Path) -> None:
    """A comparison judged on loss (a language model's case: its sequence accuracy is ~0 at every
    round) speaks loss in its table, its JSON and its MLflow run; the rows keep accuracy and loss."""
    out = tmp_path / "out"
    command = _command(data_root, tmp_path, "--kinds", "imp,random_prune", "--seeds", "0", "--out", str(out),
                       tracking__enabled="true", search__metric="loss")
    table = _table(command)
    assert table[0].startswith("compare quickstart: seeds 0; dense val ") and "%" not in table[0], table[0]
    assert table[1].split()[4:6] == ["val", "loss"], table[1]
    report = json.loads((out / "compare.json").read_text())
    assert report["metric"] == "loss" and set(report["dense"]["0"]) == {"val_loss", "test_loss"}
    rows = report["rows"]
    assert all(0 < r["val_loss"] < 10 and 0 <= r["val_accuracy"] <= 1 for r in rows), rows
    imp_round_2 = next(r for r in rows if r["kind"] == "imp" and r["round"] == 2)
    summary = next(s for s in report["summary"] if s["kind"] == "imp" and s["round"] == 2)
    assert summary["val_mean"] == imp_round_2["val_loss"]  # one seed: the mean is its loss, not its accuracy
    assert table[2].split()[4] == f"{report['summary'][0]['val_mean']:.4g}"  # imp round 1, as a loss

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    run = client.search_runs([experiment.experiment_id], "tags.`lth.role` = 'compare'")[0]
    assert run.data.tags["lth.metric"] == "loss"
    assert {"imp/val_loss", "random_prune/test_loss", "dense_val_loss"} <= set(run.data.metrics)
    assert not any(key.endswith("accuracy") for key in run.data.metrics)
