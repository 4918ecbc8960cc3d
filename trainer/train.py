"""Fine-tune a LoRA adapter for text classification with a plain Accelerate loop.

    accelerate launch trainer/train.py --config configs/agnews_minilm.yaml [key=value ...]
    python trainer/train.py --config configs/agnews_minilm.yaml train.epochs=1 output.run_dir=runs/quick
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml trainer/train.py --config configs/tiny.yaml

Writes the run dir: config.yaml (resolved), adapter/ (best adapter + head, tokenizer, labels),
checkpoints/step_N (accelerate save_state, rotated), metrics.jsonl, summary.json and, with a test
split, test_metrics.json and test_predictions.jsonl. `train.resume=latest` continues a stopped run.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.config import (
    Config,
    ConfigError,
    DataConfig,
    TrainConfig,
    load_config,
    resolve_data_path,
    save_config,
    to_dict,
)
from trainer.data import (
    DataError,
    EncodedDataset,
    LengthGroupedSampler,
    ShuffleSampler,
    encode,
    encode_labels,
    label_names,
    load_rows,
    make_collate,
    steps_per_epoch,
    stratified_split,
)
from trainer.modeling import (
    build_model,
    classification_metrics,
    resolve_model_path,
    trainable_summary,
    write_adapter_meta,
)


class TrainingError(RuntimeError):
    pass


class TrainState:
    """Loop position and early-stopping state; saved in every checkpoint by `register_for_checkpointing`."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_in_epoch = 0  # batches consumed in the current epoch (for mid-epoch resume)
        self.global_step = 0  # optimizer steps
        self.best_metric: float | None = None
        self.best_step = 0
        self.evals_without_improvement = 0
        self.samples = 0
        self.tokens = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning for text classification (Accelerate).")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4")
    return p.parse_args(argv)


def has_fast_bf16() -> bool:
    """bf16 autocast pays off on GPUs that support it and CPUs with avx512_bf16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(requested: str) -> str:
    """'auto' takes `accelerate launch`'s choice if it asked for one, else bf16 where it is fast."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    choice = requested
    if requested == "auto":
        choice = launched if launched != "no" else ("bf16" if has_fast_bf16() else "no")
    if choice == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            ["mixed precision fp16: needs a GPU; on CPU it would do nothing. Use train.mixed_precision=bf16 or no"]
        )
    return choice


