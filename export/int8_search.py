"""Accuracy-aware int8: try quantization candidates fastest first, keep the first that keeps accuracy.

The criterion is measured on the run's validation rows (never on the test split): a candidate qualifies if
its accuracy is at most --max-int8-drop points (0.3) below ONNX fp32's, predicted with serve_cli's own
batching. Candidates, in the order measured fastest on CPU (benchmarks/quantization.py):

1. `dynamic`: onnxruntime dynamic int8, per-channel weights, every linear layer with a weight (MatMul, Gemm)
   and the embedding tables (activation scales per batch); attention's activation x activation products
   stay fp32;
2. `dynamic-keep-N`: the same with the N most sensitive of those layers kept in fp32;
3. `static`: static QDQ int8, activation ranges calibrated (MinMax) on training texts, per-channel weights;
4. `static-keep-N`: the same with the N most sensitive layers kept in fp32.

Sensitivity (computed only when plain `dynamic` does not qualify): the all-int8 dynamic model and the fp32 model run side by side on calibration texts with
every MatMul/Gemm input and output exposed; a node's score is the relative error its output adds over the
error already in its input (error that comes from upstream is not the node's fault).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.common import INT8_FILE


@dataclass
class Candidate:
    name: str
    method: str  # "dynamic" or "static"
    exclude: list[str] = field(default_factory=list)
    accuracy: float | None = None
    drop_points: float | None = None
    rows_per_second: float | None = None
    bytes: int | None = None
    chosen: bool = False
    why: str = ""


def calibration_feeds(clf: Any, texts: list[str], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    encs = clf.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    return [clf.feed([encs[i] for i in order[b : b + batch_size]]) for b in range(0, len(order), batch_size)]


# The linear layers: MatMul (3-D activations) and Gemm (the 2-D pooler and classifier).
QUANTIZED_OPS = ["MatMul", "Gemm"]


def matmul_nodes(model_path: Path) -> list[Any]:
    """The linear layers with a weight: attention's activation x activation products (QK^T, softmax x V) are
    never quantized (measured: they were the most sensitive layers on TREC, and carry few FLOPs)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type in QUANTIZED_OPS and n.input[1] in weights]


def quantizable(model_path: Path, exclude: list[str]) -> list[str]:
    """Node names to quantize: weight layers not excluded, and the embedding tables (Gather on a weight)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    layers = [n.name for n in matmul_nodes(model_path) if n.name not in exclude]
    # The dynamic quantizer first rewrites a Gemm into "<name>_MatMul" + Add: name both.
    names = [x for name in layers for x in (name, f"{name}_MatMul")]
    return names + [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]


def _session_with_outputs(model_path: Path, names: list[str]) -> Any:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every exposed tensor
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def sensitivity(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """(MatMul node name, added relative error), most sensitive first."""
    nodes = matmul_nodes(fp32_path)
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    ref_sess, q_sess = _session_with_outputs(fp32_path, names), _session_with_outputs(int8_path, names)
    err = {name: [] for name in names}
    for feed in feeds:
        ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feed), strict=True))
        got = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed), strict=True))
        for name in names:
            if name in ref and name in got:
                a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
                err[name].append(float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)))
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in err.items()}
    scores = [(n.name, mean[n.output[0]] - mean[n.input[0]]) for n in nodes]
    return sorted(scores, key=lambda x: -x[1])


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)

    def rewind(self) -> None:  # not needed: each static candidate gets a fresh reader
        pass


def build(src: Path, dst: Path, cand: Candidate, feeds: list[dict[str, np.ndarray]]) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    nodes = quantizable(src, cand.exclude)
    if cand.method == "dynamic":
        # The int8 embedding table (Gather) makes the file a quarter of fp32's (AG News: 23 MB instead of 59 MB).
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=[*QUANTIZED_OPS, "Gather"],
                         nodes_to_quantize=nodes, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return
    quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def evaluate(model_dir: Path, variant: str, texts: list[str], y: np.ndarray, threads: int) -> tuple[float, float]:
    """(accuracy, rows/s) with serve_cli's batching."""
    from export.gate import onnx_predict

    t0 = time.perf_counter()
    pred = onnx_predict(model_dir, variant, texts, threads)
    return float((pred == y).mean()), len(texts) / (time.perf_counter() - t0)


