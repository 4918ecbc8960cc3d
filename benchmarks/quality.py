"""Quality: test-split accuracy of the default config and of the reference project's LoRA settings.

    python benchmarks/quality.py [--retrain]

For each setup: train on the AG News train copy with model selection on a validation split carved from
train (never on test), export, then report test accuracy and weighted F1 of the untrained model (random
head), the best adapter, the merged model, ONNX fp32 and ONNX int8, plus the training wall time.
Existing complete run dirs are reused unless --retrain. Saves benchmarks/results/quality.json.
- default: configs/agnews_minilm.yaml as shipped (runs/agnews_minilm, the main job's run);
- reference LoRA: the same with LoRA r=8, alpha=16 on query/value, dropout 0.1 (runs/agnews_minilm_refLoRA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, run, save, table

SETUPS = {
    "default config (LoRA r=16 all-linear, 2 epochs)": ("runs/agnews_minilm", []),
    "reference LoRA settings (r=8, alpha=16, query/value, dropout 0.1)": (
        "runs/agnews_minilm_refLoRA",
        ["lora.r=8", "lora.alpha=16", "lora.target_modules=[query,value]", "lora.dropout=0.1"],
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    data = data_dir()
    env = {"LORASHIP_DATA_DIR": str(data)}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    rows = []
    for name, (run_dir, overrides) in SETUPS.items():
        rd = REPO / run_dir
        if args.retrain and rd.exists():
            shutil.rmtree(rd)
        if not (rd / "summary.json").is_file():
            resume = ["train.resume=latest"] if list((rd / "checkpoints").glob("step_*")) else []
            print(f"training {name} -> {run_dir}", flush=True)
            run([accelerate, "launch", "--config_file", "configs/accelerate/cpu_1proc.yaml", "trainer/train.py",
                 "--config", "configs/agnews_minilm.yaml", f"output.run_dir={run_dir}", *overrides, *resume], env)
        print(f"exporting {run_dir}", flush=True)
        run([sys.executable, "-m", "export.to_onnx", "--run", run_dir, "--eval-file", str(data / "test.jsonl")], env)
        summary = json.loads((rd / "summary.json").read_text())
        test = json.loads((rd / "test_metrics.json").read_text())
        baseline = next(json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()
                        if '"baseline"' in x and '"test"' in x)
        gate = json.loads((rd / "onnx" / "export_report.json").read_text())["gate"]
        rows.append({
            "name": name, "run_dir": run_dir, "overrides": overrides,
            "untrained": {"accuracy": baseline["accuracy"], "f1_weighted": baseline["f1_weighted"]},
            "adapter": {"accuracy": test["accuracy"], "f1_weighted": test["f1_weighted"]},
            "merged": gate["merged"], "onnx_fp32": gate["onnx_fp32"], "onnx_int8": gate["onnx_int8"],
            "int8_minus_merged_points": 100 * (gate["onnx_int8"]["accuracy"] - gate["merged"]["accuracy"]),
            "train_seconds": summary["train_seconds"], "samples_per_second": summary["samples_per_second"],
            "best_step": summary["best_step"], "steps": summary["steps"],
        })
    result = {"benchmark": "quality", "machine": machine(), "test_rows": gate["rows"], "rows": rows,
              "command": "python benchmarks/quality.py"}
    cols = ("untrained", "adapter", "merged", "onnx_fp32", "onnx_int8")
    print(table(["setup", *cols, "train s"],
                [[r["name"], *[f"{r[c]['accuracy']:.4f}" for c in cols], f"{r['train_seconds']:.0f}"] for r in rows]))
    save("quality", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
