"""Accuracy-aware int8: try quantization candidates fastest first, keep the first that keeps accuracy.

Chosen on the run's selection rows, never on the test split: its validation split (labelled, held out) and
up to 2,000 training texts (unlabelled), all predicted with serve_cli's own batching. A candidate qualifies
when, against ONNX fp32:
- its expected drop is within --max-int8-drop (0.3 points) on the validation texts and on the training
  texts. The expected drop takes fp32's probabilities as soft labels (see `expected_drop_points`): it
  needs no labels and counts every flip by how sure fp32 was, so it resolves tenths of a point where the
  labelled rows cannot (TREC: 268 validation rows, one row = 0.37 points);
- its labelled validation accuracy drop is within --max-int8-drop plus two standard errors of that drop
  (`labelled_tolerance`: 2 sqrt(rows that changed) / rows). On a few hundred rows the labelled drop is
  mostly noise (TREC fine, 277 rows, ~8 changed: +-1 point); within it the expected drop decides.
Both sets matter: a model that memorised its training texts agrees with fp32 on them almost always (TREC
fine: 99.8%) and only held-out texts show its flips (96-98%).

Candidates. Batch-independent ones first (a row's answer never depends on its batch mates), the dynamic
ones only when none of those qualifies (or first with --allow-batch-dependent):
1. `static`: export/rowwise.py, every linear layer with a weight in int8 with one fixed activation scale and
   zero point per layer input, calibrated (min/max) on training texts, per-channel weights: the fastest int8;
2. `static-rowwise-N`: the same with the N most sensitive layers given row-wise scales instead;
3. `rowwise`: every linear layer with one activation scale per token row (about twice as precise as a fixed
   scale, and slower: the scales are computed at run time);
   in all three each row is computed from itself alone (integer products are exact);
4. `dynamic`: onnxruntime dynamic int8, per-channel weights, every linear layer with a weight (MatMul, Gemm)
   and the embedding tables (activation scales per batch: results depend slightly on batch mates);
   attention's activation x activation products stay fp32;
5. `dynamic-smooth`: the same after activation smoothing (export/smooth.py: outlier channels moved into
   the weights, exact in fp32, one Mul per smoothed activation);
6. `dynamic-smooth-keep-N`: that with the N most sensitive layers kept in fp32.

Sensitivity (computed only when a keep-N candidate is reached): the int8 candidate it starts from and its
fp32 source run side by side on calibration texts with every MatMul/Gemm input and output exposed; a node's
score is the relative error its output adds over the error already in its input (error that comes from
upstream is not the node's fault).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.common import INT8_FILE, weight_layers
from export.smooth import SMOOTH_ALPHA, exposed_runs, smooth_model
from loraship.task import Task


@dataclass
class Candidate:
    name: str
    method: str  # "static", "rowwise" or "dynamic"
    smooth: bool = False
    keep: int = 0  # this many of the most sensitive layers stay fp32 (dynamic) or get row-wise scales (static)
    exclude: list[str] = field(default_factory=list)  # layers kept in fp32
    rowwise: list[str] = field(default_factory=list)  # static candidates: layers with row-wise scales
    accuracy: float | None = None
    drop_points: float | None = None  # labelled validation accuracy, fp32 minus int8
    expected_drop_points: float | None = None  # on the validation texts, fp32's probabilities as soft labels
    unlabelled_expected_drop_points: float | None = None  # the same on the training texts
    agreement: float | None = None  # argmax equal to fp32's, over all selection texts
    flips: int | None = None  # validation rows whose argmax differs from fp32's
    rows_per_second: float | None = None
    bytes: int | None = None
    seconds: float | None = None  # build and measure
    chosen: bool = False
    why: str = ""

    @property
    def batch_independent(self) -> bool:
        return self.method in BATCH_INDEPENDENT


CALIBRATION_FEED_ROWS = 256  # texts that calibrate static ranges, smoothing and sensitivity


def calibration_feeds(clf: Any, texts: list[str], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    encs = clf.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i]))
    return [clf.feed([encs[i] for i in order[b : b + batch_size]]) for b in range(0, len(order), batch_size)]


# The linear layers: MatMul (3-D activations) and Gemm (the 2-D pooler and classifier).
QUANTIZED_OPS = ("MatMul", "Gemm")


def matmul_nodes(model_path: Path) -> list[Any]:
    """The linear layers with a weight: attention's activation x activation products (QK^T, softmax x V) are
    never quantized (measured: they were the most sensitive layers on TREC, and carry few FLOPs)."""
    import onnx

    return weight_layers(onnx.load(str(model_path), load_external_data=False).graph, QUANTIZED_OPS)


def quantizable(model_path: Path, exclude: list[str]) -> list[str]:
    """Node names to quantize: weight layers not excluded, and the embedding tables (Gather on a weight)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    layers = [n.name for n in weight_layers(graph, QUANTIZED_OPS) if n.name not in exclude]
    # The dynamic quantizer first rewrites a Gemm into "<name>_MatMul" + Add: name both.
    names = [x for name in layers for x in (name, f"{name}_MatMul")]
    return names + [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]


