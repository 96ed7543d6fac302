#!/usr/bin/env bash
# Create .venv if missing, install .[dev], run ruff and the test-suite.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev
export HF_HUB_DISABLE_TELEMETRY=1
ruff check .
ruff format --check --quiet .
python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" "$@"
