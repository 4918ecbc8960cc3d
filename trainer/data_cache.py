"""Tokenized splits on disk: each file is read, checked and tokenized once, then memory-mapped.

A split becomes two Arrow files, tokens (token ids, length, raw label, line) and texts, in a directory named by a key
over what decides its content: the file's bytes (sha256; a hub dataset's fingerprint), the text and label
fields, max_length, the tokenizer (its serialized form) and this format's version. A rerun, a resume and
every other process load it instead of tokenizing again: the local main process builds it first
(`local_main_process_first`), the others then find it. Pages are shared through the OS page cache, so N
processes on a node hold one copy, and no process keeps a Python object per row.

Label ids are not part of the key: they are mapped when a split is loaded (vectorized over the distinct
labels), so changing `data.labels` reuses the tokens, and an unknown label is still reported with its
file and line.

Where: `data.cache_dir`, else $HF_DATASETS_CACHE/loraship (default ~/.cache/huggingface/datasets/loraship).
`data.cache=false` builds into RUN_DIR/.data instead and deletes it when the run ends.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset

from loraship.labels import LabelMap, UnknownLabel, fractional, number
from loraship.rows import Fields, Input, list_files, where
from trainer.data import BATCH_ROWS, UNKNOWN_FIX, DataError, Label, iter_rows

CACHE_VERSION = 6
TOKENS_FILE = "tokens.arrow"
TEXTS_FILE = "texts.arrow"
# Rows per Arrow record batch on disk: a training batch reads each of its rows' record batches with a plain
# read (~250 KB here), not through the memory map, whose fault-around maps 64 KB around every touched row
# and so grows the process's RSS with every random row read.
FILE_BATCH_ROWS = 1000
META_FILE = "meta.json"


def default_cache_root() -> Path:
    """$HF_DATASETS_CACHE/loraship, read at call time (tests and users set it after import)."""
    base = os.environ.get("HF_DATASETS_CACHE") or str(Path(os.environ.get("HF_HOME") or "~/.cache/huggingface") / "datasets")
    return Path(base).expanduser() / "loraship"


class TokenizedSplit(Dataset):
    """A split backed by Arrow files; `rows` selects (and orders) the file's rows.

    Whole fixed-width columns (lengths, labels, lines) are read through a memory map, shared by every
    process. Rows (token ids for a batch, texts) are read record batch by record batch with plain reads,
    transiently: RSS stays flat however many rows an epoch touches."""

    def __init__(self, directory: Path, source: str, info: dict[str, Any], rows: np.ndarray | None = None,
                 label_ids: np.ndarray | None = None) -> None:
        self.directory = directory
        # Memory-mapped: pages come from the OS page cache, shared by every process that maps the file.
        self.table = pa.ipc.open_file(pa.memory_map(str(directory / TOKENS_FILE))).read_all()
        self.source = source
        self.info = info
        self.rows = np.arange(self.table.num_rows, dtype=np.int64) if rows is None else rows
        self.label_ids = label_ids
        self.fingerprint = ""  # the source's (file bytes or hub dataset), set by load_or_build
        self.starts = np.cumsum([0] + [len(c) for c in self.table.column("length").chunks])
        self._readers: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # open files stay in their process
        return state

    def _take(self, file: str, column: str, rows: np.ndarray) -> list[Any]:
        """Values of `column` at `rows` (file row numbers), in that order, one record batch read per chunk."""
        if file not in self._readers:
            self._readers[file] = pa.ipc.open_file(pa.OSFile(str(self.directory / file)))
        reader = self._readers[file]
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        out: list[Any] = [None] * len(rows)
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            values = reader.get_batch(int(c)).column(column).take(pa.array(rows[at] - self.starts[c])).to_pylist()
            for j, v in zip(at.tolist(), values, strict=True):
                out[j] = v
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, idx: list[int]) -> list[dict[str, Any]]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        ids = self._take(TOKENS_FILE, "input_ids", rows)
        types = self._take(TOKENS_FILE, "token_type_ids", rows) if "token_type_ids" in self.table.column_names else None
        assert self.label_ids is not None, "labels are mapped before batches are read"
        labels = self.label_ids[rows].tolist()
        items = [{"input_ids": ids[j], "labels": labels[j], "index": i} for j, i in enumerate(idx)]
        if types is not None:
            for item, t in zip(items, types, strict=True):
                item["token_type_ids"] = t
        return items

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def lengths(self) -> np.ndarray:
        return self.table.column("length").to_numpy()[self.rows]

    def labels(self) -> np.ndarray:
        assert self.label_ids is not None
        return self.label_ids[self.rows]

    def texts(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Texts of split positions [start, stop): callers read big splits in slices."""
        return self._take(TEXTS_FILE, "text", self.rows[start:stop])

    def inputs(self, start: int = 0, stop: int | None = None) -> list[Input]:
        """What the model read at split positions [start, stop): texts, or (text, text_pair) pairs."""
        first = self.texts(start, stop)
        if not self.info.get("pair"):
            return list(first)
        return list(zip(first, self._take(TEXTS_FILE, "text_pair", self.rows[start:stop]), strict=True))

    def select(self, positions: np.ndarray) -> TokenizedSplit:
        part = copy.copy(self)
        part.rows = self.rows[positions]
        part._readers = {}
        return part

    def where(self, file_row: int) -> str:
        """`file:line` (or `file row N`) of a row of the file, for messages."""
        line, file_index = (self._take(TOKENS_FILE, c, np.array([file_row]))[0] for c in ("line", "file"))
        return where(self.info["files"][file_index], line, self.info["unit"])

    def assign_targets(self) -> None:
        """Regression: each row's number (loraship.labels.number), mapped per distinct stored value; a value that
        is not a number names its first file:line."""
        col = self.table.column("label")
        codes = pc.dictionary_encode(col).combine_chunks() if col.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
        index = codes.indices.to_numpy(zero_copy_only=False)
        lut = np.zeros(len(codes.dictionary), dtype=np.float32)
        for k, stored in enumerate(codes.dictionary.to_pylist()):
            value = number(decode_label(stored))
            if value is None:
                first = self.where(int(np.flatnonzero(index == k)[0]))
                raise DataError(f"{first}: the regression target {decode_label(stored)!r} is not a number; fix the row, "
                                "or train a classifier with data.task=single_label")
            lut[k] = value
        self.label_ids = lut[index]

    def assign_labels(self, labels: LabelMap, multi: bool = False) -> None:
        """Label ids for every row, mapped per distinct label (loraship.labels' rule): one id per row, or with
        `multi` a 0/1 row over the labels. An unknown label names its first file:line."""
        col = self.table.column("label")
        codes = pc.dictionary_encode(col).combine_chunks() if col.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
        index = codes.indices.to_numpy(zero_copy_only=False)
        lut = np.zeros((len(codes.dictionary), len(labels)) if multi else len(codes.dictionary), dtype=np.float32 if multi else np.int64)
        for k, stored in enumerate(codes.dictionary.to_pylist()):
            value = decode_label(stored)
            try:
                lut[k] = labels.target(value, multi)
            except UnknownLabel as e:
                first = self.where(int(np.flatnonzero(index == k)[0]))
                if isinstance(value, list) and not multi:
                    raise DataError(f"{first}: a list of labels in a single-label run; "
                                    "set data.task=multi_label (or auto) to train a multi-label model") from e
                raise DataError(str(labels.unknown(first, e.value, UNKNOWN_FIX))) from e
        self.label_ids = lut[index]


