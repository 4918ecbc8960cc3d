"""Merge a trained LoRA adapter and export a validated ONNX model (fp32 + int8) for CPU inference.

    python -m export.to_onnx --run runs/agnews_minilm
    python -m export.to_onnx --run runs/agnews_minilm --eval-file ../shared/data/agnews/test.jsonl
    python -m export.to_onnx --adapter path/to/adapter --output /tmp/onnx --force

Writes RUN/merged (Hugging Face model dir, safetensors) and RUN/onnx (model.onnx, model_quantized.onnx,
tokenizer, config.json with id2label, export_report.json). Each output is built in a temp dir and
renamed into place only after every check passed; a rerun with the same inputs reuses them. With
--adapter, everything goes under --output (the merged model too, unless --merged-dir names a place).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export import card
from export.common import (
    CALIBRATION_FILE,
    INT8_FILE,
    MERGE_STAMP,
    META,
    REPORT,
    VALIDATION_FILE,
    ExportError,
    cpu_flags,
    sha256,
    torch_logits,
    versions,
)
from export.gate import agreement_gate, load_eval_file, measure_file, validation_gate
from export.int8_search import METHODS as INT8_METHODS
from export.int8_search import search
from export.merge import generated_texts, merge, read_adapter
from export.quantize import QUANTIZATION_METHODS, auto_quantization, quantize
from loraship.fsutil import OutputError, RunDirLock, atomic_dir, temp_dir_beside
from loraship.quiet import quiet_third_party
from loraship.rows import as_input
from loraship.task import SINGLE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run dir written by trainer/train.py (uses RUN/adapter)")
    src.add_argument("--adapter", type=Path, help="an adapter dir alone (needs --output)")
    p.add_argument("--merged-dir", type=Path, help="merged model dir (default: RUN/merged; with --adapter: not kept)")
    p.add_argument("--output", type=Path, help="ONNX dir (default: RUN/onnx)")
    p.add_argument("--base-model", help="base model path or hub id, if not the one recorded with the adapter")
    p.add_argument("--eval-file", type=Path, help="labeled JSONL/CSV (e.g. the test split): accuracy of fp32 and int8 "
                   "reported in export_report.json; never used to choose")
    p.add_argument("--eval-merged", action="store_true", help="also measure the merged PyTorch model on --eval-file (slow)")
    p.add_argument("--text-field", help="text field of --eval-file (default: the training one)")
    p.add_argument("--label-field", help="label field of --eval-file (default: the training one)")
    p.add_argument("--text-pair-field", help="second text field of --eval-file for a pair model (default: the training one)")
    p.add_argument("--validation-file", type=Path, help="labeled rows that choose the int8 method and the default variant "
                   f"(default: RUN/{VALIDATION_FILE}, the trainer's validation split)")
    p.add_argument("--calibration-file", type=Path, help=f"texts for int8 calibration and sensitivity (default: RUN/{CALIBRATION_FILE})")
    p.add_argument("--max-int8-drop", type=float, default=0.3, help="validation accuracy points int8 may lose and still be default")
    p.add_argument("--int8-keep", type=int, default=4, help="at most this many sensitive MatMuls kept in fp32 by the int8 search")
    p.add_argument("--int8-try-all", action="store_true", help="measure every int8 candidate, not only up to the first that qualifies")
    p.add_argument("--allow-batch-dependent", action="store_true",
                   help="let the int8 search prefer dynamic int8 (faster; a row's answer then depends slightly on its "
                   "batch mates). Default: batch-independent candidates (static, static with row-wise layers, row-wise) first, dynamic only when "
                   "none of them keeps accuracy")
    p.add_argument("--int8-methods", type=int8_methods, default=INT8_METHODS,
                   help=f"comma-separated int8 methods the search may try ({', '.join(INT8_METHODS)}); e.g. rowwise for "
                   "row-wise scales everywhere: slower than static, and closer to fp32")
    p.add_argument("--int8-static-only", dest="int8_methods", action="store_const", const=("static",),
                   help="the same as --int8-methods static: only static int8 candidates")
    p.add_argument("--min-int8-agreement", type=float, default=0.98,
                   help="without --eval-file: share of parity texts where int8 and fp32 must agree for int8 to be default")
    p.add_argument("--max-int8-logit-diff", type=float, default=1.0,
                   help="without --eval-file: largest int8 vs fp32 logit difference on the parity texts for int8 to be default")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed at each conversion")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18: optimum's minimum for BERT)")
    p.add_argument("--quantization", choices=QUANTIZATION_METHODS, default="auto",
                   help="int8 method (auto: the accuracy-aware search on validation rows; without them, per CPU)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for validation (0 = all cores)")
    p.add_argument("--force", action="store_true", help="rebuild the merged and ONNX dirs (only ones loraship wrote)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings too (or LORASHIP_VERBOSE=1)")
    args = p.parse_args(argv)
    if args.adapter is not None and args.output is None:
        p.error("--adapter needs --output: the export writes only under its outputs, never beside the adapter")
    return args


def export_onnx(merged_dir: Path, out_dir: Path, opset: int, trust_remote_code: bool) -> None:
    from optimum.exporters.onnx import main_export

    # Our own validation below is stricter (several shapes, padding in the batch) than optimum's.
    main_export(
        str(merged_dir),
        output=str(out_dir),
        task="text-classification",
        opset=opset,
        do_validation=False,
        trust_remote_code=trust_remote_code,
        library_name="transformers",
    )


def validate_onnx(onnx_dir: Path, variant: str, merged: Any, tokenizer: Any, texts: list[Any], max_length: int, threads: int) -> dict[str, Any]:
    """ORT vs PyTorch logits at batch sizes 1 and 8, at a short and the full max_length, padding in the batch
    (pairs: both sides truncated longest-first at the short length)."""
    from loraship.rows import input_chars
    from serve_cli.runtime import OnnxClassifier

    results = []
    ordered = sorted(texts, key=input_chars)
    batch8 = [ordered[i * len(ordered) // 8] for i in range(8)] if len(ordered) >= 8 else (ordered * 8)[:8]
    for length in sorted({min(16, max_length), max_length}):
        clf = OnnxClassifier(onnx_dir, variant=variant, threads=threads or None, max_length=length)
        for batch in ([ordered[-1]], batch8):
            ref = torch_logits(merged, tokenizer, batch, length, batch_size=len(batch))
            got = clf.logits(batch)
            results.append({
                "batch_size": len(batch),
                "max_length": length,
                "max_abs_diff": float(np.abs(ref - got).max()),
                "argmax_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            })
    return {"cases": results, "max_abs_diff": max(r["max_abs_diff"] for r in results), "min_argmax_agree": min(r["argmax_agree"] for r in results)}


def fingerprint(adapter_dir: Path, base_model: str, method: str, fields: tuple[str, str, str | None], selection: tuple[Path | None, Path | None],
                args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes what the export writes: a rerun with any of it changed must rebuild."""
    meta = adapter_dir / META
    return {
        "adapter_sha256": sha256(adapter_dir / "adapter_model.safetensors"),
        "adapter_config_sha256": sha256(adapter_dir / "adapter_config.json"),
        "adapter_meta_sha256": sha256(meta) if meta.is_file() else None,
        "base_model": base_model,
        "opset": args.opset,
        "atol": args.atol,
        "quantization": method,
        "eval_file": {"name": args.eval_file.name, "sha256": sha256(args.eval_file), "text_field": fields[0],
                      "label_field": fields[1], "text_pair_field": fields[2]} if args.eval_file else None,
        "max_int8_drop": args.max_int8_drop,
        "eval_merged": args.eval_merged,
        "int8_keep": args.int8_keep,
        "int8_try_all": args.int8_try_all,
        "int8_methods": list(args.int8_methods),
        "allow_batch_dependent": args.allow_batch_dependent,
        "validation": sha256(selection[0]) if selection[0] else None,
        "calibration": sha256(selection[1]) if selection[1] else None,
        "min_int8_agreement": args.min_int8_agreement,
        "max_int8_logit_diff": args.max_int8_logit_diff,
    }


