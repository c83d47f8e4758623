#!/usr/bin/env bash
# The test suite: set up (with the test extra), then pytest. Real Ray, MLflow, Optuna,
# pyarrow; no GPU needed. Fails if pytest collects nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ASYNC_LOGGING=false
exec .venv/bin/python -m pytest "$@"
