"""Batch-independent int8: no linear layer's activation scale depends on the other texts in a batch.

onnxruntime's dynamic int8 quantizes a linear layer's input with one scale for the whole batch tensor (its
largest value): a text's int8 result then changes with its batch mates. Here each linear layer with a weight
(MatMul on an initializer) becomes one of two kinds, mixed freely in one graph:

- row-wise: one scale per token row, computed at run time from that row alone:
      s = max(|x|, over the hidden axis) / 127            symmetric; stored with a zero point of 128
      y = MatMulIntegerToFloat(uint8(round(x / s) + 128), Wq) * s
- static: one fixed scale and zero point for the layer's input, calibrated (min/max) on training texts:
      y = MatMulIntegerToFloat(QuantizeLinear(x, scale, zero_point), Wq)

Weights are int8 per output channel (w_scale = max|W[:, n]| / 127). Embedding tables (Gather on a weight) are
int8 with one scale per table row, dequantized after the lookup: a token's vector never depends on its
batch, and the file is about a quarter of fp32's, which a session loads faster (a cold start).
Integer products are exact, so each row's int8 result is computed from that row alone either way. A static
layer costs one pass over its input (less than dynamic int8's two), and the shipped file adds its bias inside
the product (`fold_biases`); a row-wise one adds three passes (max, scale, quantize) and one over its output,
and is about twice as precise on the same activations. Layers named in `exclude` and everything else
(attention's activation products, LayerNorm, GELU, the Gemm head) stay fp32. Shapes stay [batch, seq, hidden]
throughout, so onnxruntime still fuses a row-wise layer's bias with the GELU after it.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from export.common import weight_layers

Ranges = dict[str, tuple[float, float]]  # layer input tensor -> (min, max) over the calibration texts


def calibrated_ranges(src: Path, feeds: list[dict[str, np.ndarray]]) -> Ranges:
    """(min, max) of every weight layer's input over the feeds' real tokens (padding rows are left out)."""
    import onnx

    from export.smooth import exposed_runs

    names = sorted({n.input[0] for n in weight_layers(onnx.load(str(src), load_external_data=False).graph)})
    lo, hi = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)  # the range always holds 0 (exact zero point)
    for feed, got in exposed_runs(src, names, feeds):
        mask = feed["attention_mask"].astype(bool)
        for name in names:
            x = got[name]
            x = x[mask] if x.shape[:2] == mask.shape else x
            lo[name], hi[name] = min(lo[name], float(x.min())), max(hi[name], float(x.max()))
    return {name: (lo[name], hi[name]) for name in names}


def quantize_rowwise(src: Path, dst: Path, exclude: list[str] | None = None, static: Ranges | None = None,
                     rowwise: list[str] | None = None) -> list[str]:
    """Write the batch-independent int8 model of `src` to `dst`; returns the names of the layers made int8.

    A layer whose input is in `static` gets that fixed range, unless the layer is named in `rowwise`; every other
    layer gets row-wise scales. Without `static`, every layer is row-wise."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    layers = {n.name for n in weight_layers(graph)} - set(exclude or [])
    static, keep_rowwise = static or {}, set(rowwise or [])
    graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=t), name) for name, v, t in [
        ("rw_axes_last", [-1], np.int64), ("rw_127", 127.0, np.float32), ("rw_inv127", 1 / 127.0, np.float32),
        ("rw_eps", 1e-12, np.float32), ("rw_one", 1.0, np.float32), ("rw_zp", 128, np.uint8)])
    new_nodes: list[Any] = []
    tables = {n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in weights
              and weights[n.input[0]].data_type == TensorProto.FLOAT and len(weights[n.input[0]].dims) == 2}
    quantized: dict[str, tuple[str, str, str]] = {}  # static input -> (its uint8 tensor, scale, zero point), made once
    done: list[str] = []
    for node in graph.node:
        if node.name in tables:
            new_nodes += _table_nodes(graph, node, weights[node.input[0]], f"emb_{len(new_nodes)}")
            continue
        if node.name not in layers:
            new_nodes.append(node)
            continue
        p, x, y = f"rw_{len(done)}", node.input[0], node.output[0]
        W = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        w_scale = np.maximum(np.abs(W).max(axis=0), 1e-12) / 127.0
        Wq = np.clip(np.round(W / w_scale), -127, 127).astype(np.int8)
        graph.initializer.extend([numpy_helper.from_array(Wq, f"{p}_wq"), numpy_helper.from_array(w_scale.astype(np.float32), f"{p}_ws")])
        if x in static and node.name not in keep_rowwise:
            if x not in quantized:
                scale, zero_point = _affine(*static[x])
                graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{p}_as"),
                                          numpy_helper.from_array(np.array(zero_point, np.uint8), f"{p}_az")])
                new_nodes.append(helper.make_node("QuantizeLinear", [x, f"{p}_as", f"{p}_az"], [f"{p}_xq"]))
                quantized[x] = (f"{p}_xq", f"{p}_as", f"{p}_az")
            xq, a_scale, a_zp = quantized[x]
            new_nodes.append(helper.make_node("MatMulIntegerToFloat", [xq, f"{p}_wq", a_scale, f"{p}_ws", a_zp], [y],
                                              name=node.name, domain="com.microsoft"))
        else:
            new_nodes += _rowwise_nodes(p, x, y, node.name)
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(dst))
    return done


