"""The engine: data, models, masked training, pruning, the objective and one IMP lineage.

It runs without Ray, Optuna or MLflow (an import-rule test keeps it so).
"""
