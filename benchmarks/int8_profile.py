"""Where int8 time goes: onnxruntime's per-operator profile of the fp32 and int8 models on this CPU.

    python benchmarks/int8_profile.py [--onnx runs/agnews_minilm/onnx] [--rows 1024] [--reps 3]

Runs both variants on the same length-sorted batches of 32 test texts (serve_cli's batching, all cores,
session time only: no tokenization), median rows/s of --reps passes, then one profiled pass each: the share
of kernel time per operator type, and the time per row of the linear layers (MatMul/Gemm in fp32; their
int8 forms in int8) versus everything else. The speed-up int8 can give is bounded by what stays fp32
(LayerNorm, GELU, softmax, attention's activation x activation products): Amdahl's law with the measured
linear-layer speed-up. Saves benchmarks/results/int8_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, save, table

LINEAR = {"MatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul",
          "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}


def profile(session_path: Path, feeds: list[dict], threads: int, reps: int, rows: int) -> dict[str, object]:
    import onnxruntime as ort

    def session(prof: str | None) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as serve_cli
        if prof:
            o.enable_profiling, o.profile_file_prefix = True, prof
        return ort.InferenceSession(str(session_path), o, providers=["CPUExecutionProvider"])

    s = session(None)
    names = {i.name for i in s.get_inputs()}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in feeds:
            s.run(None, f)
        runs.append(rows / (time.perf_counter() - t0))
    with tempfile.TemporaryDirectory() as tmp:
        s = session(os.path.join(tmp, "p"))
        for f in feeds:
            s.run(None, f)
        events = json.loads(Path(s.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    # Attention's activation x activation MatMuls stay fp32 in int8; in fp32 they are counted as linear too
    # (a small share: 2 of 8 MatMuls per layer, few FLOPs).
    linear = sum(v for k, v in by_op.items() if k in LINEAR) / total
    rate = median(runs)
    return {"rows_per_second": rate, "runs": runs, "ms_per_row": 1000 / rate, "linear_share": linear,
            "linear_ms_per_row": 1000 / rate * linear, "other_ms_per_row": 1000 / rate * (1 - linear),
            "op_share": {k: v / total for k, v in by_op.most_common()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, default=REPO / "runs" / "agnews_minilm" / "onnx")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from serve_cli.runtime import OnnxClassifier

    texts = [json.loads(x)["text"] for x in (data_dir() / "test.jsonl").read_text().splitlines()][: args.rows]
    clf = OnnxClassifier(args.onnx, variant="fp32")
    encs = clf.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    feeds = [clf.feed([encs[i] for i in order[b : b + 32]]) for b in range(0, len(order), 32)]
    out = {v: profile(args.onnx / f, feeds, args.threads, args.reps, len(texts)) for v, f in (("fp32", "model.onnx"), ("int8", "model_quantized.onnx"))}
    fp, q = out["fp32"], out["int8"]
    linear_speedup = fp["linear_ms_per_row"] / q["linear_ms_per_row"]
    result = {
        "benchmark": "int8_profile", "machine": machine(), "rows": len(texts), "threads": args.threads,
        "int8_method": json.loads((args.onnx / "export_report.json").read_text()).get("quantization", {}).get("method"),
        "variants": out,
        "int8_x_fp32": q["rows_per_second"] / fp["rows_per_second"],
        "linear_layers_int8_x_fp32": linear_speedup,
        # If int8 made every linear layer infinitely fast, or 2x (the int8/fp32 GEMM peak without VNNI: a
        # vpmaddubsw+vpmaddwd pair per 32 multiply-adds vs one FMA per 8), what would the whole model gain?
        "bound_if_linear_free": fp["ms_per_row"] / q["other_ms_per_row"],
        "bound_if_linear_2x": fp["ms_per_row"] / (fp["linear_ms_per_row"] / 2 + q["other_ms_per_row"]),
        "command": f"python benchmarks/int8_profile.py --rows {args.rows} --reps {args.reps}",
    }
    print(table(["variant", "rows/s", "ms/row", "linear ms/row", "other ms/row"],
                [[v, f"{r['rows_per_second']:.0f}", f"{r['ms_per_row']:.2f}", f"{r['linear_ms_per_row']:.2f}", f"{r['other_ms_per_row']:.2f}"]
                 for v, r in out.items()]))
    print(f"int8 {result['int8_x_fp32']:.2f}x fp32; linear layers {linear_speedup:.2f}x; "
          f"bound with 2x linear layers {result['bound_if_linear_2x']:.2f}x")
    save("int8_profile", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
