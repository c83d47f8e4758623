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


def test_compare_writes_table_plot_rows_and_an_mlflow_run(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = _command(data_root, tmp_path, "--kinds", "imp,random_prune,synflow", "--seeds", "0,1", "--out", str(out),
                       tracking__enabled="true", diagnostics__stability_steps="[0, 20]")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
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
