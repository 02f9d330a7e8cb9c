#!/bin/bash
# Build the artefacts a node operator installs from: dist/migrt-<version>-py3-none-any.whl
# (pip install; gives a `migrt` command) and dist/migrt.pyz (one file, needs only
# /usr/bin/python3 3.11+). Usage: bash packaging/build.sh [PYTHON]   (default: the venv's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${MIGRT_PYTHON:-/opt/migrt/venv/bin/python}}
mkdir -p dist
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w dist .
rm -rf build ./*.egg-info
"$PY" packaging/build_zipapp.py -o dist/migrt.pyz --python /usr/bin/python3
ls -l dist/
