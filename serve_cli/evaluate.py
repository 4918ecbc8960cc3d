"""`serve_cli eval`: metrics, per-label (or per-class) report and plots of a model on a labelled file.

Single-label: accuracy, F1, per-class table and confusion matrix; multi-label: see eval_multilabel.py;
regression: see eval_regression.py.
matplotlib is imported for the plots only, `evaluate` only for --metric (it runs the metric's code, and
needs --allow-metric-code).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from loraship import rows as reader
from loraship.fsutil import atomic_dir, check_not_locked, check_replaceable
from loraship.labels import LabelMap, UnknownLabel, number
from loraship.rows import InputError, RowError, input_record
from loraship.task import Task
from serve_cli.io import AtomicOutput, RowFailure, error_record, fail_fast
from serve_cli.plots import save_plot
from serve_cli.runtime import VARIANT_FILES, OnnxClassifier, input_fields, proba_in_order


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'DIR' or 'DIR@int8'."""
    if "@" in spec:
        path, _, variant = spec.rpartition("@")
        if variant in VARIANT_FILES:
            return path, variant
    return spec, None


def evaluate_model(clf: OnnxClassifier, texts: list[Any], y: np.ndarray, batch_size: int, threshold: float | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    probs = proba_in_order(clf, texts, batch_size)
    seconds = time.perf_counter() - t0
    report = clf.task.metrics(y, probs, threshold)
    report["task"] = clf.task.name
    report.update({
        "model": str(clf.model_dir), "variant": clf.variant, "file": clf.path.name, "bytes": clf.path.stat().st_size,
        "seconds": seconds, "rows_per_second": len(texts) / seconds if seconds else None,
    })
    return {"report": report, "probs": probs}


PLOT_NUMBERS_UP_TO = 30  # labels: beyond this the cells are too small for their counts
PLOT_TICKS_UP_TO = 100  # labels: beyond this the axes carry no names
PLOT_MAX_LABELS = 400  # labels: beyond this no plot (the table in report.md and confusion_matrix.json remain)


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path, title: str) -> str | None:
    """The confusion matrix as a PNG, as legible as the label count allows. Returns None when plotted, else
    why not: a plot is never worth the report, so any failure here keeps the report."""
    n = len(labels)
    if n > PLOT_MAX_LABELS:
        return f"{n} labels: too many for a legible plot"

    def draw(ax: Any) -> None:
        ax.imshow(cm, cmap="Blues")
        if n <= PLOT_TICKS_UP_TO:
            ax.set_xticks(range(n), labels, rotation=45 if n <= PLOT_NUMBERS_UP_TO else 90, ha="right",
                          fontsize=None if n <= PLOT_NUMBERS_UP_TO else 5)
            ax.set_yticks(range(n), labels, fontsize=None if n <= PLOT_NUMBERS_UP_TO else 5)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= PLOT_NUMBERS_UP_TO:
            top = cm.max() if cm.size else 0
            for i in range(cm.shape[0]):
                for j in range(cm.shape[1]):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")

    side = min(1.2 * n + 2.5, 40.0)  # inches, capped: matplotlib refuses images past 2**16 pixels a side
    return save_plot(path, (side, side), draw)


