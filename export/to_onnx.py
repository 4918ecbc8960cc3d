"""Merge a trained LoRA adapter and export a validated ONNX model (fp32 + int8) for CPU inference.

    python -m export.to_onnx --run runs/agnews_minilm
    python -m export.to_onnx --run runs/agnews_minilm --eval-file ../shared/data/agnews/test.jsonl
    python -m export.to_onnx --adapter runs/agnews_minilm/adapter --output /tmp/onnx --force

Writes RUN/merged (Hugging Face model dir, safetensors) and RUN/onnx (model.onnx, model_quantized.onnx,
tokenizer, config.json with id2label, export_report.json). Each output is built in a temp dir and
renamed into place only after every check passed; a rerun with the same inputs reuses them.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZATION_METHODS = ("auto", "ort-dynamic", "ort-dynamic-fused", "optimum-avx512_vnni", "optimum-avx2", "optimum-arm64")
INT8_FILE = "model_quantized.onnx"
REPORT = "export_report.json"
META = "loraship.json"


class ExportError(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run dir written by trainer/train.py (uses RUN/adapter)")
    src.add_argument("--adapter", type=Path, help="an adapter dir alone")
    p.add_argument("--merged-dir", type=Path, help="merged model dir (default: RUN/merged)")
    p.add_argument("--output", type=Path, help="ONNX dir (default: RUN/onnx)")
    p.add_argument("--base-model", help="base model path or hub id, if not the one recorded with the adapter")
    p.add_argument("--eval-file", type=Path, help="labeled JSONL/CSV: accuracy gate for merged, fp32 and int8")
    p.add_argument("--text-field", help="text field of --eval-file (default: the training one)")
    p.add_argument("--label-field", help="label field of --eval-file (default: the training one)")
    p.add_argument("--max-int8-drop", type=float, default=0.5, help="accuracy points int8 may lose and still be default")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed at each conversion")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18: optimum's minimum for BERT)")
    p.add_argument("--quantization", choices=QUANTIZATION_METHODS, default="auto", help="int8 method (auto: per CPU)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for validation (0 = all cores)")
    p.add_argument("--force", action="store_true", help="rebuild the merged and ONNX dirs even if they exist")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    return p.parse_args(argv)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_adapter(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's metadata (labels, base model, max_length); clear errors for anything missing."""
    if not adapter_dir.is_dir():
        raise ExportError(f"{adapter_dir}: adapter dir not found (train one with trainer/train.py)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise ExportError(f"{adapter_dir}: {name} missing: not a LoRA adapter dir saved with safetensors")
    meta: dict[str, Any] = {}
    if (adapter_dir / META).is_file():
        meta = json.loads((adapter_dir / META).read_text(encoding="utf-8"))
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    meta.setdefault("base_model", adapter_cfg.get("base_model_name_or_path"))
    if not meta.get("labels"):
        raise ExportError(f"{adapter_dir}: no label map ({META} with 'labels' missing); the export needs id2label")
    meta.setdefault("max_length", 512)
    meta.setdefault("sample_texts", [])
    return meta


def check_safetensors(path: Path) -> None:
    """Fail cleanly on a truncated or corrupted weights file before peft tries to use it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:
        raise ExportError(f"{path}: cannot read adapter weights ({e}); the file is corrupted or not safetensors") from e


def torch_logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes_token_types = "token_type_ids" in inspect.signature(base.forward).parameters
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            if "token_type_ids" in enc and not takes_token_types:
                del enc["token_type_ids"]
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def merge(adapter_dir: Path, meta: dict[str, Any], base_model: str, out_dir: Path, texts: list[str], atol: float, trust_remote_code: bool) -> dict[str, Any]:
    """Base (fp32) + adapter -> merged model dir; proves adapter and merged logits agree."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.modeling import resolve_model_path

    labels = meta["labels"]
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base_model),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            dtype=torch.float32,  # merge in fp32 whatever precision trained the adapter
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:  # missing dir, bad hub id, unreachable hub
        raise ExportError(f"base model {base_model!r} of {adapter_dir} cannot be loaded: {e}. Pass --base-model PATH") from e
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as e:
        raise ExportError(f"{adapter_dir}: cannot apply the adapter to {base_model}: {e}") from e
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    adapter_logits = torch_logits(model, tokenizer, texts, meta["max_length"])
    merged = model.merge_and_unload()
    merged.eval()
    leftover = [k for k in merged.state_dict() if "lora_" in k or "modules_to_save" in k]
    if leftover:
        raise ExportError(f"merge left adapter layers behind: {leftover[:3]}")
    merged_logits = torch_logits(merged, tokenizer, texts, meta["max_length"])
    diff = float(np.abs(adapter_logits - merged_logits).max())
    if diff > atol or not np.array_equal(adapter_logits.argmax(-1), merged_logits.argmax(-1)):
        raise ExportError(f"merge parity failed: adapter vs merged max abs logit diff {diff:.2e} > {atol:g}")
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {n: i for i, n in enumerate(labels)}
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"rows": len(texts), "max_abs_diff": diff}


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


