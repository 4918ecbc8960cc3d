#!/usr/bin/env bash
# The test command: installs what it needs on a fresh machine, lints, then runs the default (fast) suite.
# Slow tests (real AG News model, multi-process launches): bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
