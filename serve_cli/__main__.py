"""serve_cli: fast, torch-free prediction and evaluation on files with an exported ONNX model.

    serve_cli predict --model runs/agnews_minilm/onnx --input texts.jsonl --output preds.jsonl
    cat texts.txt | serve_cli predict --model runs/agnews_minilm/onnx --input - --format txt
    serve_cli eval --model runs/agnews_minilm/onnx --input test.jsonl --report-dir eval_report \\
        --compare runs/agnews_minilm/onnx@fp32
    serve_cli info --model runs/agnews_minilm/onnx

Only onnxruntime, tokenizers and numpy are imported on the predict/eval path (matplotlib for the plot,
`evaluate` only for --metric). Rows are batched by length inside a bounded window and written back in
input order; every input row gets an output row or a reported error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loraship import rows as reader
from loraship.fsutil import OutputError, atomic_dir, check_not_locked, check_replaceable
from loraship.labels import LabelMap, is_unknown
from loraship.rows import FORMATS, InputError, Row, RowError
from loraship.task import THRESHOLDS_KEY, Task
from serve_cli.io import AtomicOutput
from serve_cli.runtime import (
    DEFAULT_BATCH_SIZE,
    VARIANT_FILES,
    ModelDirError,
    OnnxClassifier,
    predict_in_order,
    proba_in_order,
    read_model_dir,
)


class RowFailure(ValueError):
    """A bad row under --on-error fail."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve_cli", description="Predict and evaluate with an exported ONNX text classifier.")
    sub = p.add_subparsers(dest="command", required=True)

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
        return value

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="ONNX dir written by python -m export.to_onnx")
        sp.add_argument("--input", required=True, help="input file, or - for stdin")
        sp.add_argument("--format", choices=FORMATS, default="auto", help="input format (auto: by extension)")
        sp.add_argument("--text-field", default="text", help="field/column holding the text")
        sp.add_argument("--variant", choices=sorted(VARIANT_FILES), help="model variant (default: the export's default)")
        sp.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE,
                        help="rows per ONNX run (int8 results depend slightly on batching: activation scales are per batch)")
        sp.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = all cores)")
        sp.add_argument("--max-length", type=int, default=0, help="truncate to N tokens (0 = the training max_length)")
        sp.add_argument("--on-error", choices=("fail", "skip", "record"),
                        help="bad rows: stop (default), skip with a message, or record in an errors file "
                        "(--engine ray always records them in OUTPUT/errors/; fail then exits 1 when there are any)")
        sp.add_argument("--errors-file", help="with --on-error record: where bad rows go "
                        "(default: OUTPUT.errors.jsonl for predict, REPORT_DIR/errors.jsonl for eval)")
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output (only one serve_cli wrote, for dirs)")
        sp.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")

    pr = sub.add_parser("predict", help="predict labels for every row of a file")
    common(pr)
    pr.add_argument("--output", default="-", help="output file (JSONL or CSV by extension), or - for stdout; "
                    "with --engine ray an output directory")
    pr.add_argument("--output-format", choices=("auto", "jsonl", "csv", "tsv", "parquet"), default="auto",
                    help="auto: by the output's extension (ray: parquet)")
    ray = pr.add_argument_group("Ray engine (pip install 'loraship[ray]')")
    ray.add_argument("--engine", choices=("local", "ray"), default="local",
                     help="local: this process, one file; ray: Ray Data actors over files, dirs or globs on any cluster")
    ray.add_argument("--address", help="Ray cluster to join: auto (a `ray start` cluster on this machine) or "
                     "ray://HOST:10001; default: start a local one")
    ray.add_argument("--actors", type=int, default=0, help="model actors (0 = cluster CPUs / --threads-per-actor)")
    ray.add_argument("--threads-per-actor", type=positive, default=1, help="onnxruntime threads (and CPUs) per actor")
    pr.add_argument("--id-field", help="field/column used as the row id (default: the line number)")
    pr.add_argument("--top-k", type=int, default=3, help="labels with probabilities per row (single-label models)")
    pr.add_argument("--threshold", type=float, help="multi-label models: one decision threshold for every label "
                    "(default: the per-label thresholds chosen on validation, stored with the model)")

    ev = sub.add_parser("eval", help="accuracy, F1, per-class report and confusion matrix on a labeled file")
    common(ev)
    ev.add_argument("--label-field", default="label")
    ev.add_argument("--label-separator", help="multi-label labels in one cell, split at this string (e.g. ';')")
    ev.add_argument("--label-fields", nargs="+", metavar="COLUMN", help="multi-label labels as one 0/1 column per label")
    ev.add_argument("--threshold", type=float, help="multi-label models: one decision threshold for every label "
                    "(default: the per-label thresholds chosen on validation, stored with the model)")
    ev.add_argument("--report-dir", default="eval_report", help="where the report files go")
    ev.add_argument("--compare", nargs="+", default=[], metavar="DIR[@VARIANT]",
                    help="more models or variants to evaluate side by side, e.g. runs/x/onnx@fp32")
    ev.add_argument("--metric", action="append", default=[], metavar="NAME_OR_PATH",
                    help="extra metric from the `evaluate` library (hub name, or path of a local metric script). "
                    "This RUNS that metric's Python code (downloaded from the hub, or the local script): "
                    "it needs --allow-metric-code")
    ev.add_argument("--allow-metric-code", action="store_true",
                    help="allow --metric to run the metric's own code (a hub script or a local file)")
    ev.add_argument("--unknown-labels", choices=("error", "count"), default="error",
                    help="a label the model does not know: stop with an error, or count it and leave the row out")

    inf = sub.add_parser("info", help="labels, variants and export report summary of an ONNX dir")
    inf.add_argument("--model", required=True)

    sv = sub.add_parser("serve", help="HTTP service with dynamic batching (needs: pip install loraship[serve])")
    sv.add_argument("--model", required=True)
    sv.add_argument("--variant", choices=sorted(VARIANT_FILES), help="model variant (default: the export's default)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--threads", type=int, default=0, help="onnxruntime threads in all, split across workers (0 = all cores)")
    sv.add_argument("--workers", type=int, default=0,
                    help="model workers, each with its own ONNX session (0 = 2 where there are >= 2 threads, else 1)")
    sv.add_argument("--max-batch-tokens", type=positive, default=16384, help="padded tokens in one model run")
    sv.add_argument("--max-batch-size", type=positive, default=32, help="rows merged into one batch")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, help="how long an idle batcher waits for more requests")
    sv.add_argument("--max-padding", type=float, default=0.25,
                    help="a sub-batch ends where padding would pass this share of its tokens (1: never split for padding)")
    sv.add_argument("--max-queue", type=positive, default=2048, help="rows waiting before requests get 429")
    sv.add_argument("--max-client-batch-size", type=positive, default=256, help="inputs in one request (more: 413)")
    sv.add_argument("--payload-limit", type=positive, default=2_000_000, help="bytes in one request body (more: 413)")
    sv.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request gets 504")
    sv.add_argument("--log-texts", action="store_true", help="log request texts (off: only method, path, status, rows, ms)")
    sv.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    args = p.parse_args(argv)
    if getattr(args, "engine", "local") == "ray":
        if args.output == "-" or args.errors_file or args.output_format in ("csv", "tsv") or args.format != "auto":
            p.error("--engine ray writes an output directory (--output DIR) of parquet or jsonl parts with errors/ "
                    "beside them; --errors-file, --format and csv/tsv output are for the local engine")
        args.on_error = args.on_error or "record"
        args.output_format = "parquet" if args.output_format == "auto" else args.output_format
    elif args.command == "predict" and (args.output_format == "parquet" or args.address or args.actors):
        p.error("--output-format parquet, --address and --actors need --engine ray")
    if hasattr(args, "on_error") and args.on_error is None:
        args.on_error = "fail"
    if getattr(args, "metric", None) and not args.allow_metric_code:
        p.error("--metric runs the metric's own Python code (from the hub or a local script); "
                "pass --allow-metric-code to allow it")
    if getattr(args, "errors_file", None) and args.on_error != "record":
        p.error("--errors-file needs --on-error record (bad rows are only written to a file when recorded)")
    return args


