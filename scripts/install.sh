#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it: torch's CPU build first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then loraship with the given extras.
# Usage: bash scripts/install.sh [extras]   e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q torch==2.13.0
if [ -n "$extras" ]; then
  .venv/bin/pip install -q -e ".[$extras]"
else
  .venv/bin/pip install -q -e .
fi
