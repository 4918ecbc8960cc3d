"""Activation smoothing before int8 (SmoothQuant, Xiao et al. 2023), as a graph rewrite that is exact in fp32.

Int8 activations get one scale per tensor (per batch with dynamic quantization, per model with static), so a
few outlier channels (BERT's LayerNorm outputs have some 10-50x larger than the rest) leave the other
channels a handful of int8 levels. For a linear layer Y = X W, any per-channel s gives Y = (X / s) (s W):
dividing the activation channels by s and multiplying the weight rows by s moves the outliers into the
weights, which are quantized per output channel and absorb them. s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

BERT is post-LayerNorm: the LayerNorm output is also the residual, so s cannot be folded into the LayerNorm
(as SmoothQuant does for pre-LN models); it becomes an explicit Mul by 1/s, shared by the layers that read
the same activation (Q, K and V). The Mul costs ~1/384 of the MatMul it feeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export.common import weight_layers

# Measured on TREC coarse (validation and test agreement with fp32): 0.3 lost 11 validation / 22 test points (the
# weights take too much range), 0.5 helped held-out texts but not training texts, 0.7 helped both; on TREC fine
# 0.7 beat 0.8.
SMOOTH_ALPHA = 0.7


def session_with_outputs(model_path: Path, names: list[str]) -> Any:
    """An unoptimised session whose outputs include the named tensors (all float)."""
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


Arrays = dict[str, np.ndarray]


def exposed_runs(model_path: Path, names: list[str], feeds: list[Arrays]) -> Iterator[tuple[Arrays, Arrays]]:
    """(feed, the named tensors) for each feed, run on `session_with_outputs`."""
    sess = session_with_outputs(model_path, names)
    outputs = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    for feed in feeds:
        yield feed, dict(zip(outputs, sess.run(None, {k: v for k, v in feed.items() if k in inputs}), strict=True))


def activation_absmax(model_path: Path, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each named tensor over the calibration feeds."""
    out: dict[str, np.ndarray] = {}
    for _, got in exposed_runs(model_path, names, feeds):
        for name in names:
            m = np.abs(got[name]).reshape(-1, got[name].shape[-1]).max(axis=0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def smooth_model(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], alpha: float = SMOOTH_ALPHA) -> list[str]:
    """Write dst: src with the inputs of its weight MatMuls smoothed. Returns the smoothed activation names."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # MatMul only: its weight is [in, out]; the 2-D Gemms (pooler, classifier) carry few FLOPs.
    groups: dict[str, list[Any]] = {}
    for node in weight_layers(graph):
        groups.setdefault(node.input[0], []).append(node)
    xmax = activation_absmax(src, sorted(groups), feeds)
    for x, nodes in groups.items():
        weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in nodes}
        wmax = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        s = np.power(np.maximum(xmax[x], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)
        for name, w in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        inv, smoothed = f"{x}_smooth_inv", f"{x}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        graph.node.append(onnx.helper.make_node("Mul", [x, inv], [smoothed], name=f"{x}_smooth"))
        for n in nodes:
            n.input[0] = smoothed
    # Appended Muls must come before their readers: re-sort the graph topologically.
    _toposort(graph)
    onnx.save(model, str(dst))
    return sorted(groups)


def _toposort(graph: Any) -> None:
    import onnx

    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node], []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input")
        ordered += ready
        known.update(o for n in ready for o in n.output)
        pending = [n for n in pending if not all(i in known for i in n.input) or n.output[0] not in known]
    del graph.node[:]
    graph.node.extend(ordered)
