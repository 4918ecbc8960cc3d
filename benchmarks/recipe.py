"""Which recipe settings help: one training per (task, setting), validation and test accuracy side by side.

    python benchmarks/recipe.py [--tasks trec_coarse trec_fine agnews] [--settings default head_lr_x5 ...]

Each run is `accelerate launch trainer/train.py --config configs/<task>.yaml <overrides>` into a temp run
dir, the defaults plus one setting changed. Task agnews runs under a 5-minute time budget, so its rows compare
settings at equal training time; agnews_full runs the default epochs (~16 minutes on a 2-core CPU without bf16). The
best adapter is chosen on validation; test accuracy and macro F1 are reported, never used to choose.
Results are saved after every run (benchmarks/results/recipe.json), so a stopped sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, machine, save

TASKS = {
    "trec_coarse": ("configs/trec_coarse.yaml", []),
    "trec_fine": ("configs/trec_fine.yaml", []),
    "agnews": ("configs/agnews_minilm.yaml", ["train.time_budget_minutes=5"]),
    "agnews_full": ("configs/agnews_minilm.yaml", []),  # the default epochs, no budget (~16 min on 2 fp32 cores)
}
SETTINGS = {
    "default": [],
    "head_lr_x1": ["train.head_lr_scale=1"],
    "head_lr_x5": ["train.head_lr_scale=5"],
    "label_smoothing_0.1": ["train.label_smoothing=0.1"],
    "warmup_0.1": ["train.warmup_ratio=0.1"],
    "lora_r8_qv": ["lora.r=8", "lora.alpha=16", "lora.target_modules=[query,value]"],
    "class_weights_auto": ["train.class_weights=auto"],
    "pooling_first": ["model.pooling=first"],
    "pooling_mean": ["model.pooling=mean"],
}


def train(task: str, setting: str, tmp: Path) -> dict[str, object]:
    config, extra = TASKS[task]
    run = tmp / f"{task}-{setting}"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "trainer/train.py", "--config", config,
           f"output.run_dir={run}", *extra, *SETTINGS[setting]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        return {"task": task, "setting": setting, "error": res.stderr[-2000:]}
    s = json.loads((run / "summary.json").read_text())
    return {"task": task, "setting": setting, "overrides": [*extra, *SETTINGS[setting]],
            "validation_accuracy": s["best_val_accuracy"], "test_accuracy": s["test_accuracy"],
            "test_f1_macro": s["test_f1_macro"], "train_seconds": s["train_seconds"], "steps": s["steps"],
            "pooling": s["pooling"], "epochs": s["recipe"]["epochs"], "early_stopped_at_step": s["recipe"].get("early_stopped_at_step"),
            "wall_seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--append", action="store_true", help="keep the saved rows of other (task, setting) pairs")
    args = p.parse_args()
    rows: list[dict[str, object]] = []
    command = "python benchmarks/recipe.py --tasks " + " ".join(args.tasks) + " --settings " + " ".join(args.settings)
    saved = RESULTS / "recipe.json"
    if args.append and saved.is_file():
        old = json.loads(saved.read_text())
        wanted = {(t, s) for t in args.tasks for s in args.settings}
        rows = [r for r in old["rows"] if (r["task"], r["setting"]) not in wanted]
        command = f"{old['command']}; {command} --append"
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for setting in args.settings:
                rows.append(train(task, setting, Path(tmp)))
                r = rows[-1]
                print(f"{task} {setting}: " + (f"val {r['validation_accuracy']:.4f} test {r['test_accuracy']:.4f} "
                      f"macro F1 {r['test_f1_macro']:.4f} in {r['train_seconds']:.0f}s" if "error" not in r else "failed"), flush=True)
                # rows in table order: tasks, then settings, as listed above (appended runs included)
                rows.sort(key=lambda r: (list(TASKS).index(r["task"]), list(SETTINGS).index(r["setting"])))
                save("recipe", {"benchmark": "recipe", "machine": machine(), "rows": rows, "command": command})
    return 0


if __name__ == "__main__":
    sys.exit(main())
