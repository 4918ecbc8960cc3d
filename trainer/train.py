"""Fine-tune a LoRA adapter for text classification with a plain Accelerate loop.

    accelerate launch trainer/train.py --config configs/agnews_minilm.yaml [key=value ...]
    python trainer/train.py --config configs/agnews_minilm.yaml train.epochs=1 output.run_dir=runs/quick
    python trainer/train.py data.train=reviews.csv data.text_field=review data.label_field=stars
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml trainer/train.py --config configs/tiny.yaml

Writes the run dir: config.yaml (resolved), adapter/ (best adapter + head, tokenizer, labels),
checkpoints/step_N (accelerate save_state, rotated), metrics.jsonl, summary.json and, with a test
split, test_metrics.json and test_predictions.jsonl. `train.resume=latest` continues a stopped run.
The run dir is locked (RUN/.lock) while a training runs: a second one on the same dir stops at once.

Read `main()` for the outline and `fit()` for the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from loraship.files import CALIBRATION_FILE, VALIDATION_FILE
from loraship.fsutil import (
    OWNER_MARKER,
    OutputError,
    RunDirLock,
    is_owned,
    mark_owned,
    swap_in,
    temp_dir_beside,
)
from loraship.metrics import (
    best_global_threshold,
    choose_thresholds,
    decide,
    multilabel_report,
    regression_report,
    summary_metrics,
    threshold_vector,
)
from loraship.quiet import quiet_third_party
from loraship.rows import Fields, input_record
from loraship.task import PROBLEM_TYPES, REGRESSION, Task
from trainer import checkpoints, mfu, recipe
from trainer.config import (
    Config,
    ConfigError,
    TrainConfig,
    load_config,
    resolve_data_path,
    save_config,
    shareable_config,
)
from trainer.data import (
    BATCH_ROWS,
    DataError,
    LengthGroupedSampler,
    ShuffleSampler,
    label_map,
    make_collate,
    rarest_label,
    steps_per_epoch,
    stratified_split,
)
from trainer.data_cache import TokenizedSplit, default_cache_root, load_or_build
from trainer.modeling import (
    ADAPTER_META,
    build_model,
    frozen_linear_dtype,
    resolve_model_path,
    store_frozen_linear_weights,
    trainable_summary,
    write_adapter_meta,
)


class TrainingError(RuntimeError):
    pass


# The loop's clock: the time budget, evaluation and checkpoint costs are read from it. Tests drive the
# budget with a clock of their own, so no decision depends on how loaded the machine is.
clock = time.perf_counter


class TrainState:
    """Loop position and early-stopping state; saved as JSON in every checkpoint (no pickle)."""

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.batches_in_epoch = 0  # batches consumed in the current epoch (for mid-epoch resume)
        self.global_step = 0  # optimizer steps
        self.best_metric: float | None = None
        self.best_step = 0
        self.evals_without_improvement = 0
        self.samples = 0
        self.tokens = 0
        self.budget_steps = 0  # total steps fixed by train.time_budget_minutes after the first steps (0 = none)
        self.loop_seconds = 0.0  # loop time up to the last checkpoint, across resumes (time budget)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class Run:
    """Everything the loop and its helpers share: one object instead of closures over main()'s locals."""

    cfg: Config
    accelerator: Any
    run_dir: Path
    mixed_precision: str
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    train_loader: Any = None
    eval_loaders: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    labels: list[str] = field(default_factory=list)
    task: str = "single_label"  # or "multi_label", "regression" (resolve_task)
    task_why: str = ""
    thresholds: dict[str, Any] | None = None  # multi-label decision thresholds, chosen on validation at the end
    target: dict[str, Any] | None = None  # regression: {"name", "mean", "std"} of the training targets (the scale)
    splits: dict[str, TokenizedSplit] = field(default_factory=dict)
    data_report: dict[str, Any] = field(default_factory=dict)  # cache hit/built and setup seconds per split
    meta: dict[str, Any] = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    # Seconds of each evaluation and checkpoint inside this process's loop (not training; time budget costs).
    timings: dict[str, list[float]] = field(default_factory=lambda: {"evaluation": [], "checkpoint": []})
    cap_steps: int = 0  # steps that epochs / max_steps give: a time budget never runs more
    per_epoch: int = 0  # optimizer steps per epoch
    patience: int = 0  # resolved train.patience
    recipe: dict[str, Any] = field(default_factory=dict)  # what was chosen and why (summary.json)
    class_weights: torch.Tensor | None = None  # per-label loss weights: class_weights=auto, or multi-label pos_weight=auto
    start_step: int = 0  # global step when this process's loop started (after a resume: the checkpoint's)
    loop_start: float = 0.0  # perf_counter at the start of this process's loop
    launcher_pid: int | None = None  # parent pid of a launched worker; None when not launched
    # Whether this process sees the main process's run dir: one machine, or nodes on a shared filesystem.
    # False on the other nodes of a local-disk cluster: their local main process keeps a run dir of its own
    # with what they need to resume (their checkpoint files), and nothing else (see README, Scaling out).
    shared_disk: bool = True
    tokens: torch.Tensor | None = None  # tokens trained since the last log point, on the device (no sync per step)

    @property
    def total_steps(self) -> int:
        """Steps of this run: what epochs / max_steps give, or fewer when a time budget fixed them (a resumed
        run takes the checkpoint's budget plan only when it still has a budget)."""
        if self.state.budget_steps and self.cfg.train.time_budget_minutes:
            return min(self.state.budget_steps, self.cap_steps)
        return self.cap_steps

    @property
    def overhead(self) -> float:
        """Seconds spent evaluating and checkpointing inside the loop."""
        return sum(map(sum, self.timings.values()))

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def keeps_node_files(self) -> bool:
        """The local main process of a node whose disk is its own: it writes this node's checkpoint files."""
        return not self.shared_disk and self.accelerator.is_local_main_process


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA fine-tuning for text classification (Accelerate).")
    p.add_argument("--config", help="YAML config (see configs/); without one, the defaults and the overrides")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings too (or LORASHIP_VERBOSE=1)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.train=my.csv train.lr=3e-4")
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


def data_cache_root(cfg: Config) -> Path:
    if not cfg.data.cache:
        return Path(cfg.output.run_dir) / ".data"  # this run's only; deleted when it ends
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_root()


