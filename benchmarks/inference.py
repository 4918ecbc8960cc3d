"""Inference on the 7,600-row AG News test split, end to end from file to predictions.

    python benchmarks/inference.py [--run runs/agnews_minilm] [--reps 3] [--torch-reps 1]

Each figure is the wall time of a whole process (start, imports, model load, read file, predict, write),
median over runs, all on this machine in one invocation:
- HF pipeline("text-classification") on the merged PyTorch model, fp32, batch 32 (what a user would do);
- the merged PyTorch model with bf16 autocast, batch 32;
- `serve_cli predict` with ONNX fp32 and with ONNX int8.
Also: p50/p95 latency at batch 1 for the ONNX variants (in process, 300 texts), size on disk, accuracy,
and the cold start of `serve_cli predict` on a 10-row file. Saves benchmarks/results/inference.json.

    python benchmarks/inference.py --ray [--ray-rows 200000]

The Ray engine instead (results/inference_ray.json): `serve_cli predict` (local, all cores) against
`serve_cli predict --engine ray` on a local 2-CPU Ray cluster with 1 and 2 single-thread actors, on the
7,600 test texts and on --ray-rows rows (the test texts repeated, as Parquet), default variant, whole
process wall time (Ray: cluster start included, reported apart), median of --reps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, data_dir, machine, median, run, save, table


def worker_torch(kind: str, merged: Path, test_file: Path, out: Path) -> None:
    """pipeline fp32 or bf16 autocast; writes one predicted label per line."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts = [json.loads(x)["text"] for x in test_file.read_text().splitlines()]
    if kind == "pipeline":
        clf = pipeline("text-classification", model=str(merged), tokenizer=str(merged), device=-1, batch_size=32)
        labels = [r["label"] for r in clf(texts, truncation=True, max_length=128)]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
        tok = AutoTokenizer.from_pretrained(str(merged))
        labels = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(0, len(texts), 32):
                enc = tok(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                labels += [model.config.id2label[int(j)] for j in model(**enc).logits.argmax(-1)]
    out.write_text("\n".join(labels) + "\n")


def latency(onnx_dir: Path, variant: str, texts: list[str]) -> dict[str, float]:
    from serve_cli.runtime import OnnxClassifier

    clf = OnnxClassifier(onnx_dir, variant=variant)
    for t in texts[:10]:
        clf.logits([t])
    times = []
    for t in texts:
        t0 = time.perf_counter()
        clf.logits([t])
        times.append(1000 * (time.perf_counter() - t0))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def ray_engine(args: argparse.Namespace, test_file: Path, onnx_dir: Path) -> int:
    """Local vs Ray engine, same export and rows; results/inference_ray.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    serve = str(Path(sys.executable).with_name("serve_cli"))
    texts = [json.loads(x)["text"] for x in test_file.read_text().splitlines()]
    results = []
    agreement: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for rows in ((args.ray_rows,) if args.ray_big_only else (len(texts), args.ray_rows)):
            repeated = [texts[i % len(texts)] for i in range(rows)]
            jsonl, parquet = tmp / f"in-{rows}.jsonl", tmp / f"in-{rows}"
            jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(repeated)))
            parquet.mkdir()
            for k in range(4):  # 4 files, as a dataset usually comes
                part = range(k * rows // 4, (k + 1) * rows // 4)
                pq.write_table(pa.table({"id": list(part), "text": [repeated[i] for i in part]}), parquet / f"part-{k}.parquet")
            setups = {
                "local (serve_cli predict, 2 threads)": [serve, "predict", "--model", str(onnx_dir), "--input", str(jsonl),
                                                         "--output", str(tmp / "out.jsonl"), "--overwrite", "--quiet", "--id-field", "id"],
            }
            for actors in (1, 2):
                setups[f"ray, {actors} actor{'s' if actors > 1 else ''} x 1 thread"] = [
                    serve, "predict", "--engine", "ray", "--model", str(onnx_dir), "--input", str(parquet), "--output",
                    str(tmp / "out"), "--overwrite", "--quiet", "--actors", str(actors), "--threads-per-actor", "1", "--id-field", "id"]
            walls: dict[str, list[float]] = {k: [] for k in setups}
            job_seconds: dict[str, list[float]] = {k: [] for k in setups}
            for rep in range(args.reps):
                for name, cmd in setups.items():
                    if rows > len(texts) and (rep > 0 or "1 actor" in name):
                        continue  # the big input: one run each of local and 2 actors (actor scaling: on the small one)
                    wall, _ = run(cmd, env={"RAY_USAGE_STATS_ENABLED": "0"})
                    walls[name].append(wall)
                    if "ray" in name:
                        job_seconds[name].append(json.loads((tmp / "out" / "summary.json").read_text())["seconds"])
                        if rep == 0 and "2 actors" in name:
                            ray_labels = {r["id"]: r["label"] for f in sorted((tmp / "out" / "predictions").glob("*.parquet"))
                                          for r in pq.read_table(f, columns=["id", "label"]).to_pylist()}
                            local_labels = {str(r["id"]): r["label"] for r in map(json.loads, (tmp / "out.jsonl").read_text().splitlines())}
                            agreement[rows] = sum(ray_labels[k] == v for k, v in local_labels.items()) / len(local_labels)
                            print(f"{rows} rows: ray labels equal to local on {100 * agreement[rows]:.2f}% of rows", flush=True)
                    print(f"{rows} rows, rep {rep + 1}, {name}: {rows / wall:.0f} rows/s", flush=True)
            local = rows / median(walls["local (serve_cli predict, 2 threads)"])
            for name in (k for k in setups if walls[k]):
                rps = rows / median(walls[name])
                results.append({"rows": rows, "name": name, "rows_per_second": rps, "ratio_vs_local": rps / local,
                                "runs_seconds": walls[name], "ray_job_seconds": job_seconds[name] or None})
    command = f"python benchmarks/inference.py --ray --ray-rows {args.ray_rows} --reps {args.reps}"
    saved = RESULTS / "inference_ray.json"
    if args.ray_big_only and saved.is_file():
        old = json.loads(saved.read_text())
        results = [r for r in old["rows"] if r["rows"] != args.ray_rows] + results
        agreement = {**{int(k): v for k, v in old.get("label_agreement_ray_vs_local", {}).items()}, **agreement}
        command = f"{old['command']}; then {command} --ray-big-only"
    print(table(["rows", "setup", "rows/s", "x local"],
                [[r["rows"], r["name"], f"{r['rows_per_second']:.0f}", f"{r['ratio_vs_local']:.2f}"] for r in results]))
    save("inference_ray", {"benchmark": "inference_ray", "machine": machine(), "rows": results,
                           "label_agreement_ray_vs_local": {str(k): v for k, v in agreement.items()},
                           "command": command})
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "agnews_minilm")
    p.add_argument("--reps", type=int, default=3, help="runs of each serve_cli variant")
    p.add_argument("--torch-reps", type=int, default=1, help="runs of each PyTorch variant (slow)")
    p.add_argument("--ray", action="store_true", help="benchmark the Ray engine against the local one instead")
    p.add_argument("--ray-rows", type=int, default=200_000, help="rows of the big Ray input (the test texts repeated)")
    p.add_argument("--ray-big-only", action="store_true",
                   help="measure only --ray-rows (local and 2 actors, one run each) and keep the other sizes of the saved result")
    p.add_argument("--worker", choices=["pipeline", "bf16"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    data = data_dir()
    test_file = data / "test.jsonl"
    merged, onnx_dir = args.run / "merged", args.run / "onnx"
    if args.worker:
        worker_torch(args.worker, merged, test_file, args.out)
        return 0
    if not (onnx_dir / "export_report.json").is_file():
        sys.exit(f"error: {onnx_dir} missing; run scripts/main_job.sh (or train + python -m export.to_onnx) first")
    if args.ray:
        return ray_engine(args, test_file, onnx_dir)
    truth = [json.loads(x)["label"] for x in test_file.read_text().splitlines()]
    texts = [json.loads(x)["text"] for x in test_file.read_text().splitlines()]
    n = len(truth)
    serve = str(Path(sys.executable).with_name("serve_cli"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        variants = {
            "HF pipeline, PyTorch fp32, batch 32": ("torch", [sys.executable, "benchmarks/inference.py", "--worker", "pipeline", "--run", str(args.run), "--out", str(out)]),
            "PyTorch bf16 autocast, batch 32": ("torch", [sys.executable, "benchmarks/inference.py", "--worker", "bf16", "--run", str(args.run), "--out", str(out)]),
            "serve_cli predict, ONNX fp32": ("serve", [serve, "predict", "--model", str(onnx_dir), "--variant", "fp32", "--input", str(test_file), "--output", str(out), "--overwrite", "--quiet"]),
            "serve_cli predict, ONNX int8": ("serve", [serve, "predict", "--model", str(onnx_dir), "--variant", "int8", "--input", str(test_file), "--output", str(out), "--overwrite", "--quiet"]),
        }
        walls: dict[str, list[float]] = {k: [] for k in variants}
        accuracy: dict[str, float] = {}
        for rep in range(max(args.reps, args.torch_reps)):
            for name, (kind, cmd) in variants.items():
                if rep >= (args.torch_reps if kind == "torch" else args.reps):
                    continue
                wall, _ = run(cmd)
                walls[name].append(wall)
                lines = out.read_text().splitlines()
                pred = lines if kind == "torch" else [json.loads(x)["label"] for x in lines]
                accuracy[name] = sum(a == b for a, b in zip(pred, truth, strict=True)) / n
                print(f"rep {rep + 1} {name}: {n / wall:.0f} rows/s, accuracy {accuracy[name]:.4f}", flush=True)
        ten = Path(tmp) / "ten.jsonl"
        ten.write_text("".join(x + "\n" for x in test_file.read_text().splitlines()[:10]))
        cold = [run([serve, "predict", "--model", str(onnx_dir), "--input", str(ten), "--output", str(out), "--overwrite", "--quiet"])[0] for _ in range(5)]

    sys.path.insert(0, str(REPO))
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(n, 300, replace=False)]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lat = {"fp32": latency(onnx_dir, "fp32", sample), "int8": latency(onnx_dir, "int8", sample)}
    size = {"torch": (merged / "model.safetensors").stat().st_size, "fp32": (onnx_dir / "model.onnx").stat().st_size,
            "int8": (onnx_dir / "model_quantized.onnx").stat().st_size}
    pipeline_rps = n / median(walls["HF pipeline, PyTorch fp32, batch 32"])
    rows = []
    for name, ws in walls.items():
        key = "int8" if "int8" in name else "fp32" if "ONNX fp32" in name else "torch"
        rps = n / median(ws)
        rows.append({"name": name, "rows_per_second": rps, "ratio_vs_pipeline": rps / pipeline_rps, "accuracy": accuracy[name],
                     "size_mb": size[key] / 1e6, "runs_seconds": ws, **(lat[key] if key in lat else {})})
    result = {"benchmark": "inference", "machine": machine(), "rows": rows, "test_rows": n,
              "cold_start_seconds": median(cold), "cold_start_runs": cold,
              "command": f"python benchmarks/inference.py --run {args.run.relative_to(REPO) if args.run.is_relative_to(REPO) else args.run} --reps {args.reps} --torch-reps {args.torch_reps}"}
    print(table(["setup", "rows/s", "x pipeline", "accuracy", "p50 ms", "p95 ms", "MB"],
                [[r["name"], f"{r['rows_per_second']:.0f}", f"{r['ratio_vs_pipeline']:.2f}", f"{r['accuracy']:.4f}",
                  f"{r.get('p50_ms', float('nan')):.1f}", f"{r.get('p95_ms', float('nan')):.1f}", f"{r['size_mb']:.1f}"] for r in rows]))
    print(f"cold start, serve_cli predict on 10 rows: {result['cold_start_seconds']:.2f}s")
    save("inference", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
