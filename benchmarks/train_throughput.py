"""Training throughput: the reference recipe (HF Trainer) vs the loraship loop, same model, data and machine.

    python benchmarks/train_throughput.py [--steps 30] [--reps 3]

Runs alternate (reference, ours with the reference LoRA settings, ours with the default config) and each
figure is the median over --reps runs of a fixed number of optimizer steps. Each run is its own process.
- reference recipe: HF Trainer as the replaced project used it: padding to max_length 128, per-device
  batch 16, fp32 on CPU, LoRA r=8 alpha=16 on query/value, dropout 0.1.
- ours, reference LoRA: trainer/train.py with configs/agnews_minilm.yaml but LoRA r=8 alpha=16 on
  query/value, dropout 0.1 (so only the loop differs: dynamic padding, length grouping, batch 32, and the
  default model.base_dropout=off); the same with model.base_dropout=keep shows what the dropout costs.
- ours, default: configs/agnews_minilm.yaml as shipped.
Throughput counts training steps only (our loop excludes its end-of-run evaluation and checkpoint). MFU:
model FLOP/s over the GEMM peak of the dtype measured by each run (trainer/mfu.py).
Saves benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, run, save, table

REF_LORA = ["lora.r=8", "lora.alpha=16", "lora.target_modules=[query,value]", "lora.dropout=0.1"]


def worker_reference(steps: int, train_file: Path) -> None:
    """The replaced project's HF Trainer setup; prints its throughput as JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from trainer.modeling import resolve_model_path

    labels = ["World", "Sports", "Business", "Sci/Tech"]
    rows = [json.loads(x) for x in train_file.read_text().splitlines()[: steps * 16 * 2]]
    path = resolve_model_path("packaged:all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=128)
    real_tokens = sum(sum(m) for m in enc["attention_mask"]) / len(rows)
    ds = Dataset.from_dict({**enc, "labels": [labels.index(r["label"]) for r in rows]})
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"]))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=16, max_steps=steps, learning_rate=5e-4,
                                 save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=42)
        out = Trainer(model=model, args=args, train_dataset=ds).train()
    sps = out.metrics["train_samples_per_second"]
    print(json.dumps({"samples_per_second": sps, "tokens_per_second": sps * real_tokens, "padded_tokens_per_second": sps * 128,
                      "threads": torch.get_num_threads()}))


def ours(steps: int, overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "trainer/train.py", "--config", "configs/agnews_minilm.yaml", f"train.max_steps={steps}",
             "data.validation_fraction=0.01", "data.test=", "train.eval_baseline=false", "train.save_every=0",
             "output.tensorboard=false", f"output.run_dir={tmp}/run", *overrides])
        s = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    return {"samples_per_second": s["samples_per_second"], "tokens_per_second": s["tokens_per_second"], "mfu": s["mfu"]["mfu"],
            "peak_gemm_gflops": s["mfu"]["peak_gemm_gflops"], "mfu_dtype": s["mfu"]["dtype"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--worker", choices=["reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    data = data_dir()
    if args.worker == "reference":
        worker_reference(args.steps, data / "train.jsonl")
        return 0
    variants = {
        "reference recipe (HF Trainer, pad 128, batch 16, fp32, LoRA r=8 q/v)": None,
        "loraship loop, reference LoRA (r=8 q/v, dropout 0.1)": REF_LORA,
        "loraship loop, reference LoRA, base-model dropout kept": [*REF_LORA, "model.base_dropout=keep"],
        "loraship loop, default config (r=16 all-linear)": [],
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    env = {"LORASHIP_DATA_DIR": str(data)}
    for rep in range(args.reps):
        for name, overrides in variants.items():
            if overrides is None:
                _, res = run([sys.executable, "benchmarks/train_throughput.py", "--worker", "reference", "--steps", str(args.steps)], env)
                r = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                r = ours(args.steps, overrides)
            runs[name].append(r)
            print(f"rep {rep + 1}/{args.reps} {name}: {r['samples_per_second']:.1f} samples/s", flush=True)
    ref_name = next(iter(variants))
    ref = median([r["samples_per_second"] for r in runs[ref_name]])
    rows = []
    for name, rs in runs.items():
        sps = median([r["samples_per_second"] for r in rs])
        rows.append({"name": name, "samples_per_second": sps, "tokens_per_second": median([r["tokens_per_second"] for r in rs]),
                     "ratio_vs_reference": sps / ref, "runs": rs,
                     # model FLOP/s over the GEMM peak each run measured (summary.json "mfu"); the reference has none
                     "mfu": median([r["mfu"] for r in rs]) if "mfu" in rs[0] else None})
    result = {"benchmark": "train_throughput", "machine": machine(), "steps": args.steps, "reps": args.reps,
              "command": f"python benchmarks/train_throughput.py --steps {args.steps} --reps {args.reps}", "rows": rows}
    print(table(["setup", "samples/s", "tokens/s", "x reference", "MFU"],
                [[r["name"], f"{r['samples_per_second']:.1f}", f"{r['tokens_per_second']:.0f}", f"{r['ratio_vs_reference']:.2f}",
                  f"{r['mfu']:.0%}" if r["mfu"] is not None else "-"] for r in rows]))
    save("train_throughput", result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
