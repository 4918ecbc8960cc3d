#!/usr/bin/env bash
# The main job on a fresh machine: install, train the default config (MiniLM + LoRA) on AG News,
# export to ONNX, evaluate fp32 vs int8 with serve_cli, predict the test texts, and print a summary.
# Rerunning reuses what is already done (training resumes if it was cut).
# Data (scripts/agnews_data.py): $LORASHIP_DATA_DIR, else ../shared/data/agnews, else the hub dataset
# fancyzhx/ag_news through `datasets` (FULL=1: all 120,000 training rows). Run dir: runs/agnews_minilm, or $RUN.
# Quiet by default (expected third-party warnings are filtered); --verbose or LORASHIP_VERBOSE=1 shows all.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--verbose" ]; then export LORASHIP_VERBOSE=1; fi
echo "== install: .venv"
bash scripts/install.sh tensorboard
export TOKENIZERS_PARALLELISM=false
DATA=$(.venv/bin/python scripts/agnews_data.py)   # may reach the hub: runs before offline mode
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 LORASHIP_DATA_DIR="$DATA"
RUN="${RUN:-runs/agnews_minilm}"

if [ -f "$RUN/summary.json" ]; then
  echo "== train: $RUN is complete, reusing it (delete it to retrain)"
else
  resume=()
  if [ -d "$RUN/checkpoints" ] && ls "$RUN/checkpoints" | grep -q '^step_'; then
    resume=(train.resume=latest)
  elif [ -d "$RUN" ]; then
    resume=(output.overwrite=true)   # cut before its first checkpoint: start it again (only a dir loraship wrote)
  fi
  echo "== train: $RUN"
  .venv/bin/accelerate launch --config_file configs/accelerate/cpu_1proc.yaml --num_cpu_threads_per_process "$(nproc)" \
    trainer/train.py --config configs/agnews_minilm.yaml "output.run_dir=$RUN" "${resume[@]}"
fi

echo "== export: $RUN/merged, $RUN/onnx"
# int8 method and default variant chosen on the run's validation split; the test split is measured next.
# --eval-file: the test figures of fp32 and int8 go into export_report.json and the model card.
.venv/bin/python -m export.to_onnx --run "$RUN" --eval-file "$DATA/test.jsonl"

echo "== evaluate: $RUN/eval/report.md"
.venv/bin/serve_cli eval --model "$RUN/onnx" --input "$DATA/test.jsonl" --report-dir "$RUN/eval" \
  --compare "$RUN/onnx@fp32" --overwrite

echo "== predict: $RUN/predictions.jsonl"
.venv/bin/serve_cli predict --model "$RUN/onnx" --input "$DATA/test.jsonl" --output "$RUN/predictions.jsonl" --overwrite

.venv/bin/python scripts/main_job_summary.py "$RUN"
