"""Which variant is the default: int8 only if it keeps accuracy, decided on validation rows, never on test.

With the run's validation split (RUN/validation.jsonl, or --validation-file): the int8 search (see
int8_search.py), or for one given method its validation accuracy against fp32. Without validation rows
(an adapter alone): int8 must agree with fp32 on the parity texts (argmax agreement >= --min-int8-agreement
and max abs logit difference <= --max-int8-logit-diff). --eval-file (the test split) is measured and
reported, never used to choose. Predictions go through serve_cli's own batching: dynamic int8 picks
activation scales per batch, so this is what users reproduce.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from export.common import ExportError, torch_logits


def load_eval_file(path: Path, text_field: str, label_field: str, labels: list[str], task: str = "single_label",
                   text_pair_field: str | None = None) -> tuple[list[Any], np.ndarray]:
    """Rows through the one reader, labels through the one label map (multi-label: a 0/1 row over the labels;
    regression: the number); the first bad row or unknown label stops the export with the reader's words.
    With `text_pair_field` the inputs are (text, text_pair) pairs."""
    from loraship import rows as reader
    from loraship.labels import LabelMap, UnknownLabel, number

    label_map = LabelMap(labels)
    texts: list[Any] = []
    y: list[Any] = []
    try:
        _, rows = reader.read(str(path), "auto", reader.Fields(text_field, label_field, text_pair=text_pair_field or None))
        for row in rows:
            if isinstance(row, reader.RowError):
                raise ExportError(f"{row.where}: {row.message}")
            if task == "regression":
                value = number(row.label)
                if value is None:
                    raise ExportError(f"{row.where}: field {label_field!r} must be a number (a regression target), got {row.label!r}")
                y.append(value)
            else:
                try:
                    y.append(label_map.target(row.label, task == "multi_label"))
                except UnknownLabel as e:
                    raise ExportError(str(label_map.unknown(row.where, e.value, "Evaluate with a file of the model's labels"))) from e
            texts.append(row.input)
    except reader.InputError as e:
        raise ExportError(str(e)) from e
    if not texts:
        raise ExportError(f"{path}: no rows")
    return texts, np.array(y)


def headline_metrics(task: Any, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The figures the export reports per model: accuracy and F1 (multi-label: micro/macro F1 at the model's
    thresholds, subset accuracy; regression: Pearson, Spearman, MSE, MAE)."""
    report = task.metrics(y, probs)
    return {k: report[k] for k in task.headline_keys}


def onnx_proba(onnx_dir: Path, variant: str, texts: list[Any], threads: int) -> np.ndarray:
    """Probabilities exactly as `serve_cli predict/eval` makes them (its windows, batches and batch mates)."""
    from serve_cli.runtime import OnnxClassifier, proba_in_order

    return proba_in_order(OnnxClassifier(onnx_dir, variant=variant, threads=threads or None), texts)


def onnx_predict(onnx_dir: Path, variant: str, texts: list[Any], threads: int) -> np.ndarray:
    """Predictions exactly as `serve_cli predict/eval` makes them."""
    return onnx_proba(onnx_dir, variant, texts, threads).argmax(-1)


def onnx_logits(onnx_dir: Path, variant: str, texts: list[Any], threads: int) -> np.ndarray:
    """Logits with serve_cli's batching (length-sorted batches of its default size), in input order."""
    from serve_cli.runtime import DEFAULT_BATCH_SIZE, OnnxClassifier, logits_sorted

    return logits_sorted(OnnxClassifier(onnx_dir, variant=variant, threads=threads or None), texts, DEFAULT_BATCH_SIZE)


def measure_file(onnx_dir: Path, data: tuple[list[Any], np.ndarray], name: str, n_labels: int, threads: int,
                 merged: Any = None, tokenizer: Any = None, max_length: int = 512) -> dict[str, Any]:
    """Accuracy and F1 of ONNX fp32 and int8 (and the merged PyTorch model if given) on a labeled file, with
    serve_cli's batching (multi-label: at the model's thresholds). A report, never a choice: the default
    variant is chosen on validation."""
    from loraship.rows import input_chars
    from serve_cli.runtime import model_task

    texts, y = data
    task = model_task(onnx_dir)
    out: dict[str, Any] = {"file": name, "rows": len(y), "task": task.name, "metric": task.headline}
    if merged is not None:
        order = sorted(range(len(texts)), key=lambda i: input_chars(texts[i]))  # length-sorted batches: little padding
        logits = np.zeros((len(texts), n_labels), dtype=np.float32)
        for b in range(0, len(order), 64):
            idx = order[b : b + 64]
            logits[idx] = torch_logits(merged, tokenizer, [texts[i] for i in idx], max_length, 64)
        out["merged"] = headline_metrics(task, y, task.probs(logits))
    for variant in ("fp32", "int8"):
        out[f"onnx_{variant}"] = headline_metrics(task, y, onnx_proba(onnx_dir, variant, texts, threads))
    out["int8_drop_points"] = 100 * (out["onnx_fp32"][task.headline] - out["onnx_int8"][task.headline])
    if task.multi:
        for k in ("f1_macro", "f1_micro"):
            out[f"int8_{k}_drop_points"] = 100 * (out["onnx_fp32"][k] - out["onnx_int8"][k])
    return out


def validation_gate(onnx_dir: Path, data: tuple[list[Any], np.ndarray], args: argparse.Namespace, method: str) -> tuple[str, dict[str, Any]]:
    """One given int8 method (not the search): int8 is the default if it keeps the validation headline metric
    (accuracy; multi-label: macro F1 at the model's thresholds)."""
    from serve_cli.runtime import model_task

    texts, y = data
    task = model_task(onnx_dir)
    fp32, int8 = (float(task.metrics(y, onnx_proba(onnx_dir, v, texts, args.threads))[task.headline]) for v in ("fp32", "int8"))
    drop = 100 * (fp32 - int8)
    ok = drop <= args.max_int8_drop
    gate = {"by": f"validation {task.headline} ({method})", "rows": len(y), "fp32_accuracy": fp32, "int8_accuracy": int8,
            "int8_drop_points": drop, "max_int8_drop_points": args.max_int8_drop,
            "verdict": f"int8 ({method}) loses {drop:+.2f} points on validation: " + ("int8 is the default" if ok else "fp32 is the default")}
    return ("int8" if ok else "fp32"), gate


def agreement_gate(onnx_dir: Path, texts: list[Any], args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    fp32 = onnx_logits(onnx_dir, "fp32", texts, args.threads)
    int8 = onnx_logits(onnx_dir, "int8", texts, args.threads)
    agree = float((fp32.argmax(-1) == int8.argmax(-1)).mean())
    diff = float(np.abs(fp32 - int8).max())
    gate: dict[str, Any] = {
        "by": "int8 vs fp32 agreement on the parity texts (no --eval-file)",
        "rows": len(texts),
        "argmax_agree": agree,
        "max_abs_logit_diff": diff,
        "min_argmax_agree": args.min_int8_agreement,
        "max_logit_diff": args.max_int8_logit_diff,
    }
    ok = agree >= args.min_int8_agreement and diff <= args.max_int8_logit_diff
    gate["verdict"] = (f"int8 agrees with fp32 on {agree:.1%} of {len(texts)} texts, max logit diff {diff:.3f}: "
                       + ("int8 is the default" if ok else "fp32 is the default"))
    return ("int8" if ok else "fp32"), gate