def sensitivity(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """(MatMul node name, added relative error), most sensitive first."""
    nodes = matmul_nodes(fp32_path)
    names = sorted({t for n in nodes for t in (n.input[0], n.output[0])})
    err: dict[str, list[float]] = {name: [] for name in names}
    for (_, ref), (_, got) in zip(exposed_runs(fp32_path, names, feeds), exposed_runs(int8_path, names, feeds), strict=True):
        for name in names:
            if name in ref and name in got:
                a, b = ref[name].astype(np.float64), got[name].astype(np.float64)
                err[name].append(float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)))
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in err.items()}
    scores = [(n.name, mean[n.output[0]] - mean[n.input[0]]) for n in nodes]
    return sorted(scores, key=lambda x: -x[1])


def build(src: Path, dst: Path, cand: Candidate, feeds: list[dict[str, np.ndarray]]) -> None:
    """Write the candidate's int8 model to dst (unfused: sensitivity reads its tensors by name)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.rowwise import calibrated_ranges, quantize_rowwise

    if cand.method == "rowwise":
        quantize_rowwise(src, dst, cand.exclude)
    elif cand.method == "static":
        quantize_rowwise(src, dst, cand.exclude, static=calibrated_ranges(src, feeds), rowwise=cand.rowwise)
    else:
        # The int8 embedding table (Gather) makes the file a quarter of fp32's (AG News: 23 MB instead of 59 MB).
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=[*QUANTIZED_OPS, "Gather"],
                         nodes_to_quantize=quantizable(src, cand.exclude), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def store_fused(src: Path, dst: Path) -> None:
    """Write src to dst as it ships: each static layer's bias added inside its integer product (fold_biases), then
    onnxruntime's graph fusions applied, so that a session does not redo them at every load (a cold start). Level
    "extended" only: its fusions are onnxruntime's CPU operators, with no layout or instruction-set specific
    rewrites (those stay for the session to make on the machine it runs on)."""
    import onnx
    import onnxruntime as ort

    from export.rowwise import fold_biases

    model = onnx.load(str(src))
    fold_biases(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = dst.with_name(f".{dst.name}.fused")
    opts.optimized_model_filepath = str(tmp)
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tmp.replace(dst)


def measure(model_dir: Path, variant: str, texts: list[str], threads: int) -> tuple[np.ndarray, float]:
    """(probabilities, rows/s) with serve_cli's batching."""
    from export.gate import onnx_proba

    t0 = time.perf_counter()
    probs = onnx_proba(model_dir, variant, texts, threads)
    return probs, len(texts) / (time.perf_counter() - t0)


METHODS = ("static", "rowwise", "dynamic")  # what --int8-methods may name
BATCH_INDEPENDENT = ("rowwise", "static")  # methods whose answer for a row does not depend on its batch mates


