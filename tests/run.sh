#!/bin/bash
# Run every test tier: unit (no privileges), integration (real runc + CRIU) and e2e
# (real containerd and podman). Needs root and `packaging/install.sh` done first.
# Extra arguments go to pytest (e.g. tests/unit, -k restore).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MIGRT_PYTHON:-/opt/migrt/venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "tests/run.sh: $PY not found: run packaging/install.sh first" >&2
    exit 2
fi
exec "$PY" -m pytest -p no:cacheprovider -rs -q "${@:-tests}"
