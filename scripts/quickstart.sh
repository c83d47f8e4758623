#!/usr/bin/env bash
# The main job: set up, then run the quickstart search on a local Ray with a local
# MLflow sqlite database; results under ./lth_runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lth-search run configs/quickstart.yaml "$@"