LIST_MARK = "\x1e"  # a stored label starting with this is a JSON list (multi-label)


def encode_label(label: Label | list[Label]) -> str:
    """A label as the cache stores it: text (a JSON integer and the same digits in CSV are one value), or a
    marked JSON list."""
    return LIST_MARK + json.dumps(label) if isinstance(label, list) else str(label)


def decode_label(stored: str) -> Any:
    return json.loads(stored[1:]) if stored.startswith(LIST_MARK) else stored


def file_fingerprint(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.backend_tokenizer.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}|{tokenizer.truncation_side}|{tokenizer.model_input_names}"
    return hashlib.sha256((text + extra).encode()).hexdigest()


def source_fingerprint(source: str) -> str:
    if source.startswith("hub:"):
        import datasets

        name, _, split = source[4:].partition(":")
        return f"hub:{name}:{split}:" + datasets.load_dataset(name, split=split or "train")._fingerprint
    path = Path(source)
    if path.is_dir():
        h = hashlib.sha256()
        for p in list_files(path):
            h.update(f"{p.relative_to(path)}\0{file_fingerprint(p)}\0".encode())
        return "dir:sha256:" + h.hexdigest()
    if not path.is_file():
        next(iter_rows(source, Fields("x", "x")))  # raises the reader's 'data file not found' error
    return file_fingerprint(path)


Encoder = Callable[[list[str], "list[str] | None"], tuple[list[list[int]], list[list[int]] | None]]


