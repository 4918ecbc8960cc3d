#!/usr/bin/env bash
# GPU check, for a machine with one or more NVIDIA GPUs (never needed by CI): trains the MiniLM config for
# a few hundred steps on 1 GPU in bf16 and in fp16, on all GPUs with DDP if there are several, exports the
# bf16 run, and prints samples/s and AG News test accuracy for each. Needs a Python with a CUDA build of
# torch and this project installed (pip install -e .); set PYTHON to use another interpreter.
# Usage: bash scripts/gpu_check.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
STEPS="${1:-300}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORASHIP_DATA_DIR="${LORASHIP_DATA_DIR:-../shared/data/agnews}"
nvidia-smi --query-gpu=name,memory.total --format=csv
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "error: no CUDA GPU visible to $PY" >&2; exit 1; }
common=(--config configs/agnews_minilm.yaml "train.max_steps=$STEPS" train.eval_baseline=false train.save_every=0
        train.eval_batch_size=256 output.overwrite=true output.tensorboard=false)
runs=()
for mp in bf16 fp16; do
  "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/gpu_$mp.yaml" trainer/train.py "${common[@]}" "output.run_dir=runs/gpu_$mp"
  runs+=("runs/gpu_$mp")
done
if [ "$NGPU" -gt 1 ]; then
  "$PY" -m accelerate.commands.launch --config_file configs/accelerate/multi_gpu_ddp.yaml --num_processes "$NGPU" \
    trainer/train.py "${common[@]}" "output.run_dir=runs/gpu_ddp"
  runs+=("runs/gpu_ddp")
fi
"$PY" -m export.to_onnx --run runs/gpu_bf16 --eval-file "$LORASHIP_DATA_DIR/test.jsonl" --force
for r in "${runs[@]}"; do
  "$PY" -c "import json,sys; s=json.load(open('$r/summary.json')); print(f\"$r: {s['num_processes']} proc, {s['mixed_precision']}, {s['samples_per_second']:.0f} samples/s, test accuracy {s.get('test_accuracy', float('nan')):.4f}\")"
done
"$PY" -c "import json; g=json.load(open('runs/gpu_bf16/onnx/export_report.json'))['gate']; print('export (bf16-trained, merged in fp32):', {k: round(g[k]['accuracy'], 4) for k in ('merged','onnx_fp32','onnx_int8')})"
