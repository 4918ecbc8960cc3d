#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it: torch first, then loraship with the given
# extras (pinned ranges). torch: on a machine with a working NVIDIA GPU (nvidia-smi lists one), the CUDA
# build from PyPI; without one, the CPU build from PyTorch's CPU wheel index where it is reachable (a bare
# `pip install torch` on Linux pulls the multi-GB CUDA build), else whatever pip resolves. One line says
# which torch was installed. LORASHIP_VERBOSE=1 shows pip's and setuptools' own messages.
# Usage: bash scripts/install.sh [extras]   e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
TORCH_VERSION=2.13.0
quiet=(-qq)
if [ "${LORASHIP_VERBOSE:-0}" != "0" ]; then
  quiet=(-q)
else
  # setuptools' "Editable installation" banner is expected for `pip install -e`; nothing to act on.
  export PYTHONWARNINGS="ignore:Editable installation:Warning${PYTHONWARNINGS:+,$PYTHONWARNINGS}"
fi
# loraship needs Python 3.11 or newer (pyproject's requires-python): say so in one line, before touching anything.
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none")
case "$ver" in
  3.1[1-9]|3.[2-9][0-9]|[4-9].*) ;;
  *) echo "install: loraship needs Python >= 3.11; $py is ${ver/none/missing or broken} (install a newer python3, or remove an old .venv)" >&2; exit 1 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install "${quiet[@]}" --upgrade pip >/dev/null 2>&1 || true

new_torch=0
have=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "${have%%+*}" != "$TORCH_VERSION" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install "${quiet[@]}" "torch==$TORCH_VERSION"
  elif ! .venv/bin/pip install "${quiet[@]}" --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1 \
      "torch==$TORCH_VERSION" 2>/dev/null; then
    echo "install: PyTorch's CPU wheel index is not reachable; installing torch==$TORCH_VERSION as pip resolves it" >&2
    .venv/bin/pip install "${quiet[@]}" "torch==$TORCH_VERSION"
  fi
  new_torch=1
fi
if [ -n "$extras" ]; then
  .venv/bin/pip install "${quiet[@]}" -e ".[$extras]"
else
  .venv/bin/pip install "${quiet[@]}" -e .
fi
if [ "$new_torch" = 1 ]; then
  .venv/bin/python -c 'import torch; kind = "CUDA " + torch.version.cuda if torch.version.cuda else "CPU"
print(f"install: torch {torch.__version__} ({kind} build; GPU visible: {torch.cuda.is_available()})")'
fi