class Progress:
    """rows and rows/s on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, rows: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.25:
            self.last = now
            sys.stderr.write(f"\r{rows} rows  {rows / max(now - self.start, 1e-9):.0f} rows/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")


def row_text(item: Row | RowError) -> str | None:
    return item.text if isinstance(item, Row) else None


def fail_fast(items: Iterable[Row | RowError], path: str, on_error: str) -> Iterator[Row | RowError]:
    for it in items:
        if isinstance(it, RowError) and on_error == "fail":
            raise RowFailure(f"{it.where}: {it.message} (use --on-error skip or record to go on past bad rows)")
        yield it


def csv_header(task: Any, k: int) -> list[str]:
    """CSV/TSV columns: id, label, score, top-k pairs; multi-label: id, the labels on (joined by ';'), then
    one probability column per label."""
    if task.multi:
        return ["id", "labels", *(f"score_{n}" for n in task.labels)]
    return ["id", "label", "score"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")]


def csv_row(rid: Any, row: dict[str, Any]) -> list[Any]:
    if "labels" in row:
        return [rid, ";".join(row["labels"]), *row["scores"].values()]
    return [rid, row["label"], row["score"]] + [v for t in row["top_k"] for v in (t["label"], t["score"])]


def cmd_predict_ray(args: argparse.Namespace) -> int:
    try:
        from serve_cli.ray_batch import RayJobError, run_job
    except ImportError as e:
        raise ModelDirError(f"--engine ray needs Ray Data: pip install 'loraship[ray]' ({e})") from e
    try:
        s = run_job(args)
    except RayJobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"rows: {s['rows_in']} in, {s['predicted']} predicted, {s['errors']} errors ({s['files']} files); "
              f"{s['seconds']:.1f}s, {s['rows_in'] / max(s['seconds'], 1e-9):.0f} rows/s on {s['actors']} actors ({s['variant']}); "
              f"output: {args.output}", file=sys.stderr)
    if s["errors"] and args.on_error == "fail":
        print(f"error: {s['errors']} rows could not be read; they are listed in {args.output}/errors/", file=sys.stderr)
        return 1
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return cmd_predict_ray(args)
    start = time.perf_counter()
    clf = OnnxClassifier(args.model, variant=args.variant, threads=args.threads or None, max_length=args.max_length or None)
    k = max(1, min(args.top_k, len(clf.labels)))
    out_fmt = args.output_format
    if out_fmt == "auto":
        suffix = Path(args.output).suffix.lower().lstrip(".") if args.output != "-" else ""
        out_fmt = suffix if suffix in ("csv", "tsv") else "jsonl"
    errors_path = None
    if args.on_error == "record":
        errors_path = args.errors_file or (f"{args.output}.errors.jsonl" if args.output != "-" else "-")
    # Check both outputs before reading a row: a refused overwrite must cost nothing.
    out = AtomicOutput(args.output, args.overwrite)
    err_out = None
    try:
        err_out = AtomicOutput(errors_path, args.overwrite) if errors_path and errors_path != "-" else None
        _, rows = reader.read(args.input, args.format, reader.Fields(args.text_field, id=args.id_field))
        writer = None
        if out_fmt in ("csv", "tsv"):
            import csv

            writer = csv.writer(out.f, delimiter="\t" if out_fmt == "tsv" else ",")
            writer.writerow(csv_header(clf.task, k))
        n_ok = n_err = 0
        progress = Progress(not args.quiet)
        for item, probs in predict_in_order(clf, fail_fast(rows, args.input, args.on_error), args.batch_size, row_text):
            if isinstance(item, RowError):
                n_err += 1
                if err_out is not None:
                    err_out.f.write(json.dumps(error_record(item)) + "\n")
                elif not args.quiet or args.on_error == "record":
                    print(f"{item.where}: {item.message}", file=sys.stderr)
                continue
            assert probs is not None
            rid = item.id if args.id_field else (item.line if item.file == args.input else item.where)
            row = clf.task.row_output(probs, k, args.threshold)
            if writer is not None:
                writer.writerow(csv_row(rid, row))
            else:
                out.f.write(json.dumps({"id": rid, **row}, ensure_ascii=False) + "\n")
            n_ok += 1
            progress.update(n_ok + n_err)
        progress.close()
        out.commit()
        if err_out is not None:
            err_out.commit()
    except BaseException:
        out.discard()
        if err_out is not None:
            err_out.discard()
        raise
    elapsed = time.perf_counter() - start
    if not args.quiet:
        print(f"rows: {n_ok + n_err} in, {n_ok} predicted, {n_err} errors; {elapsed:.2f}s, "
              f"{(n_ok + n_err) / elapsed:.0f} rows/s ({clf.variant})", file=sys.stderr)
    return 0


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'DIR' or 'DIR@int8'."""
    if "@" in spec:
        path, _, variant = spec.rpartition("@")
        if variant in VARIANT_FILES:
            return path, variant
    return spec, None


