"""Row-wise dynamic int8: every token row gets its own activation scale, so a text's result never depends on
the other texts in its batch.

onnxruntime's dynamic int8 quantizes a linear layer's input with one scale for the whole batch tensor (its
largest value): a text's int8 result then changes with its batch mates. Here each linear layer with a weight
(MatMul on an initializer) becomes:

    s = max(|x|, over the hidden axis) / 127            one scale per token row
    q = int8(clip(round(x / s), -127, 127))             symmetric, no zero point
    y = MatMulInteger(q, Wq) * s * w_scale              Wq: int8 per output channel, w_scale = max|W[:, n]| / 127

Integer products are exact, so the int8 part of each row is computed from that row alone. Layers named in
`exclude` and everything else (attention's activation products, LayerNorm, GELU, the Gemm head) stay fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quantize_rowwise(src: Path, dst: Path, exclude: list[str] | None = None) -> list[str]:
    """Write the row-wise int8 model of `src` to `dst`; returns the names of the layers made int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    skip = set(exclude or [])
    new_nodes, done = [], []
    shared = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "rw_axes_last"),
              numpy_helper.from_array(np.array(127.0, dtype=np.float32), "rw_127"),
              numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "rw_eps"),
              numpy_helper.from_array(np.array(-127.0, dtype=np.float32), "rw_lo"),
              numpy_helper.from_array(np.array(128.0, dtype=np.float32), "rw_128f"),
              numpy_helper.from_array(np.array(128, dtype=np.uint8), "rw_zp"),
              numpy_helper.from_array(np.array([0], dtype=np.int64), "rw_zero"),
              numpy_helper.from_array(np.array(0.0, dtype=np.float32), "rw_zero_f")]
    graph.initializer.extend(shared)
    for node in graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or node.name in skip:
            new_nodes.append(node)
            continue
        W = numpy_helper.to_array(w).astype(np.float32)
        if W.ndim != 2:
            new_nodes.append(node)
            continue
        w_scale = np.maximum(np.abs(W).max(axis=0), 1e-12) / 127.0
        Wq = np.clip(np.round(W / w_scale), -127, 127).astype(np.int8)
        p = f"rw_{len(done)}"
        graph.initializer.extend([numpy_helper.from_array(Wq, f"{p}_wq"), numpy_helper.from_array(w_scale.astype(np.float32), f"{p}_ws")])
        x, y = node.input[0], node.output[0]
        new_nodes += [
            # [..., H] -> [rows, H]: QuantizeLinear then takes one scale per row (per-axis, axis 0).
            helper.make_node("Shape", [x], [f"{p}_shape"]),
            helper.make_node("Flatten", [x], [f"{p}_x2"], axis=-1),
            helper.make_node("Abs", [f"{p}_x2"], [f"{p}_abs"]),
            helper.make_node("ReduceMax", [f"{p}_abs", "rw_axes_last"], [f"{p}_max"], keepdims=0),
            helper.make_node("Max", [f"{p}_max", "rw_eps"], [f"{p}_maxe"]),
            helper.make_node("Div", [f"{p}_maxe", "rw_127"], [f"{p}_s"]),
            # a zero point of 128 for every row (a vector the size of the scales, as per-axis quantization wants)
            helper.make_node("Mul", [f"{p}_s", "rw_zero_f"], [f"{p}_z0"]),
            helper.make_node("Add", [f"{p}_z0", "rw_128f"], [f"{p}_z1"]),
            helper.make_node("Cast", [f"{p}_z1"], [f"{p}_zp"], to=TensorProto.UINT8),
            helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_s", f"{p}_zp"], [f"{p}_xq"], axis=0),
            helper.make_node("MatMulInteger", [f"{p}_xq", f"{p}_wq", "rw_zp"], [f"{p}_yi"]),
            helper.make_node("Cast", [f"{p}_yi"], [f"{p}_yf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}_s", "rw_axes_last"], [f"{p}_s2"]),
            helper.make_node("Mul", [f"{p}_s2", f"{p}_ws"], [f"{p}_sw"]),
            helper.make_node("Mul", [f"{p}_yf", f"{p}_sw"], [f"{p}_y2"]),
            # back to [..., N]: the input's shape with its last dim replaced by N
            helper.make_node("Slice", [f"{p}_shape", "rw_zero", "rw_axes_last"], [f"{p}_lead"]),
            helper.make_node("Concat", [f"{p}_lead", f"{p}_n"], [f"{p}_oshape"], axis=0),
            helper.make_node("Reshape", [f"{p}_y2", f"{p}_oshape"], [y], name=node.name),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([W.shape[1]], dtype=np.int64), f"{p}_n"))
        done.append(node.name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(dst))
    return done