def load_splits(run: Run) -> dict[str, str]:
    """Train/validation/test as memory-mapped tokenized splits with label ids; sets run.splits and run.labels.

    Returns 'hit' or 'built' per file. The validation split, when not given, is a stratified seeded carve."""
    cfg, data_cfg = run.cfg, run.cfg.data
    root = data_cache_root(cfg)
    progress = run.accelerator.is_local_main_process

    fields = Fields(data_cfg.text_field, None if data_cfg.label_fields else data_cfg.label_field,
                    label_separator=data_cfg.label_separator or None, label_fields=tuple(data_cfg.label_fields),
                    text_pair=data_cfg.text_pair_field or None)

    def split(path: str) -> tuple[TokenizedSplit, str]:
        source = resolve_data_path(path, data_cfg.data_dir)
        return load_or_build(source, fields, data_cfg.max_length, run.tokenizer, root, progress)

    train, status = split(data_cfg.train)
    report = {"train": status}
    run.task, run.task_why = resolve_task(data_cfg, train.info)
    assign, strata = target_map(run, train)
    assign(train)
    splits: dict[str, TokenizedSplit] = {}
    if data_cfg.validation:
        splits["validation"], report["validation"] = split(data_cfg.validation)
        assign(splits["validation"])
        train_idx = np.arange(len(train))
    else:
        train_idx, val_idx = stratified_split(strata(train.labels()), data_cfg.validation_fraction, cfg.train.seed)
        splits["validation"] = train.select(val_idx)
    if data_cfg.max_train_samples:
        rng = np.random.default_rng(cfg.train.seed)
        train_idx = np.sort(rng.permutation(train_idx)[: data_cfg.max_train_samples])
    splits["train"] = train.select(train_idx)
    if data_cfg.test:
        splits["test"], report["test"] = split(data_cfg.test)
        assign(splits["test"])
    run.splits = splits
    if run.task == REGRESSION:
        y = splits["train"].labels().astype(np.float64)
        if len(y) < 2 or y.std() == 0:
            raise DataError(f"{train.source}: the regression target {data_cfg.label_field!r} takes a single value; nothing to learn")
        # the scale the model learns in and serving undoes
        run.target = {"name": data_cfg.label_field, "mean": float(y.mean()), "std": float(y.std())}
    return report


def target_map(run: Run, train: TokenizedSplit) -> tuple[Any, Any]:
    """(assign, strata) for the run's task; sets run.labels. assign(split) gives a split its targets: label ids,
    0/1 rows (multi-label) or numbers (regression, one output named after the target field); strata(y) are
    what a carved validation split is stratified on (the label, the rarest label, the target's decile)."""
    data_cfg = run.cfg.data
    if run.task == REGRESSION:
        run.labels = [data_cfg.label_field]
        return (lambda s: s.assign_targets()), target_deciles
    multi = run.task == "multi_label"
    label2id = label_map(train.info["labels"], data_cfg.labels or list(data_cfg.label_fields), train.source)
    run.labels = label2id.names
    if len(run.labels) < 2:
        raise DataError(f"{train.source}: found a single label {run.labels}; a classifier needs at least two")
    return (lambda s: s.assign_labels(label2id, multi)), (rarest_label if multi else (lambda y: y))


def target_deciles(y: np.ndarray) -> np.ndarray:
    """Each target's decile (0..9): strata for a stratified carve of a numeric target."""
    edges = np.quantile(y, np.linspace(0, 1, 11)[1:-1])
    return np.searchsorted(edges, y, side="right")


def resolve_task(data_cfg: Any, info: dict[str, Any]) -> tuple[str, str]:
    """(task, why): data.task, or what the training labels and the label settings say."""
    if data_cfg.task != "auto":
        return data_cfg.task, f"data.task={data_cfg.task}"
    if data_cfg.label_fields:
        return "multi_label", "data.label_fields: one 0/1 column per label"
    if data_cfg.label_separator:
        return "multi_label", f"data.label_separator={data_cfg.label_separator!r}"
    if info.get("multi"):
        return "multi_label", f"the training labels ({data_cfg.label_field}) hold lists"
    if info.get("fractional") and not data_cfg.labels:
        return REGRESSION, f"the training labels ({data_cfg.label_field}) are numbers with fractions"
    return "single_label", "one label per training row"


def make_loaders(
    encoded: dict[str, TokenizedSplit], train_cfg: TrainConfig, pad_id: int, token_type_ids: bool, num_processes: int
) -> dict[str, DataLoader]:
    collate = make_collate(pad_id, token_type_ids)
    train = encoded["train"]
    if train_cfg.group_by_length:
        # One group = one global batch (all processes, all accumulated micro-batches): 1 x 8, 2 x 4 and
        # 1 x 4 x accum 2 then see the same rows in each optimizer step.
        group = train_cfg.batch_size * num_processes * train_cfg.grad_accum
        sampler: Any = LengthGroupedSampler(train.lengths(), group, train_cfg.seed)
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


def evaluate(model: Any, loader: DataLoader, accelerator: Any, labels: list[str], detailed: bool = False,
             thresholds: dict[str, Any] | None = None, target: dict[str, Any] | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Loss and metrics over the whole split; `gather_for_metrics` drops the duplicates of the last batch.

    Multi-label (0/1 label rows): sigmoid probabilities, metrics at `thresholds`, or without them at the
    global threshold that is best on this split (what validation compares adapters by).
    Regression (`target`, the scale): scores in the data's units (one column), loss the MSE in the scaled units
    the model is trained in, metrics Pearson, Spearman, MSE, MAE in the data's units."""
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
    if target is not None:
        scaled = (y - target["mean"]) / target["std"]
        loss = torch.nn.functional.mse_loss(logits[:, 0], scaled).item()
        probs = Task(REGRESSION, labels, target=target).probs(logits.numpy())
        metrics = regression_report(y.numpy(), probs[:, 0])
    elif y.dtype.is_floating_point:  # multi-label
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        probs = torch.sigmoid(logits).numpy()
        metrics = multilabel_metrics(y.numpy(), probs, labels, detailed, thresholds)
    else:
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        probs = torch.softmax(logits, dim=-1).numpy()
        metrics = summary_metrics(y.numpy(), probs.argmax(-1), labels, detailed=detailed)
    metrics["loss"] = loss
    metrics["rows"] = len(y)
    return metrics, probs, torch.cat(all_index).numpy()


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, labels: list[str], detailed: bool,
                       thresholds: dict[str, Any] | None) -> dict[str, Any]:
    cut: Any = best_global_threshold(y, probs) if thresholds is None else threshold_vector(thresholds, labels)
    report = multilabel_report(y, decide(probs, cut), labels)
    if not detailed:
        report = {k: v for k, v in report.items() if k not in ("per_label", "labels")}
    report["threshold"] = cut if thresholds is None else "per label (chosen on validation)"
    return report


def metric_for_best(cfg: Config, task: str) -> str:
    """train.metric_for_best, with auto resolved for the task."""
    if cfg.train.metric_for_best != "auto":
        return cfg.train.metric_for_best
    return "f1_macro" if task == "multi_label" else "pearson" if task == REGRESSION else "accuracy"


LOWER_IS_BETTER = ("loss", "mse", "mae")


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def shown_metrics(task: str) -> tuple[str, ...]:
    """The validation figures printed and logged for a task."""
    if task == REGRESSION:
        return ("pearson", "spearman", "mse")
    return ("f1_macro", "f1_micro", "threshold") if task == "multi_label" else ("accuracy", "f1_weighted")


