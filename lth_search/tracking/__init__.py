"""The tracking adapter: MLflow runs, artifacts, tickets table, model registry (the only mlflow imports).

In the experiment `cfg.experiment_name()`, a search is one parent run (search_run.py;
what it shows at the end: parent.py) with one child run per trial (trial_run.py); an
`lth-search lineage` is one run with a trial's layout (lineage_run.py). The names of
tags, artifacts and metrics are layout.py; every MLflow call goes through client.py
(retries, then a warning: tracking never fails a lineage). The store holds the truth:
sync.py logs from it whatever MLflow missed. Readers (ticket_table.py, tickets.py)
use nothing but MLflow.
"""
