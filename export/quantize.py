"""Dynamic int8 quantization of the exported ONNX model (model.onnx -> model_quantized.onnx)."""

from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path

from export.common import INT8_FILE

QUANTIZATION_METHODS = ("auto", "ort-dynamic", "ort-dynamic-fused", "optimum-avx512_vnni", "optimum-avx2", "optimum-arm64")


def auto_quantization() -> str:
    """The measured-fastest accurate method for this CPU (see benchmarks/quantization.py and the README)."""
    # Measured on AVX-512 VNNI x86 (AG News, MiniLM): quantize_dynamic on the plain graph ran 356 rows/s,
    # optimum avx512_vnni 340, the fused graph 317, optimum avx2 179, fp32 205, all within 0.1 point.
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "optimum-arm64"
    return "ort-dynamic"


def quantize(onnx_dir: Path, method: str, model_type: str, num_heads: int, hidden_size: int) -> None:
    """Write onnx_dir/model_quantized.onnx from onnx_dir/model.onnx with dynamic int8 quantization."""
    src = onnx_dir / "model.onnx"
    dst = onnx_dir / INT8_FILE
    if method in ("ort-dynamic", "ort-dynamic-fused"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source = src
        with tempfile.TemporaryDirectory() as tmp:
            if method == "ort-dynamic-fused":
                # Fuse attention, LayerNorm and GELU first: fewer, larger int8 kernels.
                from onnxruntime.transformers.optimizer import optimize_model

                opt_type = model_type if model_type in ("bert", "bart", "gpt2") else "bert"
                opt = optimize_model(str(src), model_type=opt_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
                source = Path(tmp) / "fused.onnx"
                opt.save_model_to_file(str(source))
            import onnx

            # Fused com.microsoft ops defeat shape inference; their outputs are float.
            quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    target = method.removeprefix("optimum-")
    qconfig = getattr(AutoQuantizationConfig, target)(is_static=False, per_channel=True)
    quantizer = ORTQuantizer.from_pretrained(str(onnx_dir), file_name="model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        out = quantizer.quantize(save_dir=tmp, quantization_config=qconfig)
        shutil.move(str(Path(out) / "model_quantized.onnx"), dst)