def validate_onnx(onnx_dir: Path, variant: str, merged: Any, tokenizer: Any, texts: list[str], max_length: int, threads: int) -> dict[str, Any]:
    """ORT vs PyTorch logits at batch sizes 1 and 8, at a short and the full max_length, padding in the batch."""
    from serve_cli.runtime import OnnxClassifier

    results = []
    ordered = sorted(texts, key=len)
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


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def auto_quantization() -> str:
    """The measured-fastest accurate method for this CPU (see benchmarks/quantization.py and the README)."""
    # Measured on AVX-512 VNNI x86 (AG News, MiniLM): quantize_dynamic on the plain graph ran 356 rows/s,
    # optimum avx512_vnni 340, the fused graph 317, optimum avx2 179, fp32 205, all within 0.1 point.
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "optimum-arm64"
    return "ort-dynamic"


def quantize(onnx_dir: Path, method: str, model_type: str, num_heads: int, hidden_size: int) -> None:
    """Write onnx_dir/model_quantized.onnx from onnx_dir/model.onnx with dynamic int8 quantization."""
    src = onnx_dir / "model.onnx"
    dst = onnx_dir / INT8_FILE
    if method in ("ort-dynamic", "ort-dynamic-fused"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = src
        with tempfile.TemporaryDirectory() as tmp:
            if method == "ort-dynamic-fused":
                # Fuse attention, LayerNorm and GELU first: fewer, larger int8 kernels.
                from onnxruntime.transformers.optimizer import optimize_model

                opt_type = model_type if model_type in ("bert", "bart", "gpt2") else "bert"
                opt = optimize_model(str(src), model_type=opt_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
                source = Path(tmp) / "fused.onnx"
                opt.save_model_to_file(str(source))
            import onnx

            # Fused com.microsoft ops defeat shape inference; their outputs are float.
            quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    target = method.removeprefix("optimum-")
    qconfig = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=True)
    quantizer = ORTQuantizer.from_pretrained(str(onnx_dir), file_name="model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        out = quantizer.quantize(save_dir=tmp, quantization_config=qconfig)
        shutil.move(str(Path(out) / "model_quantized.onnx"), dst)


def load_eval_file(path: Path, text_field: str, label_field: str, labels: list[str]) -> tuple[list[str], np.ndarray]:
    from trainer.data import DataError, encode_labels, load_rows

    try:
        rows = load_rows(str(path), text_field, label_field)
        y = encode_labels(rows, {n: i for i, n in enumerate(labels)})
    except DataError as e:
        raise ExportError(str(e)) from e
    return rows.texts, np.array(y)


def accuracy_f1(y: np.ndarray, pred: np.ndarray, n_labels: int) -> dict[str, float]:
    from serve_cli.metrics import classification_report

    report = classification_report(y, pred, [str(i) for i in range(n_labels)])
    return {"accuracy": report["accuracy"], "f1_weighted": report["f1_weighted"]}


def onnx_predict(onnx_dir: Path, variant: str, texts: list[str], threads: int) -> np.ndarray:
    """Predictions exactly as `serve_cli` makes them: int8 dynamic quantization picks its activation
    scales per batch, so the batching (size, length sorting) must be serve_cli's for the accuracy
    recorded here to be the one users reproduce with `serve_cli eval`."""
    from serve_cli.__main__ import DEFAULT_BATCH_SIZE, predict_in_order
    from serve_cli.io import Row
    from serve_cli.runtime import OnnxClassifier

    clf = OnnxClassifier(onnx_dir, variant=variant, threads=threads or None)
    rows = (Row(i, i, t) for i, t in enumerate(texts))
    return np.array([int(p.argmax()) for _, p in predict_in_order(clf, rows, DEFAULT_BATCH_SIZE)])


def fingerprint(adapter_dir: Path, base_model: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "adapter_sha256": sha256(adapter_dir / "adapter_model.safetensors"),
        "adapter_config_sha256": sha256(adapter_dir / "adapter_config.json"),
        "base_model": base_model,
        "opset": args.opset,
        "quantization": args.quantization,
        "eval_file": str(args.eval_file.resolve()) if args.eval_file else None,
        "max_int8_drop": args.max_int8_drop,
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.run is not None:
        if not args.run.is_dir():
            raise ExportError(f"{args.run}: run dir not found")
        adapter_dir = args.run / "adapter"
        root = args.run
    else:
        adapter_dir = args.adapter
        root = args.adapter.parent
    meta = read_adapter(adapter_dir)
    base_model = args.base_model or meta["base_model"]
    merged_dir = args.merged_dir or root / "merged"
    onnx_dir = args.output or root / "onnx"
    fp = fingerprint(adapter_dir, base_model, args)

    if onnx_dir.exists() and not args.force:
        old = json.loads((onnx_dir / REPORT).read_text()) if (onnx_dir / REPORT).is_file() else {}
        if old.get("inputs") == fp:
            print(f"{onnx_dir}: up to date (same adapter and options); --force rebuilds it")
            return 0
        raise ExportError(f"{onnx_dir}: exists and was built from other inputs; pass --force to replace it or choose --output")

    texts = list(meta["sample_texts"])
    eval_data = None
    if args.eval_file:
        eval_data = load_eval_file(args.eval_file, args.text_field or meta.get("text_field", "text"),
                                   args.label_field or meta.get("label_field", "label"), meta["labels"])
        texts = texts or eval_data[0][:32]
    if len(texts) < 2:
        raise ExportError(f"{adapter_dir}: no sample texts for the parity checks; pass --eval-file with real texts")

    # --- 1. merge (reused if the merged dir was built from this adapter)
    report: dict[str, Any] = {"inputs": fp, "source": {"adapter": str(adapter_dir), "run": str(args.run) if args.run else None}}
    merged_stamp = merged_dir / "loraship_merge.json"
    merge_inputs = {k: fp[k] for k in ("adapter_sha256", "adapter_config_sha256", "base_model")}
    t0 = time.perf_counter()
    if merged_dir.exists() and not args.force and merged_stamp.is_file() and json.loads(merged_stamp.read_text()).get("inputs") == merge_inputs:
        report["merge"] = json.loads(merged_stamp.read_text())["merge"] | {"reused": True}
        print(f"merge: reusing {merged_dir}")
    else:
        if merged_dir.exists() and not args.force:
            raise ExportError(f"{merged_dir}: exists and was not built from this adapter; pass --force or --merged-dir")
        tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=merged_dir.parent if merged_dir.parent.exists() else None))
        try:
            report["merge"] = merge(adapter_dir, meta, base_model, tmp, texts, args.atol, args.trust_remote_code)
            (tmp / "loraship_merge.json").write_text(json.dumps({"inputs": merge_inputs, "merge": report["merge"], "meta": {k: v for k, v in meta.items() if k != "sample_texts"}}, indent=2))
            shutil.rmtree(merged_dir, ignore_errors=True)
            merged_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp), merged_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"merge: {merged_dir} (adapter vs merged max abs diff {report['merge']['max_abs_diff']:.2e})")
    report["merge"]["seconds"] = time.perf_counter() - t0

    # --- 2-6. export, validate, quantize, gate: all inside a temp dir renamed at the end
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    onnx_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-", dir=onnx_dir.parent))
    try:
        t0 = time.perf_counter()
        export_onnx(merged_dir, tmp, args.opset, args.trust_remote_code)
        report["export_seconds"] = time.perf_counter() - t0
        report["max_length"] = meta["max_length"]
        # serve_cli reads max_length and the default variant from the report; write a partial one now.
        (tmp / REPORT).write_text(json.dumps({"max_length": meta["max_length"], "default_variant": "fp32"}))
        parity = validate_onnx(tmp, "fp32", merged, tokenizer, texts, meta["max_length"], args.threads)
        report["parity_fp32"] = parity
        if parity["max_abs_diff"] > args.atol or parity["min_argmax_agree"] < 1.0:
            raise ExportError(f"ONNX fp32 parity failed: max abs logit diff {parity['max_abs_diff']:.2e} > {args.atol:g} (cases: {parity['cases']})")
        print(f"onnx fp32: parity max abs diff {parity['max_abs_diff']:.2e} over {len(parity['cases'])} shapes")

        method = auto_quantization() if args.quantization == "auto" else args.quantization
        t0 = time.perf_counter()
        cfg = merged.config
        quantize(tmp, method, cfg.model_type, getattr(cfg, "num_attention_heads", getattr(cfg, "n_heads", 0)),
                 getattr(cfg, "hidden_size", getattr(cfg, "dim", 0)))
        report["quantization"] = {"method": method, "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "asimd"))), "seconds": time.perf_counter() - t0}
        int8_parity = validate_onnx(tmp, "int8", merged, tokenizer, texts, meta["max_length"], args.threads)
        report["parity_int8"] = int8_parity
        print(f"onnx int8 ({method}): max abs diff {int8_parity['max_abs_diff']:.3f}, argmax agreement >= {int8_parity['min_argmax_agree']:.2f}")

        default_variant = "int8"
        if eval_data is not None:
            eval_texts, y = eval_data
            gate: dict[str, Any] = {"file": str(args.eval_file), "rows": len(y)}
            pred = np.concatenate([torch_logits(merged, tokenizer, eval_texts[i : i + 64], meta["max_length"], 64).argmax(-1) for i in range(0, len(eval_texts), 64)])
            gate["merged"] = accuracy_f1(y, pred, len(meta["labels"]))
            for variant in ("fp32", "int8"):
                gate[f"onnx_{variant}"] = accuracy_f1(y, onnx_predict(tmp, variant, eval_texts, args.threads), len(meta["labels"]))
            drop = 100 * (gate["onnx_fp32"]["accuracy"] - gate["onnx_int8"]["accuracy"])
            gate["int8_drop_points"] = drop
            gate["max_int8_drop_points"] = args.max_int8_drop
            if drop > args.max_int8_drop:
                default_variant = "fp32"
                gate["verdict"] = f"int8 loses {drop:.2f} points > {args.max_int8_drop}: fp32 is the default"
            else:
                gate["verdict"] = f"int8 within {args.max_int8_drop} points ({drop:+.2f}): int8 is the default"
            report["gate"] = gate
            print("gate: " + ", ".join(f"{k} acc {gate[k]['accuracy']:.4f}" for k in ("merged", "onnx_fp32", "onnx_int8")) + f"; {gate['verdict']}")
        elif int8_parity["min_argmax_agree"] < 0.75:
            default_variant = "fp32"
        report["default_variant"] = default_variant
        report["variants"] = {
            v: {"file": f, "bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
            for v, f in (("fp32", "model.onnx"), ("int8", INT8_FILE))
        }
        report["opset"] = args.opset
        report["versions"] = versions()
        report["labels"] = meta["labels"]
        report["training_config"] = meta.get("config")
        report["total_seconds"] = time.perf_counter() - start
        (tmp / REPORT).write_text(json.dumps(report, indent=2))
        if onnx_dir.exists():
            shutil.rmtree(onnx_dir)
        tmp.rename(onnx_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {onnx_dir} (default variant {report['default_variant']}) in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
