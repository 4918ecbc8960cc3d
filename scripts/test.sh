#!/usr/bin/env bash
# The test command: installs what it needs on a fresh machine, lints, then runs the default suite
# (~3 min on 2 cores, including the 2-process `accelerate launch` tests and the SIGKILL/resume tests).
# Slow tests (real AG News model, 5 kill/resume trials each for 1 and 2 processes): bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
