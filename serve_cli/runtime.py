"""Torch-free inference on an exported ONNX dir: onnxruntime + tokenizers + numpy only.

    from serve_cli.runtime import OnnxClassifier
    clf = OnnxClassifier("runs/agnews_minilm/onnx", variant="int8", threads=2)
    probs = clf.predict_proba(["Stocks rally as oil falls", "Late goal wins the cup"])

The dir is what `python -m export.to_onnx` writes: model.onnx (fp32), model_quantized.onnx (int8),
tokenizer.json, config.json with id2label, export_report.json (variants, default, max_length).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from loraship.files import REPORT
from loraship.task import Task

VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_quantized.onnx"}
CHARS_PER_TOKEN_CAP = 64  # characters kept per token of max_length before tokenizing
MIN_CHARS_CAP = 16_384  # ... and never fewer characters than this per text (or per side of a pair)
DEFAULT_BATCH_SIZE = 32  # rows per ONNX run in serve_cli predict/eval and the export gate
WINDOW_BATCHES = 32  # rows are length-sorted within windows of this many batches: bounded memory
# A batch ends where padding would pass this share of its tokens: padded positions cost as much as real ones
# (attention: more), so a batch of texts of unequal lengths is slower than running them one by one.
MAX_PADDING = 0.1


class ModelDirError(ValueError):
    """The model dir is missing or is not an ONNX export."""


def read_model_dir(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, export_report.json or {}) of an ONNX dir, with clear errors for the wrong kind of dir."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: model dir not found")
    if not (d / "config.json").is_file() or not any((d / f).is_file() for f in VARIANT_FILES.values()):
        raise ModelDirError(f"{d}: not an ONNX export (needs config.json and model.onnx); create one with python -m export.to_onnx")
    if not (d / "tokenizer.json").is_file():
        raise ModelDirError(f"{d}: tokenizer.json missing; re-export with python -m export.to_onnx")
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    if not config.get("id2label"):
        raise ModelDirError(f"{d}/config.json: no id2label label map")
    report = json.loads((d / REPORT).read_text(encoding="utf-8")) if (d / REPORT).is_file() else {}
    return config, report


def model_task(model_dir: str | os.PathLike[str]) -> Task:
    """The task of an export (from its config.json), without loading a session."""
    return Task.from_config(read_model_dir(model_dir)[0])


def input_fields(task: Task, text_field: str | None, text_pair_field: str | None) -> tuple[str, str | None]:
    """(text field, second text field or None) a file is read with: the given ones, else for a pair model the
    fields it was trained on, else `text`. A second field for a one-text model, or none for a pair model, is
    an error that says which the model reads."""
    trained = task.inputs or {}
    if task.pair:
        return text_field or str(trained["text"]), text_pair_field or str(trained["text_pair"])
    if text_pair_field:
        raise ModelDirError(f"--text-pair-field {text_pair_field}: this model reads one text per row, not pairs")
    return text_field or "text", None


def int8_batch_independent(report: dict[str, Any]) -> bool:
    """Whether the export's int8 file answers a row the same whatever its batch mates (row-wise or static int8)
    or not (dynamic int8), from the int8 search in the export report."""
    search = report.get("int8_search") or {}
    shipped = next((c for c in search.get("candidates", []) if c["name"] == search.get("shipped")), {})
    return bool(shipped.get("batch_independent"))  # older reports do not record it: False, the safe answer


def default_variant(model_dir: Path, report: dict[str, Any]) -> str:
    """The export's chosen variant; for exports without a report, int8 when present."""
    return report.get("default_variant") or ("int8" if (model_dir / VARIANT_FILES["int8"]).is_file() else "fp32")