def plan(methods: tuple[str, ...], keep: int, allow_batch_dependent: bool = False) -> list[Candidate]:
    """Every candidate of the allowed methods. By default the batch-independent ones come first (static, static
    with the most sensitive layers row-wise, row-wise) and the dynamic ones are tried only when none of those qualifies; with `allow_batch_dependent`,
    fastest first (the dynamic ones lead)."""
    dynamic = [Candidate("dynamic", "dynamic"), Candidate("dynamic-smooth", "dynamic", smooth=True),
               Candidate(f"dynamic-smooth-keep-{keep}", "dynamic", smooth=True, keep=keep)]
    independent = [Candidate("static", "static"), Candidate(f"static-rowwise-{keep}", "static", keep=keep), Candidate("rowwise", "rowwise")]
    out = dynamic + independent if allow_batch_dependent else independent + dynamic
    return [c for c in out if c.method in methods and (c.keep == 0 or keep > 0)]


def qualify(cand: Candidate, max_drop: float, task: Task, y: np.ndarray) -> bool:
    """The criterion (module doc); writes why into cand.why."""
    validation_rows = len(y)
    checks = [
        (cand.expected_drop_points, max_drop, "expected drop on validation texts"),
        (cand.unlabelled_expected_drop_points, max_drop, "expected drop on training texts"),
        (cand.drop_points, max_drop + task.labelled_tolerance(cand.flips or 0, y), "labelled validation drop"),
    ]
    failed = [f"{what} {got:+.2f} > {limit:.2f}" for got, limit, what in checks if got is not None and got > limit]
    cand.why = (f"expected drop {cand.expected_drop_points:+.2f} (validation) / {cand.unlabelled_expected_drop_points:+.2f} "
                f"(training texts), labelled {cand.drop_points:+.2f} points ({cand.flips} of {validation_rows} validation "
                "rows changed): " + ("within the criterion" if not failed else "; ".join(failed)))
    return not failed


class Selection:
    """The selection texts with fp32's probabilities, measured once. The task (loraship.task) says what a
    prediction, the headline metric and the expected drop are: accuracy for single-label, macro F1 at the
    model's thresholds (expected drop: soft micro F1) for multi-label."""

    def __init__(self, onnx_dir: Path, validation: tuple[list[str], np.ndarray], unlabelled: list[str], threads: int) -> None:
        from serve_cli.runtime import model_task

        self.onnx_dir, self.threads = onnx_dir, threads
        self.task = model_task(onnx_dir)
        self.texts, self.y = validation[0] + unlabelled, validation[1]
        self.fp32, self.fp32_rate = measure(onnx_dir, "fp32", self.texts, threads)
        self.fp32_accuracy = self.accuracy(self.fp32)

    def accuracy(self, probs: np.ndarray) -> float:
        """The task's headline metric on the validation rows."""
        return float(self.task.metrics(self.y, probs[: len(self.y)])[self.task.headline])

    def score(self, cand: Candidate) -> None:
        """Measure the int8 file now in onnx_dir as `cand`."""
        probs, cand.rows_per_second = measure(self.onnx_dir, "int8", self.texts, self.threads)
        n, task = len(self.y), self.task
        cand.accuracy = self.accuracy(probs)
        cand.drop_points = 100 * (self.fp32_accuracy - cand.accuracy)
        cand.expected_drop_points = task.expected_drop(self.fp32[:n], probs[:n])
        cand.unlabelled_expected_drop_points = task.expected_drop(self.fp32[n:], probs[n:])
        same = task.predict(probs) == task.predict(self.fp32)
        cand.agreement = float(same.all(-1).mean() if same.ndim == 2 else same.mean())
        cand.flips = task.changed(self.fp32[:n], probs[:n])


