# Sourced by demo.sh and test.sh: create .venv if missing and install the project.
# torch==2.13.0 goes first: that release lies on these machines' disk as a CPU build,
# while a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
EXTRAS="${1:-dev}"
STAMP=".venv/.hf_optim-installed-$EXTRAS"
# Reinstall when the build inputs change: the package metadata, or the start-up hook that the build copies
# into site-packages (hf_optim/_autoload.py -> _hf_optim_autoload.py, hf_optim/_console.py -> _hf_optim_console.py,
# via hatch_build.py).
stale=0
for f in pyproject.toml hatch_build.py hf_optim/_autoload.py hf_optim/_console.py hf_optim_autoload.pth; do
  [ "$f" -nt "$STAMP" ] && stale=1
done
if [ ! -f "$STAMP" ] || [ "$stale" = 1 ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
    || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[$EXTRAS]"
  touch "$STAMP"
fi
