"""Pooling for the classifier on AG News: the first token vs the mean over tokens, same LoRA, data, steps, schedule.

    python benchmarks/pooling.py [--epochs 1] [--arms cls,mean] [--append] [--rows N (first N train and test rows, a smoke run)]

The evidence that led to the trainer's `model.pooling` option (whose mean is built as an appended encoder layer and
compared by `benchmarks/recipe.py --settings pooling_first pooling_mean`); this script's mean arm feeds the mean
straight into the classifier, a head the standard BERT export could not carry. all-MiniLM-L6-v2 was trained as a
sentence embedding with mean pooling, so its [CLS] output carries no trained summary. Each arm runs in its own process with the
trainer's model builder and defaults (configs/agnews_minilm.yaml: LoRA r=16 on every linear layer, lr 0.001,
linear schedule with 6% warmup, AdamW groups, clipping at 1.0, batch 32 length-grouped), for --epochs epochs:
- cls: the model's own forward (pooler on token 0; the last layer for the first token only, as the trainer)
- mean: the masked mean of the last hidden states -> the classifier (dropout + linear); pooler unused
Validation: a seeded 5% of train.jsonl; test: all of test.jsonl. Saves benchmarks/results/pooling.json.
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
from common import REPO, data_dir, machine, run, save, table

ARMS = ["cls", "mean"]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
BATCH = 32


def encode(tokenizer: Any, rows: list[dict]) -> list[tuple[list[int], int]]:
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=128)["input_ids"]
    return [(ids, LABELS.index(r["label"])) for ids, r in zip(enc, rows, strict=True)]


def batches(rows: list[tuple[list[int], int]], size: int, seed: int | None, pad: int) -> list[dict]:
    """Padded batches; with a seed, shuffled in length groups (50 batches sorted by length, then shuffled)."""
    import torch

    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
        group = size * 50
        order = [i for g in range(0, len(order), group) for i in sorted(order[g : g + group], key=lambda i: len(rows[i][0]))]
    else:
        order.sort(key=lambda i: len(rows[i][0]))
    out = []
    for b in range(0, len(order), size):
        chunk = [rows[i] for i in order[b : b + size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in chunk])})
    if seed is not None:
        random.Random(seed + 1).shuffle(out)
    return out


def worker(arm: str, epochs: int, data: Path, limit: int) -> None:
    """One arm: train, then accuracy on validation and test; prints JSON."""
    import torch
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.modeling import build_model, resolve_model_path
    from trainer.recipe import lr_factor
    from trainer.train import param_groups

    # mean reads every token of the last layer: the first-token-only shortcut must not run there
    # model.pooling=first for both: this script builds its own mean head on the model without the pooling layer
    cfg = load_config(REPO / "configs" / "agnews_minilm.yaml", ["model.pooling=first"] + (["model.last_layer=full"] if arm == "mean" else []))
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()[: limit or None] if x.strip()]
    random.Random(cfg.train.seed).shuffle(rows)
    n_val = len(rows) // 20
    val, train = encode(tokenizer, rows[:n_val]), encode(tokenizer, rows[n_val:])
    test = encode(tokenizer, [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()[: limit or None] if x.strip()])
    model = build_model(cfg.model, cfg.lora, LABELS, cfg.train.seed)
    base = model.get_base_model()

    def logits(batch: dict) -> torch.Tensor:
        if arm == "cls":
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = base.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return base.classifier(base.dropout((hidden * mask).sum(1) / mask.sum(1)))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.train, 1.0), lr=cfg.train.lr)
    plan = [batches(train, BATCH, cfg.train.seed + e, tokenizer.pad_token_id) for e in range(epochs)]
    total = sum(len(p) for p in plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.train.warmup_ratio, cfg.train.scheduler))
    model.train()
    t0 = time.perf_counter()
    for batch in (b for p in plan for b in p):
        loss = torch.nn.functional.cross_entropy(logits(batch), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()

    def accuracy(split: list[tuple[list[int], int]]) -> float:
        with torch.no_grad():
            hits = sum(int((logits(b).argmax(-1) == b["labels"]).sum()) for b in batches(split, 128, None, tokenizer.pad_token_id))
        return hits / len(split)

    print(json.dumps({"epochs": epochs, "validation_accuracy": accuracy(val), "test_accuracy": accuracy(test), "train_seconds": seconds,
                      "samples_per_second": len(train) * epochs / seconds, "steps": total,
                      "validation_rows": len(val), "test_rows": len(test)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--append", action="store_true", help="add the rows to the saved results instead of replacing them")
    p.add_argument("--rows", type=int, default=0, help="first N train and test rows only (0: all)")
    p.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    data = data_dir()
    if args.worker:
        worker(args.worker, args.epochs, data, args.rows)
        return 0
    rows = []
    for arm in args.arms.split(","):
        _, res = run([sys.executable, "benchmarks/pooling.py", "--worker", arm, "--epochs", str(args.epochs), "--rows", str(args.rows)])
        rows.append({"arm": arm, **json.loads(res.stdout.strip().splitlines()[-1])})
        print(f"{arm}: {rows[-1]}", flush=True)
    if args.rows:
        print("smoke run (--rows): nothing saved")
        return 0
    command = "python benchmarks/pooling.py " + " ".join(sys.argv[1:])
    path = REPO / "benchmarks" / "results" / "pooling.json"
    saved = json.loads(path.read_text()) if args.append and path.is_file() else None
    if saved:
        rows = saved["rows"] + rows
        command = saved["command"] + "; " + command
    save("pooling", {"benchmark": "pooling", "machine": machine(), "command": command, "rows": rows})
    print(table(["pooling", "epochs", "validation", "test", "train s", "samples/s"],
                [[r["arm"], r["epochs"], f"{r['validation_accuracy']:.4f}", f"{r['test_accuracy']:.4f}", f"{r['train_seconds']:.0f}",
                  f"{r['samples_per_second']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
