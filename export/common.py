"""What every export step shares: the error type, file names, hashing, PyTorch logits, CPU flags."""

from __future__ import annotations

import hashlib
import inspect
import platform
from pathlib import Path
from typing import Any

import numpy as np

from loraship.files import ADAPTER_META as META  # noqa: F401  (the export's name for it)
from loraship.files import CALIBRATION_FILE, REPORT, VALIDATION_FILE  # noqa: F401  (re-exported for the export's modules)

INT8_FILE = "model_quantized.onnx"
MERGE_STAMP = "loraship_merge.json"


class ExportError(RuntimeError):
    pass


def weight_layers(graph: Any, ops: tuple[str, ...] = ("MatMul",)) -> list[Any]:
    """The linear layers of an ONNX graph: `ops` nodes whose second input is a 2-D weight initializer (and whose
    first is not). MatMul: the encoder's layers, weights [in, out]; Gemm adds the 2-D pooler and classifier."""
    dims = {i.name: len(i.dims) for i in graph.initializer}
    return [n for n in graph.node if n.op_type in ops and len(n.input) >= 2 and dims.get(n.input[1]) == 2 and n.input[0] not in dims]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_logits(model: Any, tokenizer: Any, texts: list[Any], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Logits of texts or (text, text_pair) pairs, as the tokenizer encodes them (pairs: longest-first truncation)."""
    import torch

    from loraship.rows import split_pairs

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes_token_types = "token_type_ids" in inspect.signature(base.forward).parameters
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            first, second = split_pairs(texts[i : i + batch_size])
            enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            if "token_type_ids" in enc and not takes_token_types:
                del enc["token_type_ids"]
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "not installed"
    return out
