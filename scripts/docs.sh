#!/usr/bin/env bash
# Build the docs site strictly (warnings, broken links and unresolved references fail): `bash scripts/docs.sh`.
# `bash scripts/docs.sh serve` previews it on http://127.0.0.1:8000. Reuses .venv and installs the [docs] extra
# (guarded by its own stamp in scripts/_venv.sh).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" docs
export HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg NO_MKDOCS_2_WARNING=1
if [ "${1:-build}" = serve ]; then
  shift
  exec mkdocs serve --strict --dev-addr "${DOCS_ADDR:-127.0.0.1:8000}" "$@"
fi
start=$(date +%s)
mkdocs build --strict --clean "$@"
echo "docs: site/ built in $(($(date +%s) - start)) s"
