"""GoEmotions (multi-label, 28 labels): the default recipe end to end, and the same labels on every path.

    python benchmarks/multilabel.py            # train with configs/goemotions.yaml if runs/goemotions has no summary
    python benchmarks/multilabel.py --train    # train again (defaults and data paths only)

Saves benchmarks/results/multilabel.json: training time and machine, test macro/micro F1 of the trained model
(PyTorch, thresholds chosen on validation) and of ONNX fp32 and the int8 default (chosen on validation),
int8 vs fp32 rows/s (serve_cli's batching, interleaved, median of 3), and for the first 2,000 test rows the
share of rows whose labels are equal through `serve_cli predict`, HTTP (a running `serve_cli serve`) and
`--engine ray`, for fp32 and for the default variant.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine, median, run, save

CONFIG = REPO / "configs" / "goemotions.yaml"


def data_dir() -> Path:
    d = Path(os.environ.get("LORASHIP_DATA_DIR", REPO.parent / "shared" / "data" / "goemotions"))
    if not (d / "test.jsonl").is_file():
        sys.exit(f"error: GoEmotions not found in {d}; set LORASHIP_DATA_DIR")
    return d


def train(run_dir: Path) -> float:
    wall, _ = run([sys.executable, "trainer/train.py", "--config", str(CONFIG), f"output.run_dir={run_dir}", "output.overwrite=true"])
    return wall


def predict_file(onnx: Path, variant: str, src: Path, out: Path, *extra: str) -> list[list[str]]:
    run([sys.executable, "-m", "serve_cli", "predict", "--model", str(onnx), "--variant", variant, "--input", str(src),
         "--output", str(out), "--overwrite", "--quiet", *extra])
    return [sorted(json.loads(x)["labels"]) for x in out.read_text().splitlines()]


def predict_ray(onnx: Path, variant: str, src: Path, out: Path) -> list[list[str]]:
    run([sys.executable, "-m", "serve_cli", "predict", "--engine", "ray", "--model", str(onnx), "--variant", variant,
         "--input", str(src), "--output", str(out), "--overwrite", "--quiet", "--output-format", "jsonl"],
        env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    rows = [json.loads(x) for p in sorted((out / "predictions").glob("*.json*")) for x in p.read_text().splitlines()]
    return [sorted(json.loads(r["labels"])) for r in sorted(rows, key=lambda r: r["row"])]


def predict_http(onnx: Path, variant: str, texts: list[str]) -> list[list[str]]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "serve_cli", "serve", "--model", str(onnx), "--variant", variant,
                             "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        out: list[list[str]] = []
        with httpx.Client(timeout=60) as client:
            for b in range(0, len(texts), 32):  # the texts as a client sends them: batches of 32
                body = client.post(f"{url}/predict", json={"inputs": texts[b : b + 32]}).json()
                out += [sorted(s["label"] for s in row if s["chosen"]) for row in body]
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def speed(onnx: Path, texts: list[str], reps: int = 3) -> dict[str, float]:
    """Rows/s of fp32 and int8 with serve_cli's batching, interleaved, median of `reps`."""
    from serve_cli.runtime import OnnxClassifier, proba_in_order

    models = {v: OnnxClassifier(onnx, variant=v) for v in ("fp32", "int8")}
    rates: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(reps):
        for v, clf in models.items():
            t0 = time.perf_counter()
            proba_in_order(clf, texts)
            rates[v].append(len(texts) / (time.perf_counter() - t0))
    return {v: median(r) for v, r in rates.items()}


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "goemotions")
    p.add_argument("--train", action="store_true", help="train again even if the run dir has a summary")
    p.add_argument("--rows", type=int, default=2000, help="test rows sent through every path")
    args = p.parse_args(argv)
    data = data_dir()
    train_wall = None
    if args.train or not (args.run / "summary.json").is_file():
        train_wall = train(args.run)
    export_wall, _ = run([sys.executable, "-m", "export.to_onnx", "--run", str(args.run), "--eval-file", str(data / "test.jsonl"), "--force"])
    summary = json.loads((args.run / "summary.json").read_text())
    onnx = args.run / "onnx"
    report = json.loads((onnx / "export_report.json").read_text())
    default = report["default_variant"]
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    result: dict[str, Any] = {
        "machine": machine(),
        "data": {"train": 43410, "validation": 5426, "test": len(rows), "labels": len(summary["labels"])},
        "training": {"seconds_wall": train_wall, "loop_seconds": summary["train_seconds"], "steps": summary["steps"],
                     "best_step": summary["best_step"], "mixed_precision": summary["mixed_precision"], "recipe": summary["recipe"]},
        "thresholds": {"global": summary["thresholds"]["global"], "own_threshold": len(summary["thresholds"]["own_threshold"])},
        "test_torch": {k: summary[f"test_{k}"] for k in ("f1_macro", "f1_micro", "f1_samples", "accuracy")},
        "test_onnx": {v: report["eval_file"][f"onnx_{v}"] for v in ("fp32", "int8")},
        "int8_drop_points": {k: report["eval_file"][f"int8_{k}_drop_points"] for k in ("f1_macro", "f1_micro")},
        "default_variant": default,
        "int8_chosen": report["int8_search"]["chosen"],
        "int8_verdict": report["int8_search"]["verdict"],
        "export_seconds_wall": export_wall,
        "rows_per_second": speed(onnx, texts),
    }
    result["int8_speedup"] = result["rows_per_second"]["int8"] / result["rows_per_second"]["fp32"]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        src = tmp / "rows.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[: args.rows]))
        paths: dict[str, Any] = {}
        for variant in sorted({"fp32", default}):
            local = predict_file(onnx, variant, src, tmp / f"{variant}.jsonl")
            http = predict_http(onnx, variant, texts[: args.rows])
            ray = predict_ray(onnx, variant, src, tmp / f"ray-{variant}")
            paths[variant] = {"rows": len(local), "http_equal": agreement(local, http), "ray_equal": agreement(local, ray)}
        result["same_labels"] = paths
    save("multilabel", result)
    print(json.dumps({k: result[k] for k in ("test_torch", "test_onnx", "int8_drop_points", "default_variant",
                                             "rows_per_second", "same_labels")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