def log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def launched_by_accelerate() -> bool:
    """Workers of `accelerate launch` / torchrun: their launcher is their parent process. Decided from the
    parent itself: an ACCELERATE_* variable exported in a shell does not make a plain `python
    trainer/train.py` (under nohup, whose parent shell exits) a launched worker."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun and accelerate's multi-process launch
        return True
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return ("accelerate" in parent and "launch" in parent) or "torchrun" in parent or "torch.distributed.run" in parent


# --- setup ---------------------------------------------------------------------------------------------


def make_accelerator(cfg: Config, mixed_precision: str) -> Any:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

    # TensorBoard is an optional extra: log to it when it is installed.
    use_tensorboard = cfg.output.tensorboard and importlib.util.find_spec("tensorboard") is not None
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(
        # Without a GPU, several launched processes train on CPU over gloo (accelerate needs cpu=True for that).
        cpu=not has_gpu,
        log_with="tensorboard" if use_tensorboard else None,
        project_dir=cfg.output.run_dir,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.find_unused_parameters),
                         # A lost process (a node down) stops the others within this time, not torch's 30 minutes.
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_seconds))],
    )
    set_seed(cfg.train.seed)
    if accelerator.device.type == "cpu":
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // local))
    accelerator.print(
        f"mixed precision: {mixed_precision}; processes: {accelerator.num_processes}; device: {accelerator.device}; "
        f"threads: {torch.get_num_threads()}"
    )
    return accelerator


def _check_run_dir(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    """Main process, holding the lock: decide fresh / overwrite / resume. Nothing is written or removed here:
    an old run is replaced only once the new one has passed every check (start_run)."""
    ckpt_root = run_dir / "checkpoints"
    if cfg.train.resume:
        found, notes = checkpoints.latest(ckpt_root) if cfg.train.resume == "latest" else (Path(cfg.train.resume), [])
        if found is None or not (found / checkpoints.STATE_FILE).is_file():
            raise TrainingError(f"train.resume={cfg.train.resume}: no complete checkpoint found (looked in {ckpt_root})")
        return found, notes
    content = [p for p in run_dir.iterdir() if p.name not in (".lock", OWNER_MARKER)] if run_dir.is_dir() else []
    if content and not cfg.output.overwrite:
        raise TrainingError(
            f"{run_dir}: run dir exists; pass train.resume=latest to continue it, output.overwrite=true to replace it, "
            "or another output.run_dir"
        )
    if content and not is_owned(run_dir):
        raise TrainingError(
            f"{run_dir}: output.overwrite=true only replaces a run dir that loraship wrote (no {OWNER_MARKER} "
            "marker in it); remove it yourself or choose another output.run_dir"
        )
    return None, []


def claim_run_dir(cfg: Config, accelerator: Any) -> tuple[RunDirLock | None, Path | None]:
    """Lock the run dir (main process) and decide what this run does with it; every rank learns the outcome."""
    from accelerate.utils import broadcast_object_list

    run_dir = Path(cfg.output.run_dir)
    lock = None
    outcome: list[Any] = [None, None]  # [error message, checkpoint to resume]
    if accelerator.is_main_process:
        try:
            lock = RunDirLock(run_dir, "training").acquire()
            if lock.stale_holder:
                print(f"note: took over the stale lock of {lock.stale_holder} (it is no longer running)", file=sys.stderr)
            resume_from, notes = _check_run_dir(cfg, run_dir)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            outcome = [None, str(resume_from) if resume_from else None]
        except (OutputError, TrainingError) as e:
            outcome = [str(e), None]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[0]:
        if lock is not None:
            lock.release()
        raise TrainingError(outcome[0])
    return lock, Path(outcome[1]) if outcome[1] else None


def sees_main_run_dir(run_dir: Path, accelerator: Any) -> bool:
    """Whether this process sees the run dir the main process claimed: a file the main process writes there
    is looked for by every process (one node, or a shared filesystem: yes; a node's own local disk: no)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return True
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = run_dir / f".node-probe-{token[0]}"
    if accelerator.is_main_process:
        probe.write_text("")
    accelerator.wait_for_everyone()
    seen = probe.is_file()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    return seen


def agree(accelerator: Any, problem: str | None) -> None:
    """Every process raises the first problem any process found (so none is left waiting in a collective)."""
    from accelerate.utils import gather_object

    problems = [x for x in gather_object([problem]) if x] if accelerator.num_processes > 1 else [x for x in [problem] if x]
    if problems:
        raise TrainingError(problems[0])


def claim_node_run_dir(cfg: Config, run: Run, resume_from: Path | None) -> tuple[RunDirLock | None, Path | None]:
    """The other nodes of a local-disk cluster: their local main process locks this node's own run dir, which
    holds this node's checkpoint files only. With train.resume=latest every node resumes the newest step
    that is complete on every node (a node lost mid-save may lack the main node's newest)."""
    from accelerate.utils import broadcast_object_list, gather_object

    acc, lock, problem, steps = run.accelerator, None, None, None
    run_dir = Path(cfg.output.run_dir)
    if run.keeps_node_files:
        try:
            lock = RunDirLock(run_dir, "training").acquire()
            if resume_from is None and not cfg.output.overwrite and any(p.name not in (".lock", OWNER_MARKER) for p in run_dir.iterdir()):
                problem = (f"{run_dir} on node {acc.process_index // max(1, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))}: run dir "
                           "exists; pass train.resume=latest to continue it or output.overwrite=true to replace it")
        except OutputError as e:
            problem = str(e)
    if run.keeps_node_files or acc.is_main_process:
        steps = [n for n, _ in checkpoints.scan(run.ckpt_root)[0]]
    try:
        agree(acc, problem)
        if resume_from is not None and cfg.train.resume == "latest":
            # the newest step complete on the main node and on every node with its own disk
            found = [set(x) for x in gather_object([steps]) if x is not None]
            common = [max(set.intersection(*found))] if found and set.intersection(*found) else [None]
            broadcast_object_list(common)
            if common[0] is None:
                raise TrainingError(f"train.resume=latest: no checkpoint is complete on every node (looked in {run.ckpt_root})")
            resume_from = checkpoints.checkpoint_dir(run.ckpt_root, common[0])
        if resume_from is not None and run.keeps_node_files and not (resume_from / checkpoints.STATE_FILE).is_file():
            problem = f"{resume_from}: not on this node; every node needs its own copy of the checkpoint to resume"
        agree(acc, problem)
    except TrainingError:
        if lock is not None:
            lock.release()
        raise
    return lock, resume_from


def start_run(run: Run, resume_from: Path | None) -> None:
    """The run has passed its checks (config, data, model, resume): now the run dir becomes this run's. An old
    run is removed (output.overwrite), config.yaml and the selection data are written."""
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        if resume_from is None:
            keep = {".lock", OWNER_MARKER}
            if not cfg.data.cache:
                keep.add(data_cache_root(cfg).name)  # this run's own tokenized data, built in load_data
            for p in run.run_dir.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            checkpoints.remove_partials(run.ckpt_root)
        mark_owned(run.run_dir, "run dir")
        save_config(cfg, run.run_dir / "config.yaml")
        save_selection_data(run)
    elif run.keeps_node_files:  # this node's own run dir: its checkpoint files only
        if resume_from is None:
            for p in run.run_dir.iterdir():
                if p.name not in (".lock", OWNER_MARKER, data_cache_root(cfg).name):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            checkpoints.remove_partials(run.ckpt_root)
        mark_owned(run.run_dir, "run dir (this node's checkpoint files)")
    acc.wait_for_everyone()
    if cfg.output.tensorboard and acc.log_with:
        acc.init_trackers("tb")  # only now: the run dir was cleared above, event file included


# Settings a resumed run may change: where things go, how often it logs and saves, how long it trains.
# Everything else (labels, data, batch size, model, LoRA, optimizer...) decides what a step does.
RESUME_MAY_CHANGE = {
    "output.run_dir", "output.overwrite", "output.tensorboard", "output.embed_sample_texts",
    "train.resume", "train.resume_changed", "train.cpu_threads", "train.log_every", "train.keep_checkpoints",
    "train.save_every", "train.eval_batch_size", "train.eval_baseline", "train.epochs", "train.max_steps",
    "train.time_budget_minutes", "train.patience", "train.collective_timeout_seconds",
    "data.train", "data.validation", "data.test", "data.data_dir", "data.cache", "data.cache_dir",
}
RESUME_KEY = "resume_key.json"


def resume_key(run: Run) -> dict[str, Any]:
    """What a checkpoint must share with a run that resumes it: settings, labels, data and processes."""
    flat = {f"{section}.{k}": v for section, values in shareable_config(run.cfg).items() for k, v in values.items()}
    key = {k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}
    key["labels"] = run.labels
    key["data"] = {name: split.fingerprint for name, split in sorted(run.splits.items())} | {"rows": data_fingerprint(run.splits)}
    key["num_processes"] = run.accelerator.num_processes
    return key


def check_resume(run: Run, resume_from: Path | None) -> None:
    """Refuse to resume a checkpoint of another run (labels, data, batch size, model...), naming every
    difference, unless train.resume_changed=true; nothing in the run dir has been touched yet. Decided by
    the main process (its checkpoint holds the settings), agreed by every process."""
    if resume_from is None:
        return
    problem = None
    if run.accelerator.is_main_process:
        try:
            _check_resume(run, resume_from)
        except TrainingError as e:
            problem = str(e)
    agree(run.accelerator, problem)


def _check_resume(run: Run, resume_from: Path) -> None:
    changed = layout_changes(run.cfg, resume_from)
    if changed:
        raise TrainingError(f"{resume_from}: the checkpoint does not fit this run's model: it was written with "
                            f"{'; '.join(changed)}. Resume with the settings it was trained with, or train into a new run dir")
    path = resume_from / RESUME_KEY
    if not path.is_file():
        run.accelerator.print(f"note: {resume_from} records no settings to compare (older checkpoint); resuming as asked")
        return
    saved, now = json.loads(path.read_text(encoding="utf-8")), resume_key(run)
    diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if not diffs:
        return
    if run.cfg.train.resume_changed:
        run.accelerator.print("note: resuming a checkpoint of other settings (train.resume_changed=true):\n  " + "\n  ".join(diffs))
        return
    raise TrainingError(f"{resume_from}: this run differs from the one that wrote the checkpoint:\n  " + "\n  ".join(diffs)
                        + "\nResume with the same settings and data, train into a new run dir, or pass "
                        "train.resume_changed=true to continue anyway")


def check_max_length(cfg: Config) -> None:
    """data.max_length must fit the model's position embeddings (else an index error deep in the forward)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.model.name_or_path)
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise TrainingError(f"model.name_or_path={cfg.model.name_or_path}: cannot load it ({str(e).splitlines()[0]}); give a "
                            "local model dir, a hub id (needs a reachable hub) or packaged:all-MiniLM-L6-v2") from e
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.data.max_length > positions:
        raise TrainingError(f"data.max_length={cfg.data.max_length}: {cfg.model.name_or_path} reads at most {positions} "
                            f"tokens (max_position_embeddings); set data.max_length={positions} or less")


def load_data(run: Run) -> None:
    """Read, check and tokenize every split once (cached); the local main process goes first, so errors
    surface once and the other processes load what it built."""
    from transformers import AutoTokenizer

    cfg = run.cfg
    t0 = time.perf_counter()
    # The main process builds first; then the local main process of every other node, which finds the
    # main's build on a shared cache and builds its own on a local one; then the rest load it.
    with run.accelerator.main_process_first(), run.accelerator.local_main_process_first():
        check_max_length(cfg)
        run.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code)
        cache = load_splits(run)
    run.data_report = {"cache": cache, "setup_seconds": round(time.perf_counter() - t0, 2)}
    if run.accelerator.num_processes > 1:
        # Each process says whether it built or loaded its data and what it holds: the processes must agree.
        print(f"process {run.accelerator.process_index}: data " + " ".join(f"{k}={v}" for k, v in cache.items())
              + f" fingerprint={data_fingerprint(run.splits)}", flush=True)
    run.accelerator.print(
        f"labels: {run.labels}; rows: " + ", ".join(f"{k}={len(v)}" for k, v in run.splits.items())
        + f"; data ready in {run.data_report['setup_seconds']:.1f}s (" + ", ".join(f"{k}: {v}" for k, v in cache.items())
        + (f", cache {data_cache_root(cfg)})" if cfg.data.cache else ")")
    )
    sample_texts = run.splits["validation"].inputs(0, 32)
    run.meta = {
        "base_model": cfg.model.name_or_path,
        "labels": run.labels,
        "id2label": dict(enumerate(run.labels)),
        "label2id": {n: i for i, n in enumerate(run.labels)},
        "max_length": cfg.data.max_length,
        "pooling": cfg.model.pooling,  # 'mean': the merge appends the same pooling layer to the base first
        "text_field": cfg.data.text_field,
        "text_pair_field": cfg.data.text_pair_field or None,
        "label_field": cfg.data.label_field,
        "task": run.task,  # multi_label: sigmoid per label, decisions at "thresholds" (added when training ends)
        "target": run.target,  # regression: the scale serving undoes
        "trust_remote_code": cfg.model.trust_remote_code,
        # Adapters are what people share: no data paths, and validation texts only when output.embed_sample_texts asks.
        "sample_texts": sample_texts if cfg.output.embed_sample_texts else [],
        "config": shareable_config(cfg),
    }


def data_fingerprint(splits: dict[str, TokenizedSplit]) -> str:
    """A short hash of every split's rows, labels and lengths in order."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for arr in (splits[name].rows, splits[name].labels(), splits[name].lengths()):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


CALIBRATION_ROWS = 2000


def label_counts(split: TokenizedSplit, n_labels: int) -> np.ndarray:
    """Rows of each label (multi-label: positive rows per label; a row counts once per label it has; regression:
    every row has the one target)."""
    y = split.labels()
    if y.dtype.kind == "f" and y.ndim == 1:
        return np.array([len(y)])
    return y.sum(0).astype(np.int64) if y.ndim == 2 else np.bincount(y, minlength=n_labels)


def label_names_of(labels: list[str], target: Any) -> str | list[str] | float:
    """A row's label as a name, a multi-label row's 0/1 list as the list of its names, a regression target as itself."""
    if isinstance(target, float):
        return target
    return [n for n, on in zip(labels, target, strict=True) if on] if isinstance(target, list) else labels[target]


def save_selection_data(run: Run) -> None:
    """The validation split and a sample of training texts, in the run dir (not in the adapter, which people
    share): the export chooses its int8 method and default variant on these, never on the test split."""
    val = run.splits["validation"]
    y = val.labels()
    with (run.run_dir / VALIDATION_FILE).open("w", encoding="utf-8") as f:
        for start in range(0, len(val), BATCH_ROWS):
            texts = val.inputs(start, start + BATCH_ROWS)
            f.writelines(json.dumps({**input_record(t), "label": label_names_of(run.labels, k)}, ensure_ascii=False) + "\n"
                         for t, k in zip(texts, y[start : start + BATCH_ROWS].tolist(), strict=True))
    train = run.splits["train"]
    # Thousands of texts: the int8 search measures agreement with fp32 on them (a finer criterion than a small
    # labelled validation split, where one row can be worth more than the allowed drop).
    pick = np.sort(np.random.default_rng(run.cfg.train.seed).permutation(len(train))[:CALIBRATION_ROWS])
    texts = train.select(pick).inputs()
    with (run.run_dir / CALIBRATION_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(input_record(t), ensure_ascii=False) + "\n" for t in texts)


def build_training(run: Run) -> None:
    """Model with LoRA, AdamW (no decay on biases/LayerNorm), warmup + decay schedule, prepared loaders."""
    cfg, accelerator = run.cfg, run.accelerator
    try:
        model = build_model(cfg.model, cfg.lora, run.labels, cfg.train.seed, PROBLEM_TYPES[run.task])
    except ValueError as e:  # an option this architecture does not support (model.pooling=mean)
        raise TrainingError(f"{cfg.model.name_or_path}: {e}") from e
    # Not with DoRA: it reads the full-precision base weights outside the autocast products (its norms).
    if run.mixed_precision == "bf16" and not cfg.lora.use_dora:
        store_frozen_linear_weights(model, torch.bfloat16)
    accelerator.print(trainable_summary(model))
    # DistilBERT-like models take no token_type_ids even when the tokenizer makes them.
    takes_token_types = "token_type_ids" in inspect.signature(model.get_base_model().forward).parameters
    loaders = make_loaders(run.splits, cfg.train, run.tokenizer.pad_token_id, takes_token_types, accelerator.num_processes)
    plan_steps(run)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train, run.recipe["head_lr_scale"]), lr=cfg.train.lr)
    # The prepared scheduler steps once per process for every optimizer step, hence the division. The total
    # is read at every step: a time budget fixes it after the first steps and the schedule follows.
    procs, t = accelerator.num_processes, cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda count: recipe.lr_factor(count / procs, run.total_steps, t.warmup_ratio, t.scheduler)
    )
    eval_names = [n for n in ("validation", "test") if n in loaders]
    prepared = accelerator.prepare(model, optimizer, scheduler, loaders["train"], *[loaders[n] for n in eval_names])
    run.model, run.optimizer, run.scheduler, run.train_loader = prepared[:4]
    run.eval_loaders = dict(zip(eval_names, prepared[4:], strict=True))