def search(onnx_dir: Path, validation: tuple[list[str], np.ndarray], calibration: list[str], max_drop: float, threads: int,
           keep: int = 4, try_all: bool = False, save_candidates: Path | None = None,
           methods: tuple[str, ...] = METHODS, allow_batch_dependent: bool = False) -> dict[str, Any]:
    """Write the chosen int8 model to onnx_dir/model_quantized.onnx (or none qualifies: the first candidate ships
    as the int8 file, and fp32 stays the default).

    Returns the report: fp32's validation accuracy and speed, every candidate tried, the chosen one and why."""
    from serve_cli.runtime import OnnxClassifier

    t_start = time.perf_counter()
    sel = Selection(onnx_dir, validation, calibration, threads)

    def rank(c: Candidate) -> tuple[bool, float]:
        """Batch-independent first unless batch-dependent ones are allowed; then rows/s."""
        return (allow_batch_dependent or c.batch_independent, c.rows_per_second or 0.0)

    feeds = calibration_feeds(OnnxClassifier(onnx_dir, variant="fp32"), calibration[:CALIBRATION_FEED_ROWS])
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=onnx_dir.parent))
    sources = {False: onnx_dir / "model.onnx", True: work / "smoothed.onnx"}
    tried: list[Candidate] = []
    chosen: Candidate | None = None
    scores: dict[str, list[tuple[str, float]]] = {}  # the candidate a keep-N one starts from -> its ranking
    try:
        for cand in plan(methods, keep, allow_batch_dependent):
            t0 = time.perf_counter()
            src = sources[cand.smooth]
            if cand.smooth and not src.exists():
                smooth_model(sources[False], src, [dict(f) for f in feeds], SMOOTH_ALPHA)
            if cand.keep:
                # Sensitivity of the same candidate without exclusions, built just before in the plan.
                base = next(c for c in tried if c.method == cand.method and c.smooth == cand.smooth and not c.keep)
                ranked = sensitivity(src, work / f"{base.name}.onnx", feeds)
                sensitive = [name for name, score in ranked[: cand.keep] if score > 0]
                if cand.method == "static":
                    cand.rowwise = sensitive
                else:
                    cand.exclude = sensitive
                scores[base.name] = ranked
            path = work / f"{cand.name}.onnx"
            build(src, path, cand, [dict(f) for f in feeds])
            store_fused(path, onnx_dir / INT8_FILE)  # measured as it ships
            sel.score(cand)
            cand.bytes, cand.seconds = (onnx_dir / INT8_FILE).stat().st_size, time.perf_counter() - t0
            tried.append(cand)
            if save_candidates is not None:  # benchmarks measure every candidate on other data too
                shutil.copy(onnx_dir / INT8_FILE, save_candidates / f"{cand.name}.onnx")
            if qualify(cand, max_drop, sel.task, sel.y) and (chosen is None or rank(cand) > rank(chosen)):
                chosen = cand
            if chosen is not None and not try_all:
                break  # candidates come fastest first: the first that qualifies is the one to keep
        if chosen is not None:
            chosen.chosen = True
            chosen.why += ("; fastest that qualifies" if try_all else "; first that qualifies") + (
                "; batch-independent" if chosen.batch_independent else "; depends on batch mates")
        # Without a qualifying candidate the first one still ships as the int8 file (not the default): users
        # can measure it on their own data with `serve_cli eval --variant int8`.
        shipped = chosen or tried[0]
        if shipped is not tried[-1]:  # the last one tried is in onnx_dir already
            store_fused(work / f"{shipped.name}.onnx", onnx_dir / INT8_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "selected_on": "validation",
        "task": sel.task.name,
        "metric": sel.task.headline,  # what "accuracy" and the drops below measure
        "validation_rows": len(sel.y),
        "unlabelled_rows": len(sel.texts) - len(sel.y),
        "max_drop_points": max_drop,
        "criterion": "expected drop (fp32 probabilities as soft labels) <= max on validation and on training texts; "
                     "labelled validation drop <= max + 2 standard errors (2 sqrt(rows changed) / rows; multi-label: "
                     "2 sqrt(label decisions changed) / positive labels)",
        "fp32": {"accuracy": sel.fp32_accuracy, "rows_per_second": sel.fp32_rate},
        "sensitivity": {base: [{"node": n, "added_relative_error": s} for n, s in ranked[:8]] for base, ranked in scores.items()},
        "candidates": [asdict(c) | {"batch_independent": c.batch_independent} for c in tried],
        "batch_independent": bool(chosen and chosen.batch_independent),
        "chosen": chosen.name if chosen else None,
        "shipped": shipped.name,  # the int8 file: the chosen one, else the first candidate
        "verdict": (f"int8 = {chosen.name}: {chosen.why}, {chosen.rows_per_second / sel.fp32_rate:.2f}x fp32's rows/s" if chosen
                    else f"no int8 candidate within the criterion ({max_drop} points): fp32 is the default"),
        "seconds": time.perf_counter() - t_start,
    }
