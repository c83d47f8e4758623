#!/usr/bin/env bash
# The test suite: set up (with the test extra), then pytest. Real Ray, MLflow, Optuna,
# pyarrow; no GPU needed. Fails if pytest collects nothing.
# Two pytest workers (LTH_TEST_WORKERS), one test file each at a time: much of the suite
# waits on Ray and MLflow starting, so two files share 2 cores well (7 to 9 min against
# 11.3 min in one process, measured on 2 cores), the longest files first (tests/conftest.py
# LONGEST_FILES, hence --no-loadscope-reorder). LTH_TEST_WORKERS=0 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_ENABLE_ASYNC_LOGGING=false
exec .venv/bin/python -m pytest -n "${LTH_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
