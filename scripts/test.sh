#!/usr/bin/env bash
# Create .venv if missing, install .[dev], run ruff, the import-layering contract, mypy and the test-suite.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev
export HF_HUB_DISABLE_TELEMETRY=1
# the suite starts a few hundred interpreters: let them reuse compiled bytecode (__pycache__/, git-ignored)
unset PYTHONDONTWRITEBYTECODE
ruff check .
ruff format --check --quiet .
lint-imports  # the layers contract in pyproject.toml ([tool.importlinter])
mypy  # the type checker over hf_optim, configured in pyproject.toml ([tool.mypy])
# three workers on two cores: many tests wait (on subprocesses, process groups, retries) more than they compute
python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-3}" "$@"