def markdown_report(main_report: dict[str, Any], rows: list[dict[str, Any]], extra: dict[str, Any], input_path: str, unknown: int,
                    no_plot: str | None = None) -> str:
    lines = [f"# Evaluation of {main_report['model']} ({main_report['variant']})", "", f"Input: `{input_path}`, {main_report['rows']} rows"
             + (f"; {unknown} rows with labels the model does not know were left out" if unknown else "") + ".", ""]
    lines += ["| model | variant | accuracy | weighted F1 | macro F1 | rows/s | size (MB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['accuracy']:.4f} | {r['f1_weighted']:.4f} | {r['f1_macro']:.4f} | "
                     f"{r['rows_per_second']:.0f} | {r['bytes'] / 1e6:.1f} |")
    lines += ["", "## Per class", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, c in main_report["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    labels = main_report["labels"]
    picture = f"(no plot: {no_plot}; the counts are below and in confusion_matrix.json)" if no_plot else "![confusion matrix](confusion_matrix.png)"
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "", picture, "",
              "| true \\ pred | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, main_report["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if extra:
        lines += ["", "## Extra metrics (evaluate)", ""] + [f"- {k}: {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def load_metric(name: str) -> Any:
    try:
        import evaluate

        return evaluate.load(name)
    except Exception as e:
        raise InputError(f"metric {name!r} cannot be loaded ({type(e).__name__}: {e}); give a hub name with a reachable hub "
                         "or the path of a local metric script") from e


def read_labeled(args: argparse.Namespace, task: Task) -> tuple[list[Any], list[Any], list[dict[str, Any]], int]:
    """(inputs, targets: label ids, 0/1 rows (multi-label) or numbers (regression), bad rows, rows with
    unknown labels) of the eval input. A regression target that is not a number is a bad row."""
    label_map = LabelMap(task.labels)
    text_field, pair_field = input_fields(task, args.text_field, args.text_pair_field)
    label_field = args.label_field or (task.target["name"] if task.regression and task.target else "label")
    fields = reader.Fields(text_field, None if args.label_fields else label_field, label_separator=args.label_separator,
                           label_fields=tuple(args.label_fields or ()), text_pair=pair_field)
    _, rows_iter = reader.read(args.input, args.format, fields)
    texts: list[Any] = []
    y: list[Any] = []
    errors: list[dict[str, Any]] = []
    unknown = 0
    for item in fail_fast(rows_iter, args.input, args.on_error):
        if isinstance(item, RowError):
            errors.append(error_record(item))
            if not args.quiet and args.on_error == "skip":
                print(f"{item.where}: {item.message}", file=sys.stderr)
            continue
        if task.regression:
            value = number(item.label)
            if value is None:
                bad = RowError(item.file, item.line, f"field {label_field!r} must be a number (a regression target), got {item.label!r}", item.unit)
                if args.on_error in (None, "fail"):
                    raise RowFailure(f"{bad.where}: {bad.message}")
                errors.append(error_record(bad))
                continue
            y.append(value)
            texts.append(item.input)
            continue
        try:
            y.append(label_map.target(item.label, task.multi))
        except UnknownLabel as e:
            if args.unknown_labels == "error":
                raise RowFailure(str(label_map.unknown(item.where, e.value, "--unknown-labels count leaves such rows out"))) from e
            unknown += 1
            continue
        texts.append(item.input)
    if not texts:
        raise InputError(f"{args.input}: no labeled rows to evaluate")
    return texts, y, errors, unknown


def cmd_eval(args: argparse.Namespace) -> int:
    report_dir = Path(args.report_dir)
    # Refuse before any work: an existing report dir needs --overwrite and must be one serve_cli wrote;
    # so must an existing errors file.
    check_replaceable(report_dir, args.overwrite, "--overwrite")
    check_not_locked(report_dir)
    errors_out = AtomicOutput(args.errors_file, args.overwrite) if args.on_error == "record" and args.errors_file else None
    try:
        return run_eval(args, report_dir, errors_out)
    except BaseException:
        if errors_out is not None:
            errors_out.discard()
        raise


def run_eval(args: argparse.Namespace, report_dir: Path, errors_out: AtomicOutput | None) -> int:
    specs = [(args.model, args.variant)] + [parse_model_spec(s) for s in args.compare]
    models = [OnnxClassifier(path, variant=v, threads=args.threads or None, max_length=args.max_length or None) for path, v in specs]
    metrics = [(name, load_metric(name)) for name in args.metric]
    labels = models[0].labels
    for m in models[1:]:
        if m.labels != labels:
            raise InputError(f"{m.model_dir}: labels {m.labels} differ from {labels}; compare models of one label set")
    task = models[0].task
    texts, y, errors, unknown = read_labeled(args, task)
    y_arr = np.array(y)

    results = [evaluate_model(m, texts, y_arr, args.batch_size, args.threshold) for m in models]
    main_result = results[0]["report"]
    main_result["row_errors"] = len(errors)
    main_result["unknown_labels"] = unknown
    pred = task.predict(results[0]["probs"], args.threshold)
    extra = {name: m.compute(predictions=pred.tolist(), references=y_arr.tolist()) for name, m in metrics}

    with atomic_dir(report_dir, args.overwrite, "--overwrite", "serve_cli eval report") as tmp:
        if task.multi:
            from serve_cli.eval_multilabel import write_report

            write_report(tmp, task, texts, y_arr, results, extra, args)
        elif task.regression:
            from serve_cli.eval_regression import write_report

            write_report(tmp, texts, y_arr, results, extra, args)
        else:
            write_single_label_report(tmp, labels, texts, y_arr, results, extra, args, unknown)
        if args.on_error == "record":
            out = errors_out.f if errors_out is not None else (tmp / "errors.jsonl").open("w", encoding="utf-8")
            out.write("".join(json.dumps(e) + "\n" for e in errors))
            if errors_out is None:
                out.close()
    if errors_out is not None:
        errors_out.commit()
    if not args.quiet:
        for r in results:
            rep = r["report"]
            print(f"{rep['model']} ({rep['variant']}): " + (f"macro F1 {rep['f1_macro']:.4f}, micro F1 {rep['f1_micro']:.4f}"
                  if task.multi else f"Pearson {rep['pearson']:.4f}, Spearman {rep['spearman']:.4f}, MSE {rep['mse']:.4f}"
                  if task.regression else f"accuracy {rep['accuracy']:.4f}, weighted F1 {rep['f1_weighted']:.4f}, macro F1 {rep['f1_macro']:.4f}")
                  + f", {rep['rows_per_second']:.0f} rows/s", file=sys.stderr)
        if errors:
            print(f"{len(errors)} bad rows" + (f": {args.errors_file or report_dir / 'errors.jsonl'}" if args.on_error == "record" else " skipped"), file=sys.stderr)
        print(f"report: {report_dir}/report.md", file=sys.stderr)
    return 0


def write_single_label_report(tmp: Path, labels: list[str], texts: list[str], y_arr: np.ndarray, results: list[dict[str, Any]],
                          extra: dict[str, Any], args: argparse.Namespace, unknown: int) -> None:
    """metrics.json, the confusion matrix (JSON and PNG), predictions.jsonl and report.md of a single-label model."""
    main_result = results[0]["report"]
    table = [r["report"] for r in results]
    (tmp / "metrics.json").write_text(json.dumps({**main_result, "extra_metrics": extra,
                                                  "compare": [{k: r[k] for k in ("model", "variant", "accuracy", "f1_weighted", "f1_macro", "rows_per_second", "bytes")} for r in table]}, indent=2))
    (tmp / "confusion_matrix.json").write_text(json.dumps({"labels": labels, "matrix": main_result["confusion_matrix"]}, indent=2))
    title = f"{Path(main_result['model']).resolve().parent.name}/{Path(main_result['model']).name} ({main_result['variant']})"
    plotted = plot_confusion(np.array(main_result["confusion_matrix"]), labels, tmp / "confusion_matrix.png", title)
    with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for text, t, p in zip(texts, y_arr, results[0]["probs"], strict=True):
            f.write(json.dumps({**input_record(text), "true": labels[t], "pred": labels[int(p.argmax())],
                                "probs": {n: round(float(v), 6) for n, v in zip(labels, p, strict=True)}}, ensure_ascii=False) + "\n")
    (tmp / "report.md").write_text(markdown_report(main_result, table, extra, args.input, unknown, plotted))
