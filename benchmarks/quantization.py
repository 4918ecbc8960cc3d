"""Int8 choices for the export on this CPU: rows/s and accuracy of each dynamic-quantization method.

    python benchmarks/quantization.py [--run runs/agnews_minilm] [--reps 3]

Quantizes RUN/onnx/model.onnx with every method `python -m export.to_onnx --quantization` offers
(onnxruntime quantize_dynamic on the plain graph, the same after fusing attention/LayerNorm/GELU,
optimum's ORTQuantizer avx512_vnni / avx2 / arm64 configs), then runs each on the AG News test texts in
process (serve_cli's batching: length-sorted windows, batch 32, all cores) next to fp32. The fastest method that keeps accuracy
is what `--quantization auto` picks. Saves benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, save, table


def throughput(onnx_dir: Path, variant: str, texts: list[str], truth: list[str]) -> tuple[float, float]:
    """Rows/s and accuracy through serve_cli's own batching (length-sorted windows, batch 32)."""
    from serve_cli.__main__ import DEFAULT_BATCH_SIZE, predict_in_order
    from serve_cli.io import Row
    from serve_cli.runtime import OnnxClassifier

    clf = OnnxClassifier(onnx_dir, variant=variant)
    t0 = time.perf_counter()
    rows = (Row(i, i, t) for i, t in enumerate(texts))
    pred = [clf.labels[int(p.argmax())] for _, p in predict_in_order(clf, rows, DEFAULT_BATCH_SIZE)]
    seconds = time.perf_counter() - t0
    return len(texts) / seconds, sum(a == b for a, b in zip(pred, truth, strict=True)) / len(texts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "agnews_minilm")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from export.quantize import QUANTIZATION_METHODS, quantize

    rows_in = [json.loads(x) for x in (data_dir() / "test.jsonl").read_text().splitlines()]
    texts, truth = [r["text"] for r in rows_in], [r["label"] for r in rows_in]
    src = args.run / "onnx"
    cfg = json.loads((src / "config.json").read_text())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"fp32 (no quantization)": (src, "fp32")}
        for method in QUANTIZATION_METHODS[1:]:
            d = Path(tmp) / method
            shutil.copytree(src, d)
            (d / "model_quantized.onnx").unlink()
            try:
                t0 = time.perf_counter()
                quantize(d, method, cfg["model_type"], cfg.get("num_attention_heads", 0), cfg.get("hidden_size", 0))
                print(f"{method}: quantized in {time.perf_counter() - t0:.1f}s", flush=True)
                dirs[method] = (d, "int8")
            except Exception as e:  # a method this CPU or graph does not support is reported, not fatal
                print(f"{method}: failed: {e}", flush=True)
                results.append({"name": method, "error": str(e)})
        runs: dict[str, list[float]] = {k: [] for k in dirs}
        acc: dict[str, float] = {}
        for _ in range(args.reps):
            for name, (d, variant) in dirs.items():
                rps, acc[name] = throughput(d, variant, texts, truth)
                runs[name].append(rps)
                print(f"{name}: {rps:.0f} rows/s, accuracy {acc[name]:.4f}", flush=True)
        for name, (d, variant) in dirs.items():
            f = d / ("model_quantized.onnx" if variant == "int8" else "model.onnx")
            results.append({"name": name, "rows_per_second": median(runs[name]), "accuracy": acc[name], "size_mb": f.stat().st_size / 1e6, "runs": runs[name]})
    ok = [r for r in results if "error" not in r]
    print(table(["method", "rows/s", "accuracy", "MB"], [[r["name"], f"{r['rows_per_second']:.0f}", f"{r['accuracy']:.4f}", f"{r['size_mb']:.1f}"] for r in ok]))
    save("quantization", {"benchmark": "quantization", "machine": machine(), "reps": args.reps, "rows": results,
                          "command": f"python benchmarks/quantization.py --reps {args.reps}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
