"""Names of things in MLflow: tags, artifact paths, metric keys (writers and readers share them).

tracking.py writes runs with these names; ticket_table.py and tickets.py read them
back with nothing but MLflow, so a name changed here changes both sides at once.
"""

from __future__ import annotations

import re

# Tags
ROLE = "lth.role"                 # search | trial | lineage
TRIAL_ID = "lth.trial_id"
SEARCH_NAME = "lth.search_name"
RAY_RESULTS = "lth.ray_results_path"
TOLERANCE = "lth.tolerance"       # the trial config's search.tolerance (repr of a float)
REWIND_STEP = "lth.rewind_step"
INPUT_SHAPE = "lth.input_shape"   # JSON list, e.g. [40] or [3, 32, 32]
NUM_CLASSES = "lth.num_classes"
STATUS = "lth.status"             # the trial record's status when the run was ended
PARENT = "mlflow.parentRunId"

# Artifacts
CONFIG = "config.json"
TICKETS = "tickets.parquet"
LINEAGE_PLOT = "plots/accuracy_vs_sparsity.png"
SEARCH_PLOT = "plots/search_summary.png"
MODEL_DIR = "best_ticket"


def mask_artifact(round_index: int) -> str:
    return f"masks/round_{round_index:02d}.parquet"


def rewind_artifact(step: int) -> str:
    return f"weights/rewind_{step}.safetensors"


# Metrics
ROUND_METRICS = ("val_accuracy", "test_accuracy", "sparsity", "reused", "train_loss", "train_steps_per_s")
"""Logged at step = round for every round."""
DENSE_VAL, DENSE_TEST = "dense_val_accuracy", "dense_test_accuracy"


def metric_name(name: str) -> str:
    """A layer name as MLflow accepts it in a metric key."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)