def candidates(scores: list[tuple[str, float]], keep: int, methods: tuple[str, ...], done: str) -> list[Candidate]:
    """The candidates after the first (`done`), fastest first, of the allowed methods."""
    top = [name for name, s in scores[:keep] if s > 0]
    out = [Candidate(f"dynamic-keep-{len(top)}", "dynamic", top)] if top else []
    out.append(Candidate("static", "static"))
    if top:
        out.append(Candidate(f"static-keep-{len(top)}", "static", top))
    return [c for c in out if c.method in methods and c.name != done]


def search(onnx_dir: Path, validation: tuple[list[str], np.ndarray], calibration: list[str], max_drop: float, threads: int,
           keep: int = 4, try_all: bool = False, save_candidates: Path | None = None,
           methods: tuple[str, ...] = ("dynamic", "static")) -> dict[str, Any]:
    """Write the chosen int8 model to onnx_dir/model_quantized.onnx (or none qualifies: no int8 file, fp32 stays).

    Returns the report: fp32's validation accuracy and speed, every candidate tried, the chosen one and why."""
    from serve_cli.runtime import OnnxClassifier

    t_start = time.perf_counter()
    texts, y = validation
    fp32_acc, fp32_rate = evaluate(onnx_dir, "fp32", texts, y, threads)
    feeds = calibration_feeds(OnnxClassifier(onnx_dir, variant="fp32"), calibration)
    src = onnx_dir / "model.onnx"
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=onnx_dir.parent))
    tried: list[Candidate] = []
    chosen: Candidate | None = None
    scores: list[tuple[str, float]] = []
    sensitivity_seconds = 0.0
    try:
        queue = [Candidate(methods[0], methods[0])]
        while queue:
            cand = queue.pop(0)
            path = work / f"{cand.name}.onnx"
            build(src, path, cand, [dict(f) for f in feeds])
            shutil.copy(path, onnx_dir / INT8_FILE)
            cand.accuracy, cand.rows_per_second = evaluate(onnx_dir, "int8", texts, y, threads)
            cand.drop_points = 100 * (fp32_acc - cand.accuracy)
            cand.bytes = path.stat().st_size
            tried.append(cand)
            if save_candidates is not None:  # benchmarks measure every candidate on other data too
                shutil.copy(path, save_candidates / f"{cand.name}.onnx")
            ok = cand.drop_points <= max_drop
            cand.why = f"loses {cand.drop_points:+.2f} points on validation ({'within' if ok else 'over'} {max_drop})"
            if ok and (chosen is None or cand.rows_per_second > chosen.rows_per_second):
                chosen = cand
            if chosen is not None and not try_all:
                break  # candidates come fastest first: the first that qualifies is the one to keep
            if cand.name == methods[0]:
                # Only now is the sensitivity needed (it costs two model runs over the calibration texts).
                t0 = time.perf_counter()
                scores = sensitivity(src, path, feeds)
                sensitivity_seconds = time.perf_counter() - t0
                queue = candidates(scores, keep, methods, cand.name)
        if chosen is not None:
            chosen.chosen = True
            chosen.why += "; fastest that qualifies" if try_all else "; first (fastest) that qualifies"
        # Without a qualifying candidate the plain dynamic model still ships as the int8 file (not the default):
        # users can measure it on their own data with `serve_cli eval --variant int8`.
        shutil.copy(work / f"{chosen.name if chosen else methods[0]}.onnx", onnx_dir / INT8_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "selected_on": "validation",
        "validation_rows": len(texts),
        "max_drop_points": max_drop,
        "fp32": {"accuracy": fp32_acc, "rows_per_second": fp32_rate},
        "sensitivity": [{"node": n, "added_relative_error": s} for n, s in scores[:8]],
        "sensitivity_seconds": sensitivity_seconds,
        "candidates": [asdict(c) for c in tried],
        "chosen": chosen.name if chosen else None,
        "shipped": chosen.name if chosen else methods[0],  # the int8 file: the chosen one, else the plain first candidate
        "verdict": (f"int8 = {chosen.name}: {chosen.why}, {chosen.rows_per_second / fp32_rate:.2f}x fp32's rows/s" if chosen
                    else f"no int8 candidate within {max_drop} points on validation: fp32 is the default"),
        "seconds": time.perf_counter() - t_start,
    }