def param_groups(model: torch.nn.Module, t: TrainConfig, head_scale: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm; the head (peft's modules_to_save copies) at lr x head_scale."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("modules_to_save" in name, p.ndim >= 2), []).append(p)
    return [{"params": params, "weight_decay": t.weight_decay if decay else 0.0, "lr": t.lr * (head_scale if head else 1.0)}
            for (head, decay), params in sorted(groups.items())]


def plan_steps(run: Run) -> None:
    """Epochs (a number, or `auto` from the data), the steps they give, and early stopping's patience."""
    t, acc = run.cfg.train, run.accelerator
    rows = len(run.splits["train"])
    run.per_epoch = steps_per_epoch(rows, t.batch_size, acc.num_processes, t.grad_accum)
    multi = run.task == "multi_label"
    counts = label_counts(run.splits["train"], len(run.labels))
    if t.max_steps:
        epochs, why = t.max_steps / run.per_epoch, f"train.max_steps={t.max_steps}"
    elif t.epochs == "auto":
        epochs, why = recipe.auto_epochs(rows, counts)
    else:
        epochs, why = float(t.epochs), "train.epochs"
    run.cap_steps = t.max_steps or math.ceil(epochs * run.per_epoch)
    if t.patience != "auto":
        run.patience, patience_why = t.patience, "train.patience"
    elif t.epochs == "auto" and not t.max_steps:
        run.patience, patience_why = recipe.auto_patience(run.per_epoch, t.eval_every)
    else:
        run.patience, patience_why = 0, "train.patience=auto with fixed epochs or max_steps: off"
    head_scale, head_why = recipe.head_lr_scale(t.head_lr_scale, len(run.labels))
    run.recipe = {"epochs": round(epochs, 3), "epochs_setting": t.epochs, "why": why, "steps_per_epoch": run.per_epoch,
                  "steps": run.cap_steps, "patience": run.patience, "patience_why": patience_why, "head_lr_scale": head_scale, "head_lr_why": head_why}
    if multi and t.pos_weight == "auto":
        weights = recipe.pos_weights(counts, rows)
        run.class_weights = torch.tensor(weights, dtype=torch.float32, device=acc.device)
        run.recipe["pos_weight"] = dict(zip(run.labels, np.round(weights, 4).tolist(), strict=True))
    elif t.class_weights == "auto" and not multi and run.task != REGRESSION:
        weights = recipe.class_weights(counts)
        run.class_weights = torch.tensor(weights, dtype=torch.float32, device=acc.device)
        run.recipe["class_weights"] = dict(zip(run.labels, np.round(weights, 4).tolist(), strict=True))
    acc.print(f"recipe: {run.cap_steps} steps ({why}); early stopping patience {run.patience or 'off'}"
              + (f"; time budget {t.time_budget_minutes:g} min" if t.time_budget_minutes else ""))


def fit_budget(run: Run, loop_seconds: float) -> None:  # loop_seconds: this process's loop so far
    """Fix the total steps so the loop ends within train.time_budget_minutes. Planned once the first steps
    are measured, then again every BUDGET_PROBE_STEPS steps and after each evaluation (its measured cost
    replaces the estimate); every rank takes rank 0's plan, so all stop at the same step."""
    t, acc, state = run.cfg.train, run.accelerator, run.state
    done = state.global_step
    train_seconds = max(loop_seconds - run.overhead, 1e-9)
    steps = max(done - run.start_step, 1)
    step_s = train_seconds / steps
    evals, saves = run.timings["evaluation"], run.timings["checkpoint"]
    # Before the first evaluation, estimate it: a forward pass is about a third of a training step's work.
    eval_s = float(np.mean(evals)) if evals else len(run.splits["validation"]) / acc.num_processes / t.batch_size * step_s / 3
    costs = recipe.Costs(step=step_s, evaluation=eval_s, checkpoint=float(np.mean(saves)) if saves else 0.0)
    total = recipe.budget_steps(60 * t.time_budget_minutes, state.loop_seconds + clock() - run.loop_start, done, run.cap_steps, costs,
                                run.per_epoch, t.eval_every, t.save_every)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        total = int(broadcast(torch.tensor([total], device=acc.device), from_process=0).item())
    state.budget_steps = total
    run.recipe["time_budget"] = {"minutes": t.time_budget_minutes, "planned_steps": total, "planned_at_step": done,
                                 "step_seconds": round(step_s, 4), "evaluation_seconds": round(eval_s, 3),
                                 "checkpoint_seconds": round(costs.checkpoint, 3)}


def layout_changes(cfg: Config, checkpoint: Path) -> list[str]:
    """model.* / lora.* settings that differ from those the checkpoint's best adapter recorded ([] if unknown)."""
    try:
        saved = json.loads((checkpoint / checkpoints.BEST_ADAPTER / ADAPTER_META).read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return []
    now = shareable_config(cfg)
    return [f"{section}.{key}={saved[section].get(key)!r} (this run: {value!r})" for section in ("model", "lora")
            for key, value in now[section].items() if section in saved and saved[section].get(key) != value]


def restore(run: Run, resume_from: Path | None) -> None:
    """Continue from a checkpoint (state, RNG, best adapter, metrics up to it), or evaluate the baseline."""
    acc = run.accelerator
    if resume_from is not None:
        try:
            acc.load_state(str(resume_from))
        except RuntimeError as e:  # missing, unexpected or reshaped weights: another model or LoRA layout
            changed = layout_changes(run.cfg, resume_from)
            raise TrainingError(
                f"{resume_from}: the checkpoint does not fit this run's model: "
                + (f"it was written with {'; '.join(changed)}" if changed else
                   "it was written with other model.* or lora.* settings (e.g. model.pooling, lora.r)")
                + f". Resume with the settings it was trained with, or train into a new run dir. ({str(e).splitlines()[0]})") from e
        run.state.load_state_dict(json.loads((resume_from / checkpoints.STATE_FILE).read_text()))
        if acc.is_main_process:
            if (resume_from / checkpoints.BEST_ADAPTER).is_dir():
                tmp = temp_dir_beside(run.run_dir / "adapter")
                shutil.copytree(resume_from / checkpoints.BEST_ADAPTER, tmp, dirs_exist_ok=True)
                swap_in(tmp, run.run_dir / "adapter")
            # Lines a cut run wrote after its checkpoint are logged again by this run: drop them, no duplicates.
            if run.metrics_path.is_file():
                records = [json.loads(x) for x in run.metrics_path.read_text().splitlines() if x.strip()]
                kept = [r for r in records if r.get("step", 0) <= run.state.global_step and r.get("event") != "end"]
                run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        acc.wait_for_everyone()
        s = run.state
        acc.print(f"resumed from {resume_from} at step {s.global_step} (epoch {s.epoch}, batch {s.batches_in_epoch})")
    elif run.cfg.train.eval_baseline:
        for name, loader in run.eval_loaders.items():
            metrics, _, _ = evaluate(run.model, loader, acc, run.labels, target=run.target)
            if acc.is_main_process:
                log_line(run.metrics_path, {"event": "baseline", "split": name, **metrics})
            acc.print(f"baseline (untrained) {name}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in shown_metrics(run.task)))
    if launched_by_accelerate():
        run.launcher_pid = os.getppid()


# --- the loop ------------------------------------------------------------------------------------------


def fit(run: Run) -> float:
    """The training loop. One place decides, after each optimizer step, whether to log, evaluate and save,
    so a step that is an epoch end and also a multiple of eval_every/save_every is evaluated and saved once.
    With train.time_budget_minutes, the total steps are fixed after the first steps and revised as it runs."""
    from tqdm.auto import tqdm

    cfg, acc, state = run.cfg.train, run.accelerator, run.state
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    model.train()
    progress = tqdm(total=run.total_steps, initial=state.global_step, disable=not acc.is_local_main_process, desc="train")
    # Kept on the device and read only at log, evaluation and save points: reading a device value (.item(),
    # int(), bool()) waits for the GPU, and once per step that stalls the queue of launched kernels.
    interval = torch.zeros(2, device=acc.device)  # sum of micro-batch losses, count: the logged loss is their mean
    run.tokens = torch.zeros((), dtype=torch.long, device=acc.device)
    start = run.loop_start = clock()
    run.start_step = state.global_step
    budget = cfg.time_budget_minutes > 0
    stop = False
    while state.global_step < run.total_steps and not stop:
        run.train_loader.set_epoch(state.epoch)
        batches = acc.skip_first_batches(run.train_loader, state.batches_in_epoch) if state.batches_in_epoch else run.train_loader
        for batch in batches:
            batch.pop("index")
            with acc.accumulate(model):
                loss = training_loss(model, batch, run.class_weights, run.cfg.train.label_smoothing, run.target)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            interval += torch.stack([loss.detach().float(), torch.ones((), device=acc.device)])
            state.batches_in_epoch += 1
            state.samples += len(batch["labels"]) * acc.num_processes
            run.tokens += batch["attention_mask"].sum()
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            epoch_end = state.batches_in_epoch == len(run.train_loader)
            if epoch_end:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            last = state.global_step >= run.total_steps
            logged = state.global_step % cfg.log_every == 0
            evaluated = epoch_end or last or every(state.global_step, cfg.eval_every)
            if logged or evaluated or every(state.global_step, cfg.save_every):
                check_health(run, interval)  # a non-finite loss or a dead launcher stops every rank here
                state.tokens += int(run.tokens) * acc.num_processes
                run.tokens.zero_()
            if logged:
                log_train(run, interval, progress)
                interval.zero_()
            if evaluated:
                stop = validate(run, "epoch_end" if epoch_end else "eval")
            if epoch_end or last or stop or every(state.global_step, cfg.save_every):
                save_checkpoint(run)
            if stop or last:
                break
            if budget and (evaluated or (state.global_step - run.start_step) % BUDGET_PROBE_STEPS == 0):
                fit_budget(run, clock() - start)
                progress.total = run.total_steps
                progress.refresh()
    progress.close()
    if budget:
        loop_total = state.loop_seconds + clock() - run.loop_start
        # planned_steps None: the epochs ended before the first BUDGET_PROBE_STEPS steps were measured.
        plan = run.recipe.setdefault("time_budget", {"minutes": cfg.time_budget_minutes, "planned_steps": None})
        plan["loop_seconds"] = round(loop_total, 2)
    return clock() - start


def training_loss(model: Any, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None, label_smoothing: float = 0.0,
                  target: dict[str, Any] | None = None) -> torch.Tensor:
    """The model's own cross-entropy, or with class weights / label smoothing our own (computed in fp32).
    Multi-label (float 0/1 targets): binary cross-entropy with logits in fp32, `class_weights` as pos_weight.
    Regression (`target`, the scale): MSE in fp32 against the target scaled to mean 0 and std 1, so the
    learning rate and the head's initialisation suit any unit (scores 1-5, prices, seconds)."""
    if target is not None:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        scaled = (batch["labels"] - target["mean"]) / target["std"]
        return torch.nn.functional.mse_loss(logits[:, 0].float(), scaled)
    if batch["labels"].dtype.is_floating_point:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["labels"], pos_weight=class_weights)
    if class_weights is None and not label_smoothing:
        return model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], weight=class_weights, label_smoothing=label_smoothing)


# A time budget fixes the total after this many steps and re-plans every this many steps (and after each
# evaluation) with the mean step time so far: batches differ in length, so the first ones can mislead
# (measured on AG News: planned from 10 steps alone, a 5-minute budget ran 9.8% over; re-planned, 2.0%).
BUDGET_PROBE_STEPS = 10


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def check_health(run: Run, interval: torch.Tensor) -> None:
    """At log, evaluation and save points (not per step: that would read the device every step), for all ranks
    at once (one tiny all-reduce), so no rank is left waiting in a collective. `interval` sums the losses
    since the last log point: one non-finite loss makes it non-finite."""
    acc = run.accelerator
    orphaned = run.launcher_pid is not None and os.getppid() != run.launcher_pid
    flags = torch.stack([(~torch.isfinite(interval[0])).float(), torch.tensor(float(orphaned), device=acc.device)])
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    if flags[1] > 0:
        several = acc.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        raise TrainingError(
            ("lost contact with another training process: " if several else "")
            + f"the launcher of this run is gone (parent pid {run.launcher_pid} exited"
            + ("; it stops when another machine of the run is lost" if several else "") + f"); stopping at step "
            f"{run.state.global_step} without writing a checkpoint. Continue with train.resume=latest"
            + (" on every machine" if several else "")
        )
    if flags[0] > 0:
        raise TrainingError(
            f"non-finite loss by step {run.state.global_step}; the last good checkpoint is in {run.ckpt_root} "
            "(lower train.lr, or train.mixed_precision=no)"
        )


def log_train(run: Run, interval: torch.Tensor, progress: Any) -> None:
    """Mean training loss over the logging interval, across ranks (every rank joins the reduce)."""
    acc, state = run.accelerator, run.state
    total = acc.reduce(interval.clone(), reduction="sum") if acc.num_processes > 1 else interval
    loss = float(total[0] / total[1].clamp(min=1))
    if acc.is_main_process:
        lr = run.scheduler.get_last_lr()[0]
        log_line(run.metrics_path, {"event": "train", "step": state.global_step, "epoch": state.epoch, "loss": loss, "lr": lr})
        acc.log({"train/loss": loss, "train/lr": lr}, step=state.global_step)
        progress.set_postfix(loss=f"{loss:.4f}")


def validate(run: Run, kind: str) -> bool:
    """Evaluate, save the adapter if best, and decide early stopping once for every rank. Returns: stop."""
    t0 = clock()
    acc, state = run.accelerator, run.state
    metrics, _, _ = evaluate(run.model, run.eval_loaders["validation"], acc, run.labels, target=run.target)
    best_by = metric_for_best(run.cfg, run.task)
    value = metrics[best_by]
    improved = is_better(value, state.best_metric, best_by)
    if improved:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
        save_adapter(run, {"step": state.global_step, "validation": metrics})
    else:
        state.evals_without_improvement += 1
    if acc.is_main_process:
        record = {"event": kind, "step": state.global_step, "epoch": state.epoch, "best": improved, **{f"val_{k}": v for k, v in metrics.items()}}
        log_line(run.metrics_path, record)
        acc.log({f"val/{k}": metrics[k] for k in ("loss", "accuracy", "f1_weighted", "f1_macro", "pearson", "spearman", "mse")
                 if k in metrics}, step=state.global_step)
        if run.patience and state.evals_without_improvement >= run.patience:
            acc.set_trigger()
    run.timings["evaluation"].append(clock() - t0)
    acc.print(f"step {state.global_step}: val " + " ".join(f"{k} {metrics[k]:.4f}" for k in shown_metrics(run.task))
              + f" loss {metrics['loss']:.4f}" + (" (best)" if improved else ""))
    stop = acc.check_trigger()
    if stop:
        acc.print(f"early stopping: no improvement in {run.patience} evaluations")
        run.recipe["early_stopped_at_step"] = state.global_step
    return stop


def save_adapter(run: Run, extra: dict[str, Any]) -> None:
    """Adapter weights + head, tokenizer and label map; written by the main process only, atomically."""
    acc = run.accelerator
    state_dict = acc.get_state_dict(run.model)  # every rank joins: FSDP gathers shards here
    if acc.is_main_process:
        adapter_dir = run.run_dir / "adapter"
        tmp = temp_dir_beside(adapter_dir)
        try:
            acc.unwrap_model(run.model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            run.tokenizer.save_pretrained(tmp)
            write_adapter_meta(tmp, {**run.meta, **extra})
            swap_in(tmp, adapter_dir)  # a complete adapter is at adapter/ at every moment
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()


def save_checkpoint(run: Run) -> None:
    """Every rank saves its state into a partial dir; the main process completes it and renames it into place."""
    t0 = clock()
    acc, step = run.accelerator, run.state.global_step
    run.state.loop_seconds += t0 - run.loop_start  # loop time so far, kept across a resume (time budget)
    run.loop_start = t0
    if acc.is_main_process or run.keeps_node_files:
        run.ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(checkpoints.partial_dir(run.ckpt_root, step), ignore_errors=True)
    acc.wait_for_everyone()
    # RNG state is per process; model, optimizer and scheduler are written by the main process, and on a
    # node with its own disk also by its local main process (accelerate's save_on_each_node, set per node).
    acc.save_state(str(checkpoints.partial_dir(run.ckpt_root, step)))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (checkpoints.partial_dir(run.ckpt_root, step) / RESUME_KEY).write_text(json.dumps(resume_key(run)), encoding="utf-8")
        checkpoints.finish(run.ckpt_root, step, run.state.state_dict(), run.run_dir / "adapter", run.cfg.train.keep_checkpoints)
    elif run.keeps_node_files:  # the same checkpoint on this node's disk (no best adapter: the main node keeps it)
        checkpoints.finish(run.ckpt_root, step, run.state.state_dict(), run.run_dir / "adapter", run.cfg.train.keep_checkpoints)
    acc.wait_for_everyone()
    run.timings["checkpoint"].append(clock() - t0)


# --- finish --------------------------------------------------------------------------------------------


def finish(run: Run, elapsed: float, start_samples: int, start_tokens: int) -> dict[str, Any]:
    """Evaluate the test split once with the best adapter; write test metrics, predictions and summary.json."""
    acc, state, cfg = run.accelerator, run.state, run.cfg
    train_seconds = elapsed - run.overhead
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "best_step": state.best_step,
        f"best_val_{metric_for_best(cfg, run.task)}": state.best_metric,
        "task": run.task,
        "task_why": run.task_why,
        "target": run.target,
        # Wall time of the loop (with evaluation and checkpoints); throughput over training steps only.
        "train_seconds": elapsed,
        "eval_and_checkpoint_seconds": run.overhead,
        "samples": state.samples - start_samples,
        "samples_per_second": (state.samples - start_samples) / train_seconds if train_seconds > 0 else None,
        "tokens_per_second": (state.tokens - start_tokens) / train_seconds if train_seconds > 0 else None,
        "mixed_precision": run.mixed_precision,
        "last_layer": acc.unwrap_model(run.model).loraship_last_layer,  # "cls": first token only (model.last_layer)
        "pooling": run.cfg.model.pooling,  # what the classifier reads (model.pooling)
        "frozen_weights_dtype": frozen_linear_dtype(run.model),  # bfloat16 in bf16 runs (no cast per step)
        "num_processes": acc.num_processes,
        "data": run.data_report,
        "labels": run.labels,
        "recipe": run.recipe,
    }
    if summary["tokens_per_second"]:
        mean_length = (state.tokens - start_tokens) / max(state.samples - start_samples, 1)
        summary["mfu"] = mfu.report(acc, run.model, run.mixed_precision, summary["tokens_per_second"], mean_length)
    if "test" in run.eval_loaders or run.task == "multi_label":
        load_best_adapter(run)
    if run.task == "multi_label":
        choose_decision_thresholds(run)
        summary["thresholds"] = run.thresholds
    if "test" in run.eval_loaders:
        metrics, probs, index = evaluate(run.model, run.eval_loaders["test"], acc, run.labels, detailed=True, thresholds=run.thresholds,
                                         target=run.target)
        keys = Task(run.task, run.labels).headline_keys
        summary.update({f"test_{k}": metrics[k] for k in keys})
        if acc.is_main_process:
            (run.run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
            write_predictions(run.run_dir / "test_predictions.jsonl", run.splits["test"], run.labels, probs, index, run.thresholds)
        acc.print("test: " + " ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" ({metrics['rows']} rows)")
    if acc.is_main_process:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log_line(run.metrics_path, {"event": "end", **summary})
        update_adapter_meta(run, card_facts(run, summary))
    rate = summary["samples_per_second"]
    acc.print(f"done in {elapsed:.0f}s" + (f" ({rate:.1f} samples/s, MFU {summary['mfu']['mfu']:.0%} of the measured "
              f"{summary['mfu']['dtype']} GEMM peak)" if rate else "") + f"; run dir: {run.run_dir}")
    if not cfg.data.cache:
        acc.wait_for_everyone()  # every process is done reading the mapped files
        if acc.is_local_main_process:
            shutil.rmtree(data_cache_root(cfg), ignore_errors=True)
    acc.end_training()
    return summary


def load_best_adapter(run: Run) -> None:
    """Every process takes the best adapter's weights: read by the main process (only its node holds the file
    when the nodes have their own disks) and broadcast to the others."""
    from accelerate.utils import broadcast
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    acc = run.accelerator
    model = acc.unwrap_model(run.model)
    if acc.is_main_process:
        state = load_file(str(run.run_dir / "adapter" / "adapter_model.safetensors"))
    else:
        state = {k: torch.empty_like(v) for k, v in get_peft_model_state_dict(model).items()}
    if acc.num_processes > 1:
        state = {k: broadcast(v.to(acc.device).contiguous(), from_process=0).cpu() for k, v in sorted(state.items())}
    set_peft_model_state_dict(model, state)


def update_adapter_meta(run: Run, extra: dict[str, Any]) -> None:
    """Add keys to the best adapter's loraship.json once training has ended (main process; atomic)."""
    meta_path = run.run_dir / "adapter" / ADAPTER_META
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.update(extra)
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, meta_path)


def card_facts(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """What the model card says about the data and the training: sizes, label counts and a fingerprint of
    the training rows (no paths, no texts), the recipe that ran, its time and the machine."""
    counts = label_counts(run.splits["train"], len(run.labels))
    if run.target is not None:  # regression: the target's spread, not counts
        y = run.splits["train"].labels()
        counts_or_spread: dict[str, Any] = {"target": {**run.target, "min": float(y.min()), "max": float(y.max())}}
    else:
        counts_or_spread = {"label_counts": dict(zip(run.labels, map(int, counts), strict=True))}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return {
        "data": {"rows": {k: len(v) for k, v in run.splits.items()}, **counts_or_spread,
                 "fingerprint": data_fingerprint({"train": run.splits["train"]})},
        "training": {"steps": summary["steps"], "best_step": summary["best_step"], "epochs": run.recipe.get("epochs"),
                     "loop_seconds": round(summary["train_seconds"], 1), "mixed_precision": run.mixed_precision,
                     "processes": run.accelerator.num_processes, "device": device,
                     f"best_validation_{metric_for_best(run.cfg, run.task)}": summary[f"best_val_{metric_for_best(run.cfg, run.task)}"],
                     **{k: summary[k] for k in summary if k.startswith("test_")}},
    }


def choose_decision_thresholds(run: Run) -> None:
    """Multi-label: the best adapter's decision thresholds, chosen on the validation split (never test), into
    run.thresholds and the adapter's loraship.json, where the merge and the export take them from."""
    acc = run.accelerator
    _, probs, index = evaluate(run.model, run.eval_loaders["validation"], acc, run.labels)
    y = run.splits["validation"].labels()[index]
    run.thresholds = choose_thresholds(y, probs, run.labels, run.cfg.train.threshold_min_positives)
    run.thresholds["chosen_on"] = f"validation ({len(y)} rows)"
    if acc.is_main_process:
        update_adapter_meta(run, {"thresholds": run.thresholds})
    acc.wait_for_everyone()
    acc.print(f"thresholds (validation): global {run.thresholds['global']:.2f}, {len(run.thresholds['own_threshold'])} of "
              f"{len(run.labels)} labels with their own (>= {run.cfg.train.threshold_min_positives} positives)")


def write_predictions(path: Path, split: TokenizedSplit, labels: list[str], probs: np.ndarray, index: np.ndarray,
                      thresholds: dict[str, Any] | None = None) -> None:
    """One line per row in file order (evaluation ran in length order), texts read slice by slice. Multi-label
    rows: `label` and `pred` are lists of names (pred: probability >= the label's threshold)."""
    y = split.labels()
    cut = threshold_vector(thresholds, labels) if thresholds else None
    row_of = np.empty(len(index), dtype=np.int64)
    row_of[index] = np.arange(len(index))
    regression = y.dtype.kind == "f" and y.ndim == 1
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, len(split), BATCH_ROWS):
            for i, text in enumerate(split.inputs(start, start + BATCH_ROWS), start=start):
                p = probs[row_of[i]]
                if regression:
                    f.write(json.dumps({**input_record(text), "label": float(y[i]), "pred": round(float(p[0]), 6)}) + "\n")
                    continue
                f.write(json.dumps({
                    **input_record(text),
                    "label": label_names_of(labels, y[i].tolist()),
                    "pred": [n for n, on in zip(labels, decide(p, cut), strict=True) if on] if cut is not None else labels[int(p.argmax())],
                    "probs": {name: round(float(v), 6) for name, v in zip(labels, p, strict=True)},
                }) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_third_party(args.verbose)
    try:
        cfg: Config = load_config(args.config, args.overrides)
        mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lock = None
    try:
        # setup
        accelerator = make_accelerator(cfg, mixed_precision)
        lock, resume_from = claim_run_dir(cfg, accelerator)
        run = Run(cfg, accelerator, Path(cfg.output.run_dir), mixed_precision)
        run.shared_disk = sees_main_run_dir(run.run_dir, accelerator)
        accelerator.project_configuration.save_on_each_node = not run.shared_disk
        node_lock, resume_from = claim_node_run_dir(cfg, run, resume_from)
        lock = lock or node_lock
        load_data(run)
        check_resume(run, resume_from)
        build_training(run)
        start_run(run, resume_from)  # every check passed: only now is an old run replaced
        restore(run, resume_from)
        # loop
        start_samples, start_tokens = run.state.samples, run.state.tokens
        elapsed = fit(run)
        # finish
        finish(run, elapsed, start_samples, start_tokens)
        return 0
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.distributed.DistBackendError as e:  # another process, or a whole node, is gone
        print(f"error: lost contact with another training process ({str(e).splitlines()[0][:300]}); this process stops. "
              "Start every node again with train.resume=latest to continue from the last complete checkpoint", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        # The process group is ended here, not at interpreter exit, where gloo's threads can abort the
        # process ("terminate called without an active exception") after a run that succeeded.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):  # a peer already gone: nothing left to end cleanly
                torch.distributed.destroy_process_group()
        # Accelerate keeps process-wide singletons; reset them so main() can run again in one process (tests).
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


if __name__ == "__main__":
    sys.exit(main())
