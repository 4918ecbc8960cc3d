#!/usr/bin/env bash
# The main job on a fresh machine: install, train the default config (MiniLM + LoRA) on AG News,
# export to ONNX with the accuracy gate on the test split, evaluate fp32 vs int8 with serve_cli,
# and predict the test texts. Rerunning reuses what is already done (training resumes if it was cut).
# Data: ../shared/data/agnews, or $LORASHIP_DATA_DIR. Run dir: runs/agnews_minilm, or $RUN.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh tensorboard
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA="${LORASHIP_DATA_DIR:-../shared/data/agnews}"
RUN="${RUN:-runs/agnews_minilm}"
if [ ! -f "$DATA/train.jsonl" ] || [ ! -f "$DATA/test.jsonl" ]; then
  echo "error: AG News not found in $DATA (train.jsonl, test.jsonl); set LORASHIP_DATA_DIR" >&2
  exit 1
fi
export LORASHIP_DATA_DIR="$DATA"

if [ -f "$RUN/summary.json" ]; then
  echo "== train: $RUN is complete, reusing it (delete it to retrain)"
else
  resume=()
  [ -d "$RUN/checkpoints" ] && ls "$RUN/checkpoints" | grep -q step_ && resume=(train.resume=latest)
  echo "== train: $RUN"
  .venv/bin/accelerate launch --config_file configs/accelerate/cpu_1proc.yaml \
    trainer/train.py --config configs/agnews_minilm.yaml "output.run_dir=$RUN" "${resume[@]}"
fi

echo "== export: $RUN/merged, $RUN/onnx"
.venv/bin/python -m export.to_onnx --run "$RUN" --eval-file "$DATA/test.jsonl"

echo "== evaluate: $RUN/eval/report.md"
.venv/bin/serve_cli eval --model "$RUN/onnx" --input "$DATA/test.jsonl" --report-dir "$RUN/eval" \
  --compare "$RUN/onnx@fp32" --overwrite

echo "== predict: $RUN/predictions.jsonl"
.venv/bin/serve_cli predict --model "$RUN/onnx" --input "$DATA/test.jsonl" --output "$RUN/predictions.jsonl" --overwrite
