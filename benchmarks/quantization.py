"""Int8 choices for the export on this CPU: rows/s and accuracy of each quantization method.

    python benchmarks/quantization.py [--run runs/agnews_minilm] [--reps 3]
    python benchmarks/quantization.py --tasks agnews=runs/agnews_minilm:agnews:label \
        trec=runs/trec_coarse:trec:label trec_fine=runs/trec_fine:trec:fine_label

Without --tasks: the dynamic methods of `--quantization` (below). With --tasks: the export's accuracy-aware
int8 candidates (export/int8_search.py) on each task's run: the search's criterion (validation accuracy,
expected drops; what chooses), test accuracy, rows/s (median of --reps interleaved passes over the first
--speed-rows test rows) of every candidate, and how much each depends on batching: the same test texts
predicted in serve_cli's length-sorted batches and in random batches of 32, argmax flips per 10,000 rows.
Saves benchmarks/results/int8_candidates.json.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, save, table


def throughput(onnx_dir: Path, variant: str, texts: list[str], truth: list[str]) -> tuple[float, float]:
    """Rows/s and accuracy through serve_cli's own batching (length-sorted windows, batch 32)."""
    from serve_cli.runtime import OnnxClassifier

    clf = OnnxClassifier(onnx_dir, variant=variant)
    rows_per_second, pred = timed_argmax(clf, texts)
    return rows_per_second, sum(clf.labels[p] == t for p, t in zip(pred, truth, strict=True)) / len(texts)


def random_batches(clf: object, texts: list[str], seed: int = 0, batch: int = 32) -> np.ndarray:
    """Argmax per text when each batch holds 32 random other texts (as a server mixing requests)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    out = np.zeros(len(texts), dtype=np.int64)
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        out[idx] = clf.logits([texts[i] for i in idx]).argmax(-1)  # type: ignore[attr-defined]
    return out


def timed_argmax(clf: object, texts: list[str]) -> tuple[float, list[int]]:
    """Rows/s of serve_cli's batching (length-sorted windows, batch 32) on an open session, and the argmax per text."""
    from serve_cli.runtime import proba_in_order

    t0 = time.perf_counter()
    pred = proba_in_order(clf, texts).argmax(-1).tolist()  # type: ignore[arg-type]
    return len(texts) / (time.perf_counter() - t0), pred


def candidates_on_task(name: str, run: Path, data: Path, label_field: str, test_rows: int, reps: int, speed_rows: int) -> dict[str, object]:
    """The export's search (every candidate measured) on the run's selection rows, then each candidate on the
    test split: accuracy, flips between batchings, and rows/s (median of `reps` interleaved passes)."""
    from export.gate import load_eval_file, onnx_predict
    from export.int8_search import search
    from serve_cli.runtime import OnnxClassifier

    labels = json.loads((run / "adapter" / "loraship.json").read_text())["labels"]
    validation = load_eval_file(run / "validation.jsonl", "text", "label", labels)
    test_texts, test_y = load_eval_file(data / "test.jsonl", "text", label_field, labels)
    if test_rows:
        test_texts, test_y = test_texts[:test_rows], test_y[:test_rows]
    calibration = [json.loads(x)["text"] for x in (run / "calibration.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "onnx"
        shutil.copytree(run / "onnx", d)
        saved = Path(tmp) / "candidates"
        saved.mkdir()
        found = search(d, validation, calibration, 0.3, 0, try_all=True, save_candidates=saved)
        dirs = {"fp32": (d, "fp32")}
        for c in found["candidates"]:  # one dir per candidate: every session stays open for the interleaved timing
            dirs[c["name"]] = (Path(tmp) / c["name"], "int8")
            shutil.copytree(d, dirs[c["name"]][0])
            shutil.copy(saved / f"{c['name']}.onnx", dirs[c["name"]][0] / "model_quantized.onnx")
        rows = []
        for variant, (vd, v) in dirs.items():
            pred = onnx_predict(vd, v, test_texts, 0)
            few = slice(0, 2000)
            flips = float((random_batches(OnnxClassifier(vd, variant=v), test_texts[few]) != pred[few]).mean() * 10_000)
            cand = next((c for c in found["candidates"] if c["name"] == variant), {})
            rows.append({"name": variant, "validation_accuracy": cand.get("accuracy", found["fp32"]["accuracy"]),
                         **{k: cand.get(k) for k in ("expected_drop_points", "unlabelled_expected_drop_points", "agreement", "exclude", "why")},
                         "test_accuracy": float((pred == test_y).mean()), "flips_per_10k_rows": flips, "chosen": bool(cand.get("chosen"))})
        clfs = {k: OnnxClassifier(vd, variant=v) for k, (vd, v) in dirs.items()}
        runs: dict[str, list[float]] = {k: [] for k in clfs}
        for _ in range(reps):
            for k, clf in clfs.items():
                runs[k].append(timed_argmax(clf, test_texts[:speed_rows])[0])
        for r in rows:
            r["rows_per_second"], r["runs"] = median(runs[r["name"]]), runs[r["name"]]
            r["x_fp32"] = r["rows_per_second"] / rows[0]["rows_per_second"]
            r["test_drop_points"] = 100 * (rows[0]["test_accuracy"] - r["test_accuracy"])
            print(f"{name} {r['name']}: val {r['validation_accuracy']:.4f} test {r['test_accuracy']:.4f} ({r['test_drop_points']:+.2f}) "
                  f"{r['rows_per_second']:.0f} rows/s ({r['x_fp32']:.2f}x), {r['flips_per_10k_rows']:.1f} flips/10k"
                  + (" <- chosen" if r["chosen"] else ""), flush=True)
    return {"task": name, "labels": len(labels), "validation_rows": len(validation[1]), "unlabelled_rows": found["unlabelled_rows"],
            "test_rows": len(test_y), "speed_rows": min(speed_rows, len(test_y)), "chosen": found["chosen"],
            "search_seconds": found["seconds"], "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "agnews_minilm")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tasks", nargs="+", metavar="NAME=RUN:DATA:LABEL_FIELD", help="int8 candidates per task (DATA: a dir in ../shared/data)")
    p.add_argument("--test-rows", type=int, default=0, help="with --tasks: only the first N test rows (0 = all)")
    p.add_argument("--speed-rows", type=int, default=1000, help="with --tasks: rows/s on the first N test rows, median of --reps")
    args = p.parse_args()
    if args.tasks:
        sys.path.insert(0, str(REPO))
        out = []
        for spec in args.tasks:
            name, _, rest = spec.partition("=")
            run, data, field = rest.split(":")
            out.append(candidates_on_task(name, REPO / run, data_dir().parent / data, field, args.test_rows, args.reps, args.speed_rows))
        save("int8_candidates", {"benchmark": "int8_candidates", "machine": machine(), "tasks": out,
                                 "command": f"python benchmarks/quantization.py --reps {args.reps} --speed-rows {args.speed_rows} --test-rows "
                                 f"{args.test_rows} --tasks " + " ".join(args.tasks)})
        return 0
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
