"""`serve_cli predict`: labels for every row of a file (or a Ray Data job), in input order.

Rows are batched by length inside a bounded window and written back in input order; every input row
gets an output row or a reported error. Only onnxruntime, tokenizers and numpy are imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loraship import rows as reader
from loraship.rows import Row, RowError
from serve_cli.io import AtomicOutput, error_record, fail_fast
from serve_cli.runtime import ModelDirError, OnnxClassifier, input_fields, predict_in_order


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


def row_text(item: Row | RowError) -> Any:
    return item.input if isinstance(item, Row) else None


def csv_header(task: Any, k: int) -> list[str]:
    """CSV/TSV columns: id, label, score, top-k pairs; multi-label: id, the labels on (joined by ';'), then
    one probability column per label; regression: id, score."""
    if task.regression:
        return ["id", "score"]
    if task.multi:
        return ["id", "labels", *(f"score_{n}" for n in task.labels)]
    return ["id", "label", "score"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")]


def csv_row(rid: Any, row: dict[str, Any]) -> list[Any]:
    if "label" not in row and "labels" not in row:  # regression
        return [rid, row["score"]]
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
        text_field, pair_field = input_fields(clf.task, args.text_field, args.text_pair_field)
        _, rows = reader.read(args.input, args.format, reader.Fields(text_field, id=args.id_field, text_pair=pair_field))
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