def load_splits(data_cfg: DataConfig, seed: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """Read train/validation/test; returns label-encoded splits, label names and sample texts for the export."""
    train = load_rows(resolve_data_path(data_cfg.train, data_cfg.data_dir), data_cfg.text_field, data_cfg.label_field)
    labels = label_names(train, data_cfg.labels)
    label2id = {name: i for i, name in enumerate(labels)}
    if len(labels) < 2:
        raise DataError(f"{train.source}: found a single label {labels}; a classifier needs at least two")
    train_y = encode_labels(train, label2id)
    splits: dict[str, tuple[list[str], list[int]]] = {}
    if data_cfg.validation:
        val = load_rows(resolve_data_path(data_cfg.validation, data_cfg.data_dir), data_cfg.text_field, data_cfg.label_field)
        splits["validation"] = (val.texts, encode_labels(val, label2id))
        train_idx = list(range(len(train.texts)))
    else:
        train_idx, val_idx = stratified_split(train_y, data_cfg.validation_fraction, seed)
        splits["validation"] = ([train.texts[i] for i in val_idx], [train_y[i] for i in val_idx])
    if data_cfg.max_train_samples:
        rng = np.random.default_rng(seed)
        train_idx = sorted(rng.permutation(train_idx)[: data_cfg.max_train_samples].tolist())
    splits["train"] = ([train.texts[i] for i in train_idx], [train_y[i] for i in train_idx])
    if data_cfg.test:
        test = load_rows(resolve_data_path(data_cfg.test, data_cfg.data_dir), data_cfg.text_field, data_cfg.label_field)
        splits["test"] = (test.texts, encode_labels(test, label2id))
    samples = splits["validation"][0][:32]
    return splits, labels, samples


def make_loaders(
    encoded: dict[str, EncodedDataset], train_cfg: TrainConfig, pad_id: int, token_type_ids: bool, num_processes: int
) -> dict[str, DataLoader]:
    collate = make_collate(pad_id, token_type_ids)
    train = encoded["train"]
    if train_cfg.group_by_length:
        sampler: Any = LengthGroupedSampler(train.lengths(), train_cfg.batch_size * num_processes, train_cfg.seed)
    else:
        sampler = ShuffleSampler(len(train), train_cfg.seed)
    # Own generators: a DataLoader without one draws its base seed from the global RNG at every
    # iteration, which would shift the dropout masks of a resumed run away from the uninterrupted one.
    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(train_cfg.seed)

    loaders = {"train": DataLoader(train, batch_size=train_cfg.batch_size, sampler=sampler, collate_fn=collate, generator=gen())}
    for name in ("validation", "test"):
        if name in encoded:
            # Longest first: evaluation batches carry little padding and memory peaks at once.
            ds = encoded[name]
            order = LengthGroupedSampler(ds.lengths(), train_cfg.eval_batch_size, train_cfg.seed, shuffle=False)
            loaders[name] = DataLoader(ds, batch_size=train_cfg.eval_batch_size, sampler=order, collate_fn=collate, generator=gen())
    return loaders


def evaluate(model: Any, loader: DataLoader, accelerator: Any, labels: list[str], detailed: bool = False) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Loss and metrics over the whole split; `gather_for_metrics` drops the duplicates of the last batch."""
    model.eval()
    all_logits, all_labels, all_index = [], [], []
    with torch.no_grad():
        for batch in loader:
            index = batch.pop("index")
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            logits, y, index = accelerator.gather_for_metrics((logits, batch["labels"], index))
            all_logits.append(logits.cpu())
            all_labels.append(y.cpu())
            all_index.append(index.cpu())
    model.train()
    logits = torch.cat(all_logits)
    y = torch.cat(all_labels)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    probs = torch.softmax(logits, dim=-1).numpy()
    metrics = classification_metrics(y.numpy(), probs.argmax(-1), labels, detailed=detailed)
    metrics["loss"] = loss
    metrics["rows"] = len(y)
    return metrics, probs, torch.cat(all_index).numpy()


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def save_adapter(accelerator: Any, model: Any, tokenizer: Any, adapter_dir: Path, meta: dict[str, Any]) -> None:
    """Adapter weights + head, tokenizer and label map; written by the main process only, atomically."""
    state_dict = accelerator.get_state_dict(model)  # every rank joins: FSDP gathers shards here
    if accelerator.is_main_process:
        tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_adapter_meta(tmp, meta)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
    accelerator.wait_for_everyone()


def rotate_checkpoints(ckpt_root: Path, keep: int) -> None:
    ckpts = sorted(ckpt_root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    ckpts = sorted(ckpt_root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg: Config = load_config(args.config, args.overrides)
        mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed
        from tqdm.auto import tqdm
        from transformers import AutoTokenizer, get_scheduler

        run_dir = Path(cfg.output.run_dir)
        # TensorBoard is an optional extra: log to it when it is installed.
        use_tensorboard = cfg.output.tensorboard and importlib.util.find_spec("tensorboard") is not None
        has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        accelerator = Accelerator(
            # Without a GPU, several launched processes train on CPU over gloo (accelerate needs cpu=True for that).
            cpu=not has_gpu,
            log_with="tensorboard" if use_tensorboard else None,
            project_dir=str(run_dir),
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters)],
        )
        say = accelerator.print
        ckpt_root = run_dir / "checkpoints"

        # --- run dir: never overwrite silently; every rank decides the same before rank 0 writes anything.
        resume_from: Path | None = None
        if cfg.train.resume:
            resume_from = latest_checkpoint(ckpt_root) if cfg.train.resume == "latest" else Path(cfg.train.resume)
            if resume_from is None or not (resume_from / "train_state.json").is_file():
                raise TrainingError(f"train.resume={cfg.train.resume}: no checkpoint found (looked in {ckpt_root})")
        elif run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
            raise TrainingError(
                f"{run_dir}: run dir exists; pass train.resume=latest to continue it, output.overwrite=true to replace it, "
                "or another output.run_dir"
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if cfg.output.overwrite and not cfg.train.resume:
                shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        accelerator.wait_for_everyone()
        metrics_path = run_dir / "metrics.jsonl"

        set_seed(cfg.train.seed)
        if accelerator.device.type == "cpu":
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
            torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // local))
        say(
            f"mixed precision: {mixed_precision}; processes: {accelerator.num_processes}; device: {accelerator.device}; "
            f"threads: {torch.get_num_threads()}"
        )

        # --- data: the main process reads and tokenizes first so caches and errors surface once.
        model_path = resolve_model_path(cfg.model.name_or_path)
        with accelerator.main_process_first():
            tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
            splits, labels, sample_texts = load_splits(cfg.data, cfg.train.seed)
            encoded = {name: encode(tokenizer, texts, y, cfg.data.max_length) for name, (texts, y) in splits.items()}
        say(f"labels: {labels}; rows: " + ", ".join(f"{k}={len(v)}" for k, v in encoded.items()))

        # --- model, optimizer, schedule
        model = build_model(cfg.model, cfg.lora, labels, cfg.train.seed)
        say(trainable_summary(model))
        # DistilBERT-like models take no token_type_ids even when the tokenizer makes them.
        takes_token_types = "token_type_ids" in inspect.signature(model.get_base_model().forward).parameters
        loaders = make_loaders(encoded, cfg.train, tokenizer.pad_token_id, takes_token_types, accelerator.num_processes)
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.train.lr,
        )
        per_epoch = steps_per_epoch(len(encoded["train"]), cfg.train.batch_size, accelerator.num_processes, cfg.train.grad_accum)
        total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * per_epoch)
        num_epochs = math.ceil(total_steps / per_epoch)
        # The prepared scheduler steps once per process for every optimizer step, hence the factor.
        scheduler = get_scheduler(
            "constant_with_warmup" if cfg.train.scheduler == "constant" else cfg.train.scheduler,
            optimizer,
            num_warmup_steps=int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
            num_training_steps=total_steps * accelerator.num_processes,
        )
        eval_names = [n for n in ("validation", "test") if n in loaders]
        prepared = accelerator.prepare(model, optimizer, scheduler, loaders["train"], *[loaders[n] for n in eval_names])
        model, optimizer, scheduler, train_loader = prepared[:4]
        eval_loaders = dict(zip(eval_names, prepared[4:], strict=True))
        state = TrainState()  # saved beside each checkpoint as JSON (no pickle)

        meta = {
            "base_model": cfg.model.name_or_path,
            "labels": labels,
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
            "max_length": cfg.data.max_length,
            "text_field": cfg.data.text_field,
            "label_field": cfg.data.label_field,
            "trust_remote_code": cfg.model.trust_remote_code,
            "sample_texts": sample_texts,
            "config": to_dict(cfg),
        }

        overhead = [0.0]  # seconds spent evaluating and checkpointing inside the loop (not training)

        def save_checkpoint() -> None:
            t0 = time.perf_counter()
            path = ckpt_root / f"step_{state.global_step}"
            accelerator.save_state(str(path))  # every rank: optimizer and RNG state are per process
            if accelerator.is_main_process:
                (path / "train_state.json").write_text(json.dumps(state.state_dict()))
                # The best adapter so far travels with the checkpoint: a resumed run restores it with the state.
                if (run_dir / "adapter").is_dir():
                    shutil.copytree(run_dir / "adapter", path / "best_adapter")
                rotate_checkpoints(ckpt_root, cfg.train.keep_checkpoints)
            accelerator.wait_for_everyone()
            overhead[0] += time.perf_counter() - t0

        def run_validation(kind: str) -> None:
            """Evaluate, save the adapter if best, and decide early stopping once for every rank."""
            t0 = time.perf_counter()
            metrics, _, _ = evaluate(model, eval_loaders["validation"], accelerator, labels)
            value = metrics[cfg.train.metric_for_best]
            improved = is_better(value, state.best_metric, cfg.train.metric_for_best)
            if improved:
                state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
                save_adapter(accelerator, model, tokenizer, run_dir / "adapter", {**meta, "step": state.global_step, "validation": metrics})
            else:
                state.evals_without_improvement += 1
            record = {"event": kind, "step": state.global_step, "epoch": state.epoch, "best": improved, **{f"val_{k}": v for k, v in metrics.items()}}
            if accelerator.is_main_process:
                log_line(metrics_path, record)
                accelerator.log({f"val/{k}": metrics[k] for k in ("loss", "accuracy", "f1_weighted", "f1_macro")}, step=state.global_step)
                if cfg.train.patience and state.evals_without_improvement >= cfg.train.patience:
                    accelerator.set_trigger()
            overhead[0] += time.perf_counter() - t0
            say(f"step {state.global_step}: val accuracy {metrics['accuracy']:.4f} f1_w {metrics['f1_weighted']:.4f} loss {metrics['loss']:.4f}" + (" (best)" if improved else ""))

        if use_tensorboard:
            accelerator.init_trackers("tb")

        if resume_from is not None:
            accelerator.load_state(str(resume_from))
            state.load_state_dict(json.loads((resume_from / "train_state.json").read_text()))
            if accelerator.is_main_process and (resume_from / "best_adapter").is_dir():
                shutil.rmtree(run_dir / "adapter", ignore_errors=True)
                shutil.copytree(resume_from / "best_adapter", run_dir / "adapter")
            accelerator.wait_for_everyone()
            say(f"resumed from {resume_from} at step {state.global_step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
        elif cfg.train.eval_baseline:
            for name, loader in eval_loaders.items():
                metrics, _, _ = evaluate(model, loader, accelerator, labels)
                if accelerator.is_main_process:
                    log_line(metrics_path, {"event": "baseline", "split": name, **metrics})
                say(f"baseline (untrained) {name}: accuracy {metrics['accuracy']:.4f} f1_w {metrics['f1_weighted']:.4f}")

        # --- the loop
        model.train()
        progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="train")
        start = time.perf_counter()
        start_samples, start_tokens = state.samples, state.tokens
        stop = state.global_step >= total_steps
        while state.epoch < num_epochs and not stop:
            train_loader.set_epoch(state.epoch)
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch) if state.batches_in_epoch else train_loader
            for batch in loader:
                batch.pop("index")
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    # A non-finite loss on any rank stops every rank before the weights are touched.
                    if not torch.isfinite(loss):
                        accelerator.set_trigger()
                    if accelerator.check_trigger():
                        raise TrainingError(
                            f"non-finite loss at step {state.global_step + 1}; the last good checkpoint is in {ckpt_root} "
                            "(lower train.lr, or train.mixed_precision=no)"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state.batches_in_epoch += 1
                state.samples += len(batch["labels"]) * accelerator.num_processes
                state.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                if state.global_step % cfg.train.log_every == 0 and accelerator.is_main_process:
                    lr = scheduler.get_last_lr()[0]
                    log_line(metrics_path, {"event": "train", "step": state.global_step, "epoch": state.epoch, "loss": loss.item(), "lr": lr})
                    accelerator.log({"train/loss": loss.item(), "train/lr": lr}, step=state.global_step)
                    progress.set_postfix(loss=f"{loss.item():.4f}")
                last_step = state.global_step >= total_steps
                if cfg.train.eval_every and state.global_step % cfg.train.eval_every == 0 and not last_step:
                    run_validation("eval")
                    if accelerator.check_trigger():
                        say(f"early stopping: no improvement in {cfg.train.patience} evaluations")
                        stop = True
                if cfg.train.save_every and state.global_step % cfg.train.save_every == 0 and not last_step:
                    save_checkpoint()
                if stop or last_step:
                    break
            if not stop:
                state.epoch += 1
                state.batches_in_epoch = 0
                run_validation("epoch_end")
                if accelerator.check_trigger():
                    say(f"early stopping: no improvement in {cfg.train.patience} evaluations")
                    stop = True
                save_checkpoint()
                stop = stop or state.global_step >= total_steps
        progress.close()
        elapsed = time.perf_counter() - start

        # --- test split: once, with the best adapter
        summary: dict[str, Any] = {
            "steps": state.global_step,
            "best_step": state.best_step,
            f"best_val_{cfg.train.metric_for_best}": state.best_metric,
            # Wall time of the loop (with evaluation and checkpoints); throughput over training steps only.
            "train_seconds": elapsed,
            "eval_and_checkpoint_seconds": overhead[0],
            "samples": state.samples - start_samples,
            "samples_per_second": (state.samples - start_samples) / (elapsed - overhead[0]) if elapsed > overhead[0] else None,
            "tokens_per_second": (state.tokens - start_tokens) / (elapsed - overhead[0]) if elapsed > overhead[0] else None,
            "mixed_precision": mixed_precision,
            "num_processes": accelerator.num_processes,
            "labels": labels,
        }
        if "test" in eval_loaders:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
            metrics, probs, index = evaluate(model, eval_loaders["test"], accelerator, labels, detailed=True)
            summary["test_accuracy"] = metrics["accuracy"]
            summary["test_f1_weighted"] = metrics["f1_weighted"]
            if accelerator.is_main_process:
                (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
                texts, y = splits["test"]
                with (run_dir / "test_predictions.jsonl").open("w", encoding="utf-8") as f:
                    for row in np.argsort(index):
                        i = int(index[row])
                        f.write(json.dumps({
                            "text": texts[i],
                            "label": labels[y[i]],
                            "pred": labels[int(probs[row].argmax())],
                            "probs": {name: round(float(p), 6) for name, p in zip(labels, probs[row], strict=True)},
                        }) + "\n")
            say(f"test: accuracy {metrics['accuracy']:.4f} f1_weighted {metrics['f1_weighted']:.4f} ({metrics['rows']} rows)")
        if accelerator.is_main_process:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log_line(metrics_path, {"event": "end", **summary})
        say(f"done in {elapsed:.0f}s ({summary['samples_per_second']:.1f} samples/s); run dir: {run_dir}")
        accelerator.end_training()
        return 0
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        # Accelerate keeps process-wide singletons; reset them so main() can run again in one process (tests).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


if __name__ == "__main__":
    sys.exit(main())