def fold_biases(model: Any) -> int:
    """Move each bias Add right after a MatMulIntegerToFloat into that node's own bias input, in place: the bias
    is then added as the integer product is scaled, not in one more pass over the layer's output (onnxruntime's
    fusions leave the two apart). A row-wise layer's product is followed by its row scale, not its bias: left
    as it is. Returns how many were moved."""
    graph = model.graph
    vectors = {i.name: list(i.dims) for i in graph.initializer if len(i.dims) == 1}
    # The exporter writes equal weights once and the other copies as Identity of it (e.g. biases still all zero).
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in vectors}
    columns = {i.name: i.dims[-1] for i in graph.initializer if len(i.dims) == 2}
    uses = collections.Counter([i for n in graph.node for i in n.input] + [o.name for o in graph.output])
    adds = {i: n for n in graph.node if n.op_type == "Add" for i in n.input}
    folded: set[int] = set()
    for node in graph.node:
        y = node.output[0]
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > 5 or uses[y] != 1 or y not in adds:
            continue
        add = adds[y]
        bias = [aliases.get(i, i) for i in add.input if i != y]
        if len(bias) != 1 or vectors.get(bias[0]) != [columns.get(node.input[1])]:
            continue
        # inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias
        node.input.extend([""] * (6 - len(node.input)) + [bias[0]])
        node.output[0] = add.output[0]
        folded.add(id(add))
    kept = [n for n in graph.node if id(n) not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    return len(folded)


def _affine(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point that cover [lo, hi] (which holds 0)."""
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


def _table_nodes(graph: Any, node: Any, table: Any, p: str) -> list[Any]:
    """An embedding lookup from an int8 table, one scale per table row."""
    from onnx import TensorProto, helper, numpy_helper

    T = numpy_helper.to_array(table).astype(np.float32)
    scale = np.maximum(np.abs(T).max(axis=1), 1e-12) / 127.0
    Tq = np.clip(np.round(T / scale[:, None]), -127, 127).astype(np.int8)
    graph.initializer.extend([numpy_helper.from_array(Tq, f"{p}_q"), numpy_helper.from_array(scale.astype(np.float32), f"{p}_s")])
    ids, y = node.input[1], node.output[0]
    return [
        helper.make_node("Gather", [f"{p}_q", ids], [f"{p}_gq"]),
        helper.make_node("Gather", [f"{p}_s", ids], [f"{p}_gs"]),
        helper.make_node("Unsqueeze", [f"{p}_gs", "rw_axes_last"], [f"{p}_gs1"]),
        helper.make_node("Cast", [f"{p}_gq"], [f"{p}_gf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_gf", f"{p}_gs1"], [y], name=node.name),
    ]


def _rowwise_nodes(p: str, x: str, y: str, name: str) -> list[Any]:
    """y = x @ W with one activation scale per row of x (the hidden axis reduced, shape kept)."""
    from onnx import helper

    return [
        helper.make_node("Abs", [x], [f"{p}_abs"]),
        helper.make_node("ReduceMax", [f"{p}_abs", "rw_axes_last"], [f"{p}_max"], keepdims=1),
        helper.make_node("Max", [f"{p}_max", "rw_eps"], [f"{p}_maxe"]),  # an all-zero row: scale eps, not 0
        helper.make_node("Mul", [f"{p}_maxe", "rw_inv127"], [f"{p}_s"]),
        helper.make_node("Div", ["rw_127", f"{p}_maxe"], [f"{p}_r"]),
        helper.make_node("Mul", [x, f"{p}_r"], [f"{p}_xs"]),  # in [-127, 127]; then + 128 as uint8
        helper.make_node("QuantizeLinear", [f"{p}_xs", "rw_one", "rw_zp"], [f"{p}_xq"]),
        helper.make_node("MatMulIntegerToFloat", [f"{p}_xq", f"{p}_wq", "rw_one", f"{p}_ws", "rw_zp"], [f"{p}_yw"],
                         domain="com.microsoft"),
        helper.make_node("Mul", [f"{p}_yw", f"{p}_s"], [y], name=name),
    ]
