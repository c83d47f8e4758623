"""The tracking adapter: MLflow runs, artifacts, tickets table, model registry (the only mlflow imports)."""