class OnnxClassifier:
    """A text classifier over one ONNX variant of an export dir."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        variant: str | None = None,
        threads: int | None = None,
        max_length: int | None = None,
        spin: bool = True,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir)
        config, report = read_model_dir(self.model_dir)
        self.task = Task.from_config(config)
        self.labels = self.task.labels
        self.report = report
        self.variant = variant or default_variant(self.model_dir, report)
        if self.variant not in VARIANT_FILES:
            raise ModelDirError(f"variant {self.variant!r}: expected one of {', '.join(VARIANT_FILES)}")
        self.path = self.model_dir / VARIANT_FILES[self.variant]
        if not self.path.is_file():
            raise ModelDirError(f"{self.path}: variant {self.variant} not in this export")
        self.max_length = max_length or int(report.get("max_length") or 512)

        tok_cfg_path = self.model_dir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        pad_token = tok_cfg.get("pad_token") or "[PAD]"
        if isinstance(pad_token, dict):
            pad_token = pad_token.get("content", "[PAD]")
        pad_id = self.tokenizer.token_to_id(pad_token)
        self.pad_id = pad_id if pad_id is not None else 0
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.no_padding()  # batches are padded to their own longest row in `run`

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = threads or (os.cpu_count() or 1)
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:
            # Idle worker threads sleep instead of spinning: a server shares its cores with the event loop.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, texts: list[Any]) -> list[Any]:
        """Token encodings, truncated, unpadded: callers sort them by length before batching. An item is a
        text or a (text, text_pair) pair, encoded as the tokenizer's pair ([CLS] a [SEP] b [SEP], type ids 0
        then 1) and truncated longest-first, as transformers' tokenizer(a, b, truncation=True) does.

        A 1 MB line would cost seconds to tokenize only to be truncated: characters are capped well above
        what max_length tokens can span (every path, files and HTTP alike, goes through here). A pair whose
        two sides both pass the cap may differ from the uncapped encoding by the one token longest-first gives
        the longer side (the cap can change which side is longer); hence the floor of MIN_CHARS_CAP."""
        cap = max(self.max_length * CHARS_PER_TOKEN_CAP, MIN_CHARS_CAP)
        # encode_batch_fast: the same ids, without the character offsets nothing here reads.
        return self.tokenizer.encode_batch_fast([t[:cap] if isinstance(t, str) else (t[0][:cap], t[1][:cap]) for t in texts])

    def run(self, encodings: list[Any]) -> np.ndarray:
        """Logits for one batch of encodings, padded to the batch's longest row."""
        if not encodings:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.session.run(None, self.feed(encodings))[0]

    def feed(self, encodings: list[Any]) -> dict[str, np.ndarray]:
        """The model inputs for one batch, padded to its longest row (also used to calibrate int8)."""
        width = max(len(e) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for j, e in enumerate(encodings):
            n = len(e)
            ids[j, :n] = e.ids
            mask[j, :n] = 1
            types[j, :n] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v for k, v in feed.items() if k in self.input_names}

    def logits(self, texts: list[Any]) -> np.ndarray:
        return self.run(self.encode(texts))

    def predict_proba(self, texts: list[Any]) -> np.ndarray:
        return self.task.probs(self.logits(texts))


def predict_proba_sorted(clf: OnnxClassifier, texts: list[Any], batch_size: int) -> np.ndarray:
    """Probabilities in input order, computed in length-sorted batches (far less padding than file order)."""
    return clf.task.probs(logits_sorted(clf, texts, batch_size))


def logits_sorted(clf: OnnxClassifier, texts: list[Any], batch_size: int) -> np.ndarray:
    """Logits in input order, computed in length-sorted batches."""
    encs = clf.encode(texts)
    order = sorted(range(len(encs)), key=lambda k: len(encs[k]))
    logits = np.zeros((len(encs), len(clf.labels)), dtype=np.float32)
    for a, b in length_batches([len(encs[k]) for k in order], batch_size):
        ks = order[a:b]
        logits[ks] = clf.run([encs[k] for k in ks])
    return logits


def length_batches(widths: list[int], max_rows: int, max_tokens: int | None = None,
                   max_padding: float = MAX_PADDING) -> Iterator[tuple[int, int]]:
    """[start, end) batches over rows sorted by width (tokens): at most `max_rows` rows and `max_tokens` padded
    tokens each, ending where padding would pass `max_padding` of the batch's tokens. The last row of a batch
    sets its padded width."""
    start = 0
    while start < len(widths):
        end, real = start + 1, widths[start]
        while end < len(widths) and end - start < max_rows:
            padded = (end - start + 1) * widths[end]
            if (max_tokens is not None and padded > max_tokens) or (1 - max_padding) * padded > real + widths[end]:
                break
            real += widths[end]
            end += 1
        yield start, end
        start = end


T = TypeVar("T")


def predict_in_order(clf: OnnxClassifier, items: Iterable[T], batch_size: int,
                     text: Callable[[T], Any]) -> Iterator[tuple[T, np.ndarray | None]]:
    """(item, probabilities) in input order; inside each window rows run in length order (less padding).
    `text(item)`: a text or a (text, text_pair) pair; None: an item without one (a bad row), passed through
    with None."""
    buf: list[T] = []

    def flush() -> Iterator[tuple[T, np.ndarray | None]]:
        texts = [text(it) for it in buf]
        rows = [i for i, t in enumerate(texts) if t is not None]
        found = predict_proba_sorted(clf, [texts[i] for i in rows], batch_size)  # type: ignore[misc]
        probs: list[np.ndarray | None] = [None] * len(buf)
        for i, p in zip(rows, found, strict=True):
            probs[i] = p
        yield from zip(buf, probs, strict=True)

    for item in items:
        buf.append(item)
        if len(buf) >= batch_size * WINDOW_BATCHES:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def proba_in_order(clf: OnnxClassifier, texts: list[Any], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Probabilities exactly as `serve_cli predict/eval` makes them (its windows, batches and batch mates)."""
    if not texts:
        return np.zeros((0, len(clf.labels)), dtype=np.float32)
    return np.stack([p for _, p in predict_in_order(clf, texts, batch_size, lambda t: t)])  # type: ignore[misc]
