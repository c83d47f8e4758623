#!/usr/bin/env bash
# Creates ./.venv and installs lth-search into it (idempotent: a stamp of pyproject.toml
# skips the install when nothing changed). torch==2.13.0 goes in first: a plain `torch`
# requirement with no torch installed would pull a multi-GB CUDA build; on a GPU machine
# the same pin installs the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${LTH_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.lth-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-${extras}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
