"""Failed training is a failure: a non-finite loss or chance-level accuracy is never a ticket.

The two cases of issue 18, end to end: a plug-in data set with one NaN (the loss turns NaN
in every lineage) and the quickstart's MLP at SGD lr 100 (the dense network stays at
chance). Either way no ticket is reported, one line says which lineage failed and what to
try, and a search still finishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from fault_helpers import run_cli
from lth_search.api import run_search
from lth_search.config import load_config
from lth_search.errors import TrackingError
from lth_search.tracking.ticket_reader import best_ticket

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_lineage_at_lr_100_reports_no_ticket_in_one_warning_line(data_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(data_root, tmp_path, train__lr=100, train__optimizer="sgd", model__batch_norm="false",
                               model__widths="[100, 100]", prune__dense_replicates=2, search__space__rewind_step="null")
    code, out, err = run_cli(["lineage", str(REPO / "configs/quickstart.yaml"), *[a for o in overrides
                                                                                  for a in ("--set", o)]])
    assert code == 1
    warnings = [line for line in err.splitlines() if "did not train" in line]
    assert len(warnings) == 1 and "lineage quickstart seed 0 (imp) stopped" in warnings[0], err
    assert "try a lower train.lr" in warnings[0]
    assert out.startswith("no ticket: the dense network") and "round 1" not in err


@pytest.mark.slow
def test_a_search_on_data_with_a_nan_finishes_with_no_ticket(ray_local, data_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, tiny_overrides(data_root, tmp_path, name="nan-data") + [
        "data.name=custom_parts:nan_wave_data", "data.val_size=200", "model.widths=[16]", "search.num_trials=2", "search.max_concurrent=2",
        "search.space.rate=[0.2, 0.5]", "search.confirm_seeds=0", "tracking.enabled=true", f"tracking.uri={uri}",
    ]).absolute()
    lines: list[str] = []
    summary = run_search(cfg, progress=lines.append)
    assert summary["best"] is None and summary["failed"] == 2 and summary["trials"] == 2
    no_ticket = [line for line in lines if "has no ticket" in line]
    assert len(no_ticket) == 2 and all("training loss is nan" in line for line in no_ticket), lines
    assert any(line.startswith("best ticket: none (every lineage failed to train") for line in lines), lines
    with pytest.raises(TrackingError, match="no ticket"):
        best_ticket(experiment="nan-data", tracking_uri=uri)