def evaluate_model(clf: OnnxClassifier, texts: list[str], y: np.ndarray, batch_size: int, threshold: float | None = None) -> dict[str, Any]:
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        side = min(1.2 * n + 2.5, 40.0)  # inches, capped: matplotlib refuses images past 2**16 pixels a side
        fig, ax = plt.subplots(figsize=(side, side))
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
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # matplotlib's limits vary by version and backend
        return f"the plot failed ({type(e).__name__}: {e})"
    return None


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


def error_record(item: RowError) -> dict[str, Any]:
    return {"file": item.file, "line": item.line, "where": item.where, "error": item.message}


def read_labeled(args: argparse.Namespace, labels: list[str], multi: bool = False) -> tuple[list[str], list[Any], list[dict[str, Any]], int]:
    """(texts, label ids (multi-label: 0/1 rows), bad rows, rows with unknown labels) of the eval input."""
    label_map = LabelMap(labels)
    fields = reader.Fields(args.text_field, None if args.label_fields else args.label_field,
                           label_separator=args.label_separator, label_fields=tuple(args.label_fields or ()))
    _, rows_iter = reader.read(args.input, args.format, fields)
    texts: list[str] = []
    y: list[Any] = []
    errors: list[dict[str, Any]] = []
    unknown = 0
    for item in fail_fast(rows_iter, args.input, args.on_error):
        if isinstance(item, RowError):
            errors.append(error_record(item))
            if not args.quiet and args.on_error == "skip":
                print(f"{item.where}: {item.message}", file=sys.stderr)
            continue
        target = label_map.ids(item.label) if multi else label_map.id(item.label)
        if target is None or is_unknown(target):
            if args.unknown_labels == "error":
                value = getattr(target, "value", item.label)
                raise RowFailure(str(label_map.unknown(item.where, value, "--unknown-labels count leaves such rows out")))
            unknown += 1
            continue
        texts.append(item.text)
        y.append([int(i in target) for i in range(len(labels))] if multi else target)
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
    texts, y, errors, unknown = read_labeled(args, labels, task.multi)
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
                  if task.multi else f"accuracy {rep['accuracy']:.4f}, weighted F1 {rep['f1_weighted']:.4f}, macro F1 {rep['f1_macro']:.4f}")
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
            f.write(json.dumps({"text": text, "true": labels[t], "pred": labels[int(p.argmax())],
                                "probs": {n: round(float(v), 6) for n, v in zip(labels, p, strict=True)}}, ensure_ascii=False) + "\n")
    (tmp / "report.md").write_text(markdown_report(main_result, table, extra, args.input, unknown, plotted))