@contextlib.contextmanager
def output_paths(args: argparse.Namespace) -> Iterator[tuple[Path, Path, Path, bool]]:
    """(adapter dir, merged dir, onnx dir, merged dir is a temp dir); holds the run-dir lock with --run."""
    if args.run is None:
        merged_dir = args.merged_dir or temp_dir_beside(args.output.parent / f".{args.output.name}-merged")
        try:
            yield args.adapter, merged_dir, args.output, args.merged_dir is None
        finally:
            if args.merged_dir is None:
                shutil.rmtree(merged_dir, ignore_errors=True)
        return
    if not args.run.is_dir():
        raise ExportError(f"{args.run}: run dir not found")
    try:
        # A training writing this run dir holds its lock: the export refuses instead of racing it.
        lock = RunDirLock(args.run, "export").acquire()
    except OutputError as e:
        raise ExportError(str(e)) from e
    try:
        yield args.run / "adapter", args.merged_dir or args.run / "merged", args.output or args.run / "onnx", False
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_third_party(args.verbose)
    try:
        with output_paths(args) as (adapter_dir, merged_dir, onnx_dir, merged_is_temp):
            return run(args, adapter_dir, merged_dir, onnx_dir, merged_is_temp)
    except (ExportError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def inside(path: Path, root: Path | None) -> bool:
    return root is not None and path.resolve().is_relative_to(root.resolve())


def run(args: argparse.Namespace, adapter_dir: Path, merged_dir: Path, onnx_dir: Path, merged_is_temp: bool) -> int:
    start = time.perf_counter()
    meta = read_adapter(adapter_dir)
    base_model = args.base_model or meta["base_model"]
    selection = selection_files(args)
    method = "search" if args.quantization == "auto" and selection[0] else (
        auto_quantization() if args.quantization == "auto" else args.quantization)
    fields = (args.text_field or meta.get("text_field", "text"), args.label_field or meta.get("label_field", "label"),
              args.text_pair_field or meta.get("text_pair_field") or None)
    fp = fingerprint(adapter_dir, base_model, method, fields, selection, args)
    if onnx_dir.exists() and not args.force:
        old = json.loads((onnx_dir / REPORT).read_text()) if (onnx_dir / REPORT).is_file() else {}
        if old.get("inputs") == fp:
            print(f"{onnx_dir}: up to date (same adapter and options); --force rebuilds it")
            return 0
        raise ExportError(f"{onnx_dir}: exists and was built from other inputs; pass --force to replace it or choose --output")

    task = meta.get("task", SINGLE)
    eval_data = load_eval_file(args.eval_file, fields[0], fields[1], meta["labels"], task, fields[2]) if args.eval_file else None
    texts, texts_from = parity_texts(meta, eval_data, adapter_dir, args.trust_remote_code)
    report: dict[str, Any] = {"inputs": fp, "source": {"adapter": adapter_dir.name, "run": args.run.name if args.run else None},
                              "parity_texts": {"from": texts_from, "rows": len(texts)}}
    report["merge"] = merge_phase(args, adapter_dir, meta, base_model, merged_dir, merged_is_temp, texts, fp)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trust = args.trust_remote_code
    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir), dtype=torch.float32, trust_remote_code=trust).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=trust)
    phases = report["phase_seconds"] = {"merge": report["merge"]["seconds"]}
    with atomic_dir(onnx_dir, args.force, "--force", "export.to_onnx ONNX dir", check_lock=not inside(onnx_dir, args.run)) as tmp:
        t0 = time.perf_counter()
        onnx_phase(args, tmp, merged, tokenizer, texts, meta, report)
        phases["onnx_export_and_parity"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        default_variant, gate = int8_phase(args, tmp, merged, tokenizer, texts, meta, method, selection, report)
        phases["int8_and_default_variant"] = time.perf_counter() - t0
        report["gate"] = gate
        report["default_variant"] = default_variant
        print(f"default variant: {default_variant} ({gate['by']}): {gate['verdict']}")
        if eval_data is not None:
            t0 = time.perf_counter()
            report["eval_file"] = measure_file(tmp, eval_data, args.eval_file.name, len(meta["labels"]), args.threads,
                                               merged if args.eval_merged else None, tokenizer, meta["max_length"])
            report["eval_file"]["seconds"] = phases["eval_file"] = time.perf_counter() - t0
            ev = report["eval_file"]
            print(f"{args.eval_file.name} ({ev['rows']} rows, reported, not used to choose): "
                  + ", ".join(f"{k} {ev['metric']} {ev[k][ev['metric']]:.4f}" for k in ("merged", "onnx_fp32", "onnx_int8") if k in ev))
        report["variants"] = {
            v: {"file": f, "bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
            for v, f in (("fp32", "model.onnx"), ("int8", INT8_FILE))
        }
        report["opset"] = args.opset
        report["versions"] = versions()
        report["labels"] = meta["labels"]
        report["task"] = meta.get("task", "single_label")
        if meta.get("thresholds"):
            report["thresholds"] = meta["thresholds"]
        if meta.get("target"):
            report["target"] = meta["target"]
        report["input_fields"] = {"text": meta.get("text_field", "text"), "text_pair": meta.get("text_pair_field") or None}
        report["training_config"] = meta.get("config")
        report["total_seconds"] = time.perf_counter() - start
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        card.write(tmp, meta, report, "onnx", onnx_dir)
    print(f"wrote {onnx_dir} (default variant {report['default_variant']}) in {report['total_seconds']:.0f}s ("
          + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in phases.items()) + ")")
    return 0


def parity_texts(meta: dict[str, Any], eval_data: tuple[list[Any], np.ndarray] | None, adapter_dir: Path,
                 trust_remote_code: bool) -> tuple[list[Any], str]:
    """Inputs for the parity checks: the adapter's samples, else eval-file rows, else generated texts (pairs
    for a pair model)."""
    if len(meta["sample_texts"]) >= 2:
        return [as_input(x) for x in meta["sample_texts"]], "adapter sample texts"
    if eval_data is not None and len(eval_data[0]) >= 2:
        return eval_data[0][:32], "eval file"
    return (generated_texts(adapter_dir, trust_remote_code=trust_remote_code, pair=bool(meta.get("text_pair_field"))),
            "generated from the vocabulary (the adapter carries no texts)")


def merge_phase(args: argparse.Namespace, adapter_dir: Path, meta: dict[str, Any], base_model: str, merged_dir: Path,
                merged_is_temp: bool, texts: list[str], fp: dict[str, Any]) -> dict[str, Any]:
    """Merge into merged_dir, or reuse it when it was built from this adapter."""
    t0 = time.perf_counter()
    stamp = merged_dir / MERGE_STAMP
    inputs = {k: fp[k] for k in ("adapter_sha256", "adapter_config_sha256", "adapter_meta_sha256", "base_model", "atol")}
    if not args.force and stamp.is_file() and json.loads(stamp.read_text()).get("inputs") == inputs:
        print(f"merge: reusing {merged_dir}")
        return json.loads(stamp.read_text())["merge"] | {"reused": True, "seconds": time.perf_counter() - t0}
    if merged_is_temp:
        result = merge(adapter_dir, meta, base_model, merged_dir, texts, args.atol, args.trust_remote_code)
    else:
        if merged_dir.exists() and not args.force:
            raise ExportError(f"{merged_dir}: exists and was not built from this adapter; pass --force or --merged-dir")
        with atomic_dir(merged_dir, args.force, "--force", "export.to_onnx merged model", check_lock=not inside(merged_dir, args.run)) as tmp:
            result = merge(adapter_dir, meta, base_model, tmp, texts, args.atol, args.trust_remote_code)
            (tmp / MERGE_STAMP).write_text(json.dumps({"inputs": inputs, "merge": result}, indent=2))
            card.write(tmp, meta, None, "merged", merged_dir)
    print(f"merge: {merged_dir} (adapter vs merged max abs diff {result['max_abs_diff']:.2e})")
    return result | {"seconds": time.perf_counter() - t0}


def onnx_phase(args: argparse.Namespace, tmp: Path, merged: Any, tokenizer: Any, texts: list[str], meta: dict[str, Any], report: dict[str, Any]) -> None:
    """Export and prove fp32 parity with PyTorch, inside the temp dir."""
    t0 = time.perf_counter()
    export_onnx(Path(merged.name_or_path), tmp, args.opset, args.trust_remote_code)
    report["export_seconds"] = time.perf_counter() - t0
    report["max_length"] = meta["max_length"]
    # serve_cli reads max_length and the default variant from the report; write a partial one now.
    (tmp / REPORT).write_text(json.dumps({"max_length": meta["max_length"], "default_variant": "fp32"}))
    parity = validate_onnx(tmp, "fp32", merged, tokenizer, texts, meta["max_length"], args.threads)
    report["parity_fp32"] = parity
    if parity["max_abs_diff"] > args.atol or parity["min_argmax_agree"] < 1.0:
        raise ExportError(f"ONNX fp32 parity failed: max abs logit diff {parity['max_abs_diff']:.2e} > {args.atol:g} (cases: {parity['cases']})")
    print(f"onnx fp32: parity max abs diff {parity['max_abs_diff']:.2e} over {len(parity['cases'])} shapes")


def selection_files(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(validation rows, calibration texts): given, else the ones the trainer saved in the run dir."""
    def pick(given: Path | None, name: str) -> Path | None:
        if given is not None:
            if not given.is_file():
                raise ExportError(f"{given}: file not found")
            return given
        default = args.run / name if args.run is not None else None
        return default if default is not None and default.is_file() else None

    return pick(args.validation_file, VALIDATION_FILE), pick(args.calibration_file, CALIBRATION_FILE)


def int8_phase(args: argparse.Namespace, tmp: Path, merged: Any, tokenizer: Any, texts: list[str], meta: dict[str, Any], method: str,
               selection: tuple[Path | None, Path | None], report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Build model_quantized.onnx and decide the default variant (on validation rows where there are some)."""
    t0 = time.perf_counter()
    pair_field = "text_pair" if meta.get("text_pair_field") else None  # the trainer's selection files name them so
    validation = load_eval_file(selection[0], "text", "label", meta["labels"], meta.get("task", SINGLE), pair_field) if selection[0] else None
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "asimd")))
    if method == "search":
        assert validation is not None
        calibration = calibration_inputs(selection[1], pair_field) if selection[1] else validation[0][:256]
        found = search(tmp, validation, calibration, args.max_int8_drop, args.threads, args.int8_keep, args.int8_try_all,
                       methods=args.int8_methods,
                       allow_batch_dependent=args.allow_batch_dependent)
        report["int8_search"] = found
        report["quantization"] = {"method": found["chosen"] or f"{found['shipped']} (not the default)", "cpu_flags": flags, "seconds": found["seconds"]}
        for c in found["candidates"]:
            print(f"int8 candidate {c['name']}: validation {found['metric']} {c['accuracy']:.4f} ({c['drop_points']:+.2f} points), expected drop "
                  f"{c['expected_drop_points']:+.2f} / {c['unlabelled_expected_drop_points']:+.2f} (validation / training texts), "
                  f"{c['rows_per_second']:.0f} rows/s" + (" <- chosen" if c["chosen"] else ""))
        gate = {"by": f"validation {found['metric']} (int8 search)", "rows": found["validation_rows"], "verdict": found["verdict"]}
        default = "int8" if found["chosen"] else "fp32"
    else:
        cfg = merged.config
        quantize(tmp, method, cfg.model_type, getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)),
                 getattr(cfg, "hidden_size", getattr(cfg, "dim", 0)))
        report["quantization"] = {"method": method, "cpu_flags": flags, "seconds": time.perf_counter() - t0}
        default, gate = validation_gate(tmp, validation, args, method) if validation else agreement_gate(tmp, texts, args)
    report["parity_int8"] = validate_onnx(tmp, "int8", merged, tokenizer, texts, meta["max_length"], args.threads)
    print(f"onnx int8 ({report['quantization']['method']}): max abs diff {report['parity_int8']['max_abs_diff']:.3f}, "
          f"argmax agreement >= {report['parity_int8']['min_argmax_agree']:.2f}")
    return default, gate


def int8_methods(text: str) -> tuple[str, ...]:
    """The --int8-methods list, checked."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in INT8_METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(INT8_METHODS)}")
    return methods


def calibration_inputs(path: Path, pair_field: str | None) -> list[Any]:
    """The calibration texts (unlabelled; pairs for a pair model) through the one reader."""
    from loraship import rows as reader

    try:
        _, rows = reader.read(str(path), "auto", reader.Fields("text", text_pair=pair_field))
        out = []
        for row in rows:
            if isinstance(row, reader.RowError):
                raise ExportError(f"{row.where}: {row.message}")
            out.append(row.input)
    except reader.InputError as e:
        raise ExportError(str(e)) from e
    return out


if __name__ == "__main__":
    sys.exit(main())
