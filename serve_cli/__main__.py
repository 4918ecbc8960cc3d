"""serve_cli: fast, torch-free prediction and evaluation on files with an exported ONNX model.

This module parses arguments and dispatches; each verb lives in its own module (predict.py, evaluate.py,
info.py, http.py for serve), and library code the export uses lives in runtime.py.

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
import os
import sys

from loraship.fsutil import OutputError
from loraship.rows import FORMATS, InputError
from serve_cli.io import RowFailure
from serve_cli.runtime import (
    DEFAULT_BATCH_SIZE,
    MAX_PADDING,
    VARIANT_FILES,
    ModelDirError,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve_cli", description="Predict and evaluate with an exported ONNX text classifier.")
    sub = p.add_subparsers(dest="command", required=True)

    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
        return value

    def count(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
        return value

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, help="ONNX dir written by python -m export.to_onnx")
        sp.add_argument("--input", required=True, help="input file, or - for stdin")
        sp.add_argument("--format", choices=FORMATS, default="auto", help="input format (auto: by extension)")
        sp.add_argument("--text-field", help="field/column holding the text (default: text; a pair model: the first "
                        "text field it was trained on)")
        sp.add_argument("--text-pair-field", help="pair models: field/column holding the second text (default: the "
                        "one the model was trained on)")
        sp.add_argument("--variant", choices=sorted(VARIANT_FILES), help="model variant (default: the export's default)")
        sp.add_argument("--batch-size", type=positive, default=DEFAULT_BATCH_SIZE,
                        help="rows per ONNX run (a dynamic int8 model's results depend slightly on batching; fp32 and the "
                        "batch-independent int8 ones do not)")
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
    ev.add_argument("--label-field", help="field holding the label or target (default: label; a regression model: "
                    "the target field it was trained on)")
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
    sv.add_argument("--max-batch-size", type=positive, default=1,
                    help="rows of concurrent requests merged into one batch (1: each request runs on its own; one "
                    "request's rows run in sorted sub-batches of up to max(this, 32))")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, help="how long an idle batcher waits for more requests")
    sv.add_argument("--max-padding", type=float, default=MAX_PADDING,
                    help="a sub-batch ends where padding would pass this share of its tokens (1: never split for padding)")
    sv.add_argument("--max-queue", type=positive, default=2048, help="rows waiting before requests get 429")
    sv.add_argument("--max-client-batch-size", type=positive, default=256, help="inputs in one request (more: 413)")
    sv.add_argument("--payload-limit", type=positive, default=2_000_000, help="bytes in one request body (more: 413)")
    sv.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request gets 504")
    sv.add_argument("--no-share-with-idle", action="store_true",
                    help="a worker runs every request it collected, even while other workers idle (default: it keeps "
                    "an even share and hands the rest to the idle workers)")
    sv.add_argument("--worker-nice", type=int, choices=range(20), default=5, metavar="0-19",
                    help="model workers run this much above the server's nice value, so the event loop never waits "
                    "behind a model run for a core (Linux; 0: same priority)")
    sv.add_argument("--merge-depth", type=count, default=16, metavar="ROWS",
                    help="with this many rows waiting, single texts are tokenized on arrival and a worker runs the "
                    "request at the head of the queue with waiting texts of exactly its token length (0: never)")
    sv.add_argument("--merge-rows", type=positive, default=4, help="rows in one such run of equal-length texts")
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


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from serve_cli.http import Limits, serve
    except ImportError as e:
        raise InputError(f"serve needs the server extra ({e.name} is missing): pip install 'loraship[serve]'") from e
    limits = Limits(max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    max_padding=args.max_padding, max_queue=args.max_queue, max_client_batch_size=args.max_client_batch_size,
                    payload_limit=args.payload_limit, request_timeout_s=args.request_timeout,
                    share_with_idle=not args.no_share_with_idle, worker_nice=args.worker_nice,
                    merge_depth=args.merge_depth, merge_rows=args.merge_rows)
    return serve(args.model, args.variant, args.host, args.port, args.threads, args.workers, limits, args.log_texts, args.log_level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Each verb's module is imported only when it runs: a predict does not load the eval's plotting.
        if args.command == "predict":
            from serve_cli.predict import cmd_predict

            return cmd_predict(args)
        if args.command == "eval":
            from serve_cli.evaluate import cmd_eval

            return cmd_eval(args)
        if args.command == "serve":
            return cmd_serve(args)
        from serve_cli.info import cmd_info

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
