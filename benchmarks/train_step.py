"""Training-step options side by side: what each one does to samples/s of the loraship step, one machine, one run.

    python benchmarks/train_step.py [--steps 30] [--reps 3] [--variants default,compile,...]

Every variant trains the default model (configs/agnews_minilm.yaml: MiniLM, LoRA r=16 on every linear layer,
base dropout off) on the same AG News batches (32 rows, length-grouped like the trainer's sampler, shuffled)
with the trainer's own model builder and AdamW parameter groups, in its own process; reps are interleaved and
each figure is the median. Timed: --steps steps after 3 warm-up steps (a compiled variant's compile time is
reported apart, as compile_seconds: a run pays it once, plus again for each new shape it meets).
- default: the trainer's step (SDPA attention, last layer for the first token only, foreach AdamW, fp32)
- last_layer_full: every token through the last layer (model.last_layer=full)
- eager_attention: attention as explicit matmul + softmax instead of SDPA (the last layer's first-token
  attention keeps SDPA)
- fused_adamw: AdamW(fused=True)
- compile: torch.compile(model, dynamic=True) (inductor)
- bf16_autocast: bf16 autocast, fp32 weights cast at every step (the trainer before this option)
- bf16_frozen_weights: bf16 autocast with the frozen base weights stored in bf16 (no cast), what a bf16
  training run does (train.mixed_precision=bf16)
Saves benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, run, save, table

VARIANTS = ["default", "last_layer_full", "eager_attention", "fused_adamw", "compile", "bf16_autocast", "bf16_frozen_weights"]
BATCH = 32


def batches(train_file: Path, steps: int, tokenizer: Any) -> list[dict]:
    import torch

    labels = ["World", "Sports", "Business", "Sci/Tech"]
    rows = [json.loads(x) for x in train_file.read_text().splitlines()[: BATCH * (steps + 3)]]
    rows.sort(key=lambda r: len(r["text"]))  # length groups, as LengthGroupedSampler
    out = []
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor([labels.index(r["label"]) for r in chunk])
        out.append(dict(enc))
    random.Random(0).shuffle(out)
    return out


def worker(variant: str, steps: int, train_file: Path) -> None:
    """One variant's timed steps; prints its throughput as JSON."""
    import torch
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.modeling import build_model, resolve_model_path, store_frozen_linear_weights
    from trainer.train import param_groups

    cfg = load_config(REPO / "configs" / "agnews_minilm.yaml", ["model.last_layer=full"] if variant == "last_layer_full" else [])
    model = build_model(cfg.model, cfg.lora, ["World", "Sports", "Business", "Sci/Tech"], cfg.train.seed)
    if variant == "eager_attention":
        # BertSelfAttention.forward is the explicit path; the SDPA mask [batch, 1, T, T] broadcasts there too.
        for layer in model.get_base_model().bert.encoder.layer:
            layer.attention.self.forward = type(layer.attention.self).__mro__[1].forward.__get__(layer.attention.self)
    if variant == "bf16_frozen_weights":
        store_frozen_linear_weights(model, torch.bfloat16)  # what a bf16 training run does
    data = batches(train_file, steps, AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path)))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train, 1.0), lr=cfg.train.lr, fused=variant == "fused_adamw")
    forward = torch.compile(model, dynamic=True) if variant == "compile" else model
    bf16 = variant.startswith("bf16")
    model.train()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    t0 = time.perf_counter()
    for batch in data[:3]:
        step(batch)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in data[3:]:
        step(batch)
    seconds = time.perf_counter() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in data[3:])
    print(json.dumps({"samples_per_second": BATCH * len(data[3:]) / seconds, "tokens_per_second": tokens / seconds,
                      "warmup_seconds": warm, "threads": torch.get_num_threads()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--emulated-bf16", action="store_true", help="run the bf16 variants on a CPU without native bf16")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    train_file = data_dir() / "train.jsonl"
    if args.worker:
        worker(args.worker, args.steps, train_file)
        return 0
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    from trainer.train import has_fast_bf16

    skipped = {}
    if not has_fast_bf16() and not args.emulated_bf16:
        # Emulated bf16 GEMMs: on a 2-core AMD EPYC without avx512_bf16 one bf16 worker ran 8 minutes without
        # finishing 23 steps (fp32: ~20 s), so the rows would say nothing but cost an hour.
        skipped = {n: "no native bf16 on this CPU, emulated bf16 is >20x slower per step; --emulated-bf16 runs them"
                   for n in names if n.startswith("bf16")}
        names = [n for n in names if n not in skipped]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            _, res = run([sys.executable, "benchmarks/train_step.py", "--worker", name, "--steps", str(args.steps)])
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"rep {rep + 1}/{args.reps} {name}: {runs[name][-1]['samples_per_second']:.1f} samples/s", flush=True)
    base = median([r["samples_per_second"] for r in runs[names[0]]])
    rows = [{"variant": n, "samples_per_second": median([r["samples_per_second"] for r in rs]),
             "x_first": median([r["samples_per_second"] for r in rs]) / base,
             # warm-up = 3 steps; for compile it is mostly the compilation
             "compile_seconds": median([r["warmup_seconds"] for r in rs]) if n == "compile" else None, "runs": rs}
            for n, rs in runs.items()]
    result = {"benchmark": "train_step", "machine": machine(), "steps": args.steps, "reps": args.reps,
              "command": f"python benchmarks/train_step.py --steps {args.steps} --reps {args.reps} --variants {args.variants}", "rows": rows,
              "skipped": skipped}
    print(table(["variant", "samples/s", f"x {names[0]}", "compile s"],
                [[r["variant"], f"{r['samples_per_second']:.1f}", f"{r['x_first']:.2f}",
                  f"{r['compile_seconds']:.0f}" if r["compile_seconds"] is not None else "-"] for r in rows]))
    save("train_step", result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
