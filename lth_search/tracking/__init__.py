"""The tracking adapter: MLflow runs, artifacts, tickets table, model registry (the only mlflow imports).

In the experiment `cfg.experiment_name()`, a search is one parent run (search_run.py;
what it shows at the end: parent.py) with one child run per trial (trial_run.py); an
`lth-search lineage` is one run with a trial's layout (lineage_run.py). The names of
tags, artifacts and metrics are layout.py; every MLflow call goes through client.py
(retries, then a warning: tracking never fails a lineage). The store holds the truth:
sync.py logs from it whatever MLflow missed. Readers (ticket_table.py, tickets.py)
use nothing but MLflow.
"""

import os

# MLflow 3 sends usage telemetry to its makers' servers from a thread of every process that
# imports it, and wraps each client call in a record of it. lth-search talks to no network but
# the tracking URI a user gives it; set MLFLOW_DISABLE_TELEMETRY=false to opt in. Set here,
# before any tracking module imports mlflow (the layer rule keeps mlflow imports in this package).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