def make_encoder(tokenizer: Any, max_length: int, pair: bool = False) -> Encoder:
    """Token ids (and type ids when the tokenizer makes non-zero ones: pairs, for BERT-like tokenizers) for a
    batch of texts or of pairs (texts, pairs), exactly as `tokenizer(texts, pairs, truncation=True,
    max_length=...)`: a pair is `[CLS] a [SEP] b [SEP]`, truncated longest-first. A fast tokenizer's own copy
    encodes in its Rust thread pool on every core (TOKENIZERS_PARALLELISM)."""
    if getattr(tokenizer, "is_fast", False):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # our own copy: settings stay ours
        backend.no_padding()
        backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        types = any((backend.encode("a", "b") if pair else backend.encode("a b")).type_ids)

        def fast(texts: list[str], pairs: list[str] | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
            encs = encode(list(zip(texts, pairs, strict=True)) if pairs is not None else texts)
            return [e.ids for e in encs], ([e.type_ids for e in encs] if types else None)

        return fast
    types = any((tokenizer("a", "b") if pair else tokenizer("a b")).get("token_type_ids") or [])

    def slow(texts: list[str], pairs: list[str] | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        return enc["input_ids"], (enc["token_type_ids"] if types else None)

    return slow


def _record_batches(lines: list[int], files: list[int], texts: list[str], labels: list[Label], pairs: list[str],
                    encoder: Callable[..., Any]) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """(tokens, texts) record batches of the same rows. A label is kept as text: the label map treats a JSON
    integer and the same digits in a CSV cell alike (a regression target is parsed back into its number)."""
    ids, types = encoder(texts, pairs or None)
    cols = {
        "label": pa.array([encode_label(x) for x in labels], pa.string()),
        "line": pa.array(lines, pa.int64()),
        "file": pa.array(files, pa.int32()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "length": pa.array([len(x) for x in ids], pa.int32()),
    }
    if types is not None:
        cols["token_type_ids"] = pa.array(types, pa.list_(pa.int8()))
    text_cols = {"text": pa.array(texts, pa.string())}
    if pairs:
        text_cols["text_pair"] = pa.array(pairs, pa.string())
    return pa.RecordBatch.from_pydict(cols), pa.RecordBatch.from_pydict(text_cols)


def build_split(source: str, fields: Fields, encoder: Callable[..., Any], out: Path, progress: bool) -> dict[str, Any]:
    """Stream one split into out/tokens.arrow, BATCH_ROWS rows at a time; memory stays flat in the row count."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out.mkdir(parents=True)
    distinct: dict[str, Any] = {}  # stored label -> the value as read
    files: dict[str, int] = {}
    unit = "line"
    n = 0
    writers: list[Any] = []
    buf: tuple[list[int], list[int], list[str], list[Label], list[str]] = ([], [], [], [], [])
    bar = tqdm(desc=f"tokenizing {Path(source).name}", unit=" rows", disable=not progress, mininterval=2.0)
    with (out / TOKENS_FILE).open("wb") as tokens, (out / TEXTS_FILE).open("wb") as texts:
        for row in iter_rows(source, fields):
            unit = row.unit
            buf[0].append(row.line)
            buf[1].append(files.setdefault(row.file, len(files)))
            buf[2].append(row.text)
            buf[3].append(row.label)
            if row.text_pair is not None:
                buf[4].append(row.text_pair)
            distinct.setdefault(encode_label(row.label), row.label)
            if len(buf[0]) == BATCH_ROWS:
                writers = _write(writers, (tokens, texts), _record_batches(*buf, encoder))
                n, buf = n + BATCH_ROWS, ([], [], [], [], [])
                bar.update(BATCH_ROWS)
        if buf[0]:
            writers = _write(writers, (tokens, texts), _record_batches(*buf, encoder))
            n += len(buf[0])
            bar.update(len(buf[0]))
        for w in writers:
            w.close()
    bar.close()
    info = {
        "rows": n,
        "unit": unit,
        "files": list(files),
        "labels": list(distinct.values())[:100_000],
        "multi": any(isinstance(v, list) for v in distinct.values()),
        "fractional": fractional(distinct.values()),  # numbers with fractions: a regression target (data.task=auto)
        "pair": fields.text_pair is not None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / META_FILE).write_text(json.dumps(info))
    return info


def _write(writers: list[Any], sinks: tuple[Any, Any], batches: tuple[pa.RecordBatch, pa.RecordBatch]) -> list[Any]:
    if not writers:
        writers = [pa.ipc.new_file(sink, b.schema) for sink, b in zip(sinks, batches, strict=True)]
    for w, b in zip(writers, batches, strict=True):
        w.write_table(pa.Table.from_batches([b]), max_chunksize=FILE_BATCH_ROWS)
    return writers


def load_split(directory: Path, source: str) -> TokenizedSplit:
    info = json.loads((directory / META_FILE).read_text())
    return TokenizedSplit(directory, source, info)


HOST = socket.gethostname().replace(".", "_")  # partial builds are named by host and pid: a shared cache serves many hosts


def _remove_stale_partials(root: Path, key: str) -> None:
    """Partial builds of this host's processes that died (killed mid-build) are removed; live ones, and those
    of other hosts (a shared cache: their pids mean nothing here), are left alone."""
    for p in root.glob(f".{key}.{HOST}.*.partial"):
        try:
            os.kill(int(p.name.split(".")[-2]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def load_or_build(source: str, fields: Fields, max_length: int, tokenizer: Any, root: Path,
                  progress: bool) -> tuple[TokenizedSplit, str]:
    """The split from the cache, building it first when missing; returns it and 'hit' or 'built'."""
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(source),
        "fields": dataclasses.asdict(fields),
        "max_length": max_length,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    target = root / key
    if (target / META_FILE).is_file():
        split = load_split(target, source)
        split.fingerprint = parts["source"]
        return split, "hit"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, key)
    tmp = root / f".{key}.{HOST}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_split(source, fields, make_encoder(tokenizer, max_length, fields.text_pair is not None), tmp, progress)
        (tmp / "key.json").write_text(json.dumps(parts, indent=2))
        try:
            os.rename(tmp, target)  # atomic: readers see a whole split or none
        except OSError:
            if not (target / META_FILE).is_file():  # not another builder's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    split = load_split(target, source)
    split.fingerprint = parts["source"]
    return split, "built"

