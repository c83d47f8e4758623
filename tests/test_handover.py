"""Issue 21, acceptance 4: the README's serving snippet, verbatim, from the folder holding `lth_runs/`;
and a moved `lth_runs/` still opens its artifacts.

One tiny search named `quickstart` (the name the snippet loads) runs on the session's Ray with its
outputs in `<root>/lth_runs` (the quickstart's layout); the snippet is cut out of README.md and run
by a plain `python` in `<root>`, as a user pastes it. Then `lth_runs/` is moved to another folder:
an lth-search command on it re-roots the artifact locations MLflow stored absolute, after which
the same snippet (and `lth-search best --out`) work there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LTH_SEARCH, REPO
from search_helpers import search_config

from lth_search.api import run_search

pytestmark = pytest.mark.slow


def _snippet() -> str:
    """The README's serving snippet: the python block that loads models:/quickstart@best."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (snippet,) = [block for block in blocks if "models:/quickstart@best" in block]
    return snippet


def _run_snippet(folder: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    return subprocess.run([sys.executable, "-c", _snippet()], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def _predictions(done: subprocess.CompletedProcess) -> list[int]:
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()[-1]  # numpy prints "[3 1 4 1 5]"
    return [int(v) for v in printed.strip("[]").split()]


def test_the_readme_snippet_serves_the_best_ticket_and_a_moved_folder_keeps_its_artifacts(
        ray_local, data_root: Path, tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "repo", tmp_path / "moved"
    root.mkdir(), elsewhere.mkdir()
    cfg = search_config(data_root, root / "lth_runs", {
        "name": "quickstart", "tracking.enabled": "true", "search.num_trials": 1, "prune.rounds": 2,
        "search.asha.enabled": "false", "search.space.rewind_step": "null", "search.space.rate": "null",
    })
    summary = run_search(cfg, progress=lambda line: None)
    assert summary["finished"] == 1

    first = _run_snippet(root)
    predicted = _predictions(first)
    assert len(predicted) == 5 and all(0 <= p < 10 for p in predicted)
    assert sorted(p.name for p in root.iterdir()) == ["lth_runs"]  # no stray ./mlflow.db, no ./mlruns

    shutil.move(str(root / "lth_runs"), str(elsewhere / "lth_runs"))
    assert not (root / "lth_runs").exists()
    moved_db = elsewhere / "lth_runs" / "mlflow.db"
    stale = _run_snippet(elsewhere)  # MLflow alone still looks where the folder was
    assert stale.returncode != 0 and "No such artifact" in stale.stderr
    best = subprocess.run([LTH_SEARCH, "best", "--tracking-uri", f"sqlite:///{moved_db}", "--out",
                           str(tmp_path / "ticket"), "--json"], capture_output=True, text=True, timeout=300)
    assert best.returncode == 0, best.stderr[-3000:]
    assert "was moved" in best.stderr  # said once, as it re-roots the database
    assert json.loads(best.stdout)["run_id"] and (tmp_path / "ticket" / "trained.safetensors").exists()
    again = _run_snippet(elsewhere)
    assert _predictions(again) == predicted
    # nothing names the old folder any more
    with sqlite3.connect(moved_db) as connection:
        locations = [row[0] for row in connection.execute("SELECT artifact_uri FROM runs")]
    assert locations and all(str(elsewhere / "lth_runs" / "mlartifacts") in loc for loc in locations)
