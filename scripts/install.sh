#!/usr/bin/env bash
# One-step install: a virtual environment with the pinned package set, then the sample studies.
# Usage: bash scripts/install.sh        (CITRUSV_VENV=path to use another venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CITRUSV_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first: sam2 is an sdist whose build imports torch. Building it without isolation and
# without the optional CUDA extension avoids a second multi-GB torch download into a build env.
"${PIP[@]}" install -c constraints.txt torch torchvision setuptools wheel
SAM2_BUILD_CUDA=0 "${PIP[@]}" install -c constraints.txt --no-build-isolation sam2
"${PIP[@]}" install -c constraints.txt -e ".[test]"
if [ "${CITRUSV_SKIP_SAMPLES:-0}" != "1" ]; then
    "$VENV/bin/citrusv" sample-data
fi
