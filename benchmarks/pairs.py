"""SICK (sentence pairs): entailment (3 classes) and relatedness (regression, 1-5) with the default recipe,
end to end, and the same outputs on every path.

    python benchmarks/pairs.py            # train each task if its run dir has no summary
    python benchmarks/pairs.py --train    # train again (defaults and data paths only)

Saves benchmarks/results/pairs.json, per task: training time and machine, the test metrics of the trained
model (PyTorch) and of ONNX fp32 and the int8 default (chosen on validation), int8 vs fp32 rows/s
(serve_cli's batching, interleaved, median of 3), and for every test pair the share whose output (label, or
score within 1e-5) is equal through `serve_cli predict`, HTTP (TEI pair shapes, a running `serve_cli serve`)
and `--engine ray`, for fp32 and for the default variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine, run, save
from benchmarks.multilabel import speed

TASKS = {"entailment": ("sick_entailment", "entailment_judgment"), "relatedness": ("sick_relatedness", "relatedness_score")}


def data_dir() -> Path:
    d = Path(os.environ.get("LORASHIP_DATA_DIR", REPO.parent / "shared" / "data" / "sick"))
    if not (d / "test.jsonl").is_file():
        sys.exit(f"error: SICK not found in {d}; set LORASHIP_DATA_DIR")
    return d


def outputs(rows: list[dict[str, Any]]) -> list[Any]:
    """The label of each row, or its score (regression)."""
    return [r.get("label", r.get("score")) for r in rows]


def predict_file(onnx: Path, variant: str, src: Path, out: Path) -> list[Any]:
    run([sys.executable, "-m", "serve_cli", "predict", "--model", str(onnx), "--variant", variant, "--input", str(src),
         "--output", str(out), "--overwrite", "--quiet"])
    return outputs([json.loads(x) for x in out.read_text().splitlines()])


def predict_ray(onnx: Path, variant: str, src: Path, out: Path) -> list[Any]:
    run([sys.executable, "-m", "serve_cli", "predict", "--engine", "ray", "--model", str(onnx), "--variant", variant,
         "--input", str(src), "--output", str(out), "--overwrite", "--quiet", "--output-format", "jsonl"],
        env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    rows = [json.loads(x) for p in sorted((out / "predictions").glob("*.json*")) for x in p.read_text().splitlines()]
    return outputs(sorted(rows, key=lambda r: r["row"]))


def predict_http(onnx: Path, variant: str, pairs: list[tuple[str, str]], regression: bool) -> list[Any]:
    import httpx

    from tests.test_http import Server

    server = Server(onnx, "--variant", variant)
    try:
        out: list[Any] = []
        with httpx.Client(timeout=60) as client:
            for b in range(0, len(pairs), 32):  # TEI's batch of pairs, 32 per request
                body = client.post(f"{server.url}/predict", json={"inputs": [list(p) for p in pairs[b : b + 32]]}).json()
                out += [row[0]["score"] if regression else row[0]["label"] for row in body]
        return out
    finally:
        server.stop()


def equal(a: list[Any], b: list[Any]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    same = [abs(x - y) <= 1e-5 if isinstance(x, float) else x == y for x, y in zip(a, b, strict=True)]
    return sum(same) / len(a)


def one_task(name: str, data: Path, retrain: bool) -> dict[str, Any]:
    config, field = TASKS[name]
    run_dir = REPO / "runs" / config
    train_wall = None
    if retrain or not (run_dir / "summary.json").is_file():
        train_wall, _ = run([sys.executable, "trainer/train.py", "--config", f"configs/{config}.yaml", f"output.run_dir={run_dir}",
                             "output.overwrite=true"])
    export_wall, _ = run([sys.executable, "-m", "export.to_onnx", "--run", str(run_dir), "--eval-file", str(data / "test.jsonl"), "--force"])
    summary = json.loads((run_dir / "summary.json").read_text())
    onnx = run_dir / "onnx"
    report = json.loads((onnx / "export_report.json").read_text())
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    pairs = [(r["sentence_A"], r["sentence_B"]) for r in rows]
    regression = summary["task"] == "regression"
    metric = report["eval_file"]["metric"]
    result: dict[str, Any] = {
        "config": f"configs/{config}.yaml", "label_field": field, "task": summary["task"], "task_why": summary["task_why"],
        "metric": metric,
        "training": {"seconds_wall": train_wall, "loop_seconds": summary["train_seconds"], "steps": summary["steps"],
                     "best_step": summary["best_step"], "mixed_precision": summary["mixed_precision"], "recipe": summary["recipe"]},
        "test_torch": {k[5:]: v for k, v in summary.items() if k.startswith("test_")},
        "test_onnx": {v: report["eval_file"][f"onnx_{v}"] for v in ("fp32", "int8")},
        "int8_minus_fp32": report["eval_file"]["onnx_int8"][metric] - report["eval_file"]["onnx_fp32"][metric],
        "default_variant": report["default_variant"],
        "int8_chosen": report["int8_search"]["chosen"],
        "int8_verdict": report["int8_search"]["verdict"],
        "export_seconds_wall": export_wall,
        "rows_per_second": speed(onnx, pairs),
    }
    if regression:
        result["target"] = summary["target"]
    result["int8_speedup"] = result["rows_per_second"]["int8"] / result["rows_per_second"]["fp32"]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        paths: dict[str, Any] = {}
        for variant in sorted({"fp32", report["default_variant"]}):
            local = predict_file(onnx, variant, data / "test.jsonl", tmp / f"{variant}.jsonl")
            http = predict_http(onnx, variant, pairs, regression)
            ray = predict_ray(onnx, variant, data / "test.jsonl", tmp / f"ray-{variant}")
            paths[variant] = {"rows": len(local), "http_equal": equal(local, http), "ray_equal": equal(local, ray)}
        result["same_outputs"] = paths
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="train again even if the run dirs have a summary")
    p.add_argument("--task", choices=sorted(TASKS), action="append", help="only these tasks (default: both)")
    args = p.parse_args(argv)
    data = data_dir()
    result: dict[str, Any] = {"machine": machine(), "data": {"train": 4500, "validation": 500, "test": 4927}}
    for name in args.task or sorted(TASKS):
        result[name] = one_task(name, data, args.train)
        r = result[name]
        print(json.dumps({name: {k: r[k] for k in ("test_onnx", "int8_minus_fp32", "default_variant", "int8_speedup", "same_outputs")}},
                         indent=2))
    save("pairs", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