def cmd_info(args: argparse.Namespace) -> int:
    config, report = read_model_dir(args.model)
    d = Path(args.model)
    info: dict[str, Any] = {
        "model": str(d),
        "labels": [config["id2label"][str(i)] for i in range(len(config["id2label"]))],
        "architecture": (config.get("architectures") or ["?"])[0],
        "task": Task.from_config(config).name,
        "variants": {v: {"file": f, "bytes": (d / f).stat().st_size} for v, f in VARIANT_FILES.items() if (d / f).is_file()},
        "default_variant": report.get("default_variant"),
        "max_length": report.get("max_length"),
    }
    if config.get(THRESHOLDS_KEY):
        info["thresholds"] = config[THRESHOLDS_KEY]
    if report:
        info["quantization"] = report.get("quantization", {}).get("method")
        info["parity_fp32_max_abs_diff"] = report.get("parity_fp32", {}).get("max_abs_diff")
        info["merge_max_abs_diff"] = report.get("merge", {}).get("max_abs_diff")
        if "gate" in report:
            info["default_chosen_by"] = report["gate"].get("by")
            info["verdict"] = report["gate"].get("verdict")
        if "int8_search" in report:
            s = report["int8_search"]
            info["int8_search"] = {"selected_on": s["selected_on"], "chosen": s["chosen"], "candidates": [
                {k: c.get(k) for k in ("name", "exclude", "accuracy", "drop_points", "expected_drop_points", "unlabelled_expected_drop_points",
                                       "agreement", "rows_per_second", "chosen")} for c in s["candidates"]]}
        if "eval_file" in report:
            ev = report["eval_file"]
            info["eval_file"] = {k: ev[k] for k in ("file", "rows", "merged", "onnx_fp32", "onnx_int8") if k in ev}
        info["versions"] = report.get("versions")
    print(json.dumps(info, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from serve_cli.http import Limits, serve
    except ImportError as e:
        raise InputError(f"serve needs the server extra ({e.name} is missing): pip install 'loraship[serve]'") from e
    limits = Limits(max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    max_padding=args.max_padding, max_queue=args.max_queue, max_client_batch_size=args.max_client_batch_size,
                    payload_limit=args.payload_limit, request_timeout_s=args.request_timeout)
    return serve(args.model, args.variant, args.host, args.port, args.threads, args.workers, limits, args.log_texts, args.log_level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_info(args)
    except (InputError, ModelDirError, OutputError, RowFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `serve_cli predict ... | head`: the reader went away; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
