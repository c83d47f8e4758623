"""The MLflow run of `lth-search compare`: one run per comparison, beside the searches.

Tag `lth.metric` (the config's verdict metric: accuracy, loss or perplexity); params: the
kinds and the seeds; metrics `<kind>/val_<metric>`, `<kind>/test_<metric>` and `<kind>/sparsity`
at step = round (means over seeds, so the UI charts a line per kind), `dense_val_<metric>`,
`dense_test_<metric>`; artifacts: the plot, the table and the per-seed rows (CSV, which the UI
previews).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from lth_search.config import ExperimentConfig
from lth_search.tracking.client import MlflowIO
from lth_search.tracking.layout import METRIC, ROLE, SEARCH_NAME, metric_name
from lth_search.tracking.links import experiment_id, sync_hint, ui_hint

COMPARE_PLOT = "plots/compare_accuracy_vs_sparsity.png"


def log_compare(cfg: ExperimentConfig, result: Any, plot_png: bytes, progress: Callable[[str], None] = print) -> str | None:
    """Log a finished comparison (compare.CompareResult) as one run; its id, or None if MLflow failed."""
    if not cfg.tracking.enabled:
        return None
    io = MlflowIO(cfg.tracking_uri(), sync_hint(cfg))
    ok, experiment = io.call("create the experiment", lambda: io.experiment_id(cfg.experiment_name()))
    if not ok:
        return None
    tags = {ROLE: "compare", SEARCH_NAME: cfg.name, METRIC: result.metric.name}
    ok, run = io.call("create the compare run", lambda: io.client.create_run(
        experiment, tags=tags, run_name=f"{cfg.name} compare"))
    if not ok:
        return None
    run_id = run.info.run_id
    dense, metric = result.dense_mean(), result.metric
    params = {"kinds": ",".join(result.kinds), "seeds": ",".join(map(str, result.seeds)), "prune.rounds": cfg.prune.rounds,
              "prune.rewind_step": cfg.prune.rewind_step}

    def log_all() -> None:
        io.log_values(run_id, {f"dense_{k}": v for k, v in dense.items()}, step=0, params=params)
        for row in result.summary():
            kind = metric_name(row.kind)
            metrics = {f"{kind}/{metric.val_key}": row.val_mean, f"{kind}/{metric.test_key}": row.test_mean,
                       f"{kind}/sparsity": row.sparsity}
            if row.sign_preservation is not None:
                metrics[f"{kind}/sign_preservation"] = row.sign_preservation
            io.log_values(run_id, metrics, step=row.round)
        io.log_bytes(run_id, plot_png, COMPARE_PLOT)
        io.log_bytes(run_id, (result.table() + "\n").encode(), "compare/table.txt")
        io.log_bytes(run_id, result.rows_csv().encode(), "compare/rows.csv")
        io.log_bytes(run_id, json.dumps(result.to_json(), indent=2).encode(), "compare/compare.json")
        io.client.set_terminated(run_id, "FINISHED")

    ok, _ = io.call("log the comparison", log_all)
    if ok:
        progress(f"MLflow run {run_id} in experiment {cfg.experiment_name()}: {ui_hint(io.uri, experiment_id(cfg))}")
    return run_id if ok else None
