"""Tokenized splits on disk: each file is read, checked and tokenized once, then memory-mapped.

A split becomes one Arrow file (text, raw label, line, token ids, length) in a directory named by a key
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

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset

from trainer.data import BATCH_ROWS, DataError, Label, Source, iter_rows, label_id, unknown_label

CACHE_VERSION = 1
TOKENS_FILE = "tokens.arrow"
META_FILE = "meta.json"


def default_cache_root() -> Path:
    """$HF_DATASETS_CACHE/loraship, read at call time (tests and users set it after import)."""
    base = os.environ.get("HF_DATASETS_CACHE") or str(Path(os.environ.get("HF_HOME") or "~/.cache/huggingface") / "datasets")
    return Path(base).expanduser() / "loraship"


class TokenizedSplit(Dataset):
    """A split backed by a memory-mapped Arrow table; `rows` selects (and orders) table rows.

    Batches are fetched with one `take` per batch (`__getitems__`), not row by row."""

    def __init__(self, table: pa.Table, source: Source, info: dict[str, Any], rows: np.ndarray | None = None,
                 label_ids: np.ndarray | None = None) -> None:
        self.table = table
        self.source = source
        self.info = info
        self.rows = np.arange(table.num_rows, dtype=np.int64) if rows is None else rows
        self.label_ids = label_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, idx: list[int]) -> list[dict[str, Any]]:
        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        part = self.table.take(pa.array(rows))
        ids = part.column("input_ids").to_pylist()
        types = part.column("token_type_ids").to_pylist() if "token_type_ids" in part.column_names else None
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
        return self.table.column("text").take(pa.array(self.rows[start:stop])).to_pylist()

    def select(self, positions: np.ndarray) -> TokenizedSplit:
        return TokenizedSplit(self.table, self.source, self.info, self.rows[positions], self.label_ids)

    def assign_labels(self, label2id: dict[str, int]) -> None:
        """Label ids for every row, mapped per distinct label; an unknown one names its first file:line."""
        col = self.table.column("label")
        codes = pc.dictionary_encode(col).combine_chunks() if col.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
        is_int = pc.is_valid(self.table.column("label_int")).to_numpy(zero_copy_only=False)
        lut = np.empty(len(codes.dictionary), dtype=np.int64)
        index = codes.indices.to_numpy(zero_copy_only=False)
        for k, value in enumerate(codes.dictionary.to_pylist()):
            rows_k = index == k
            as_str = label_id(value, label2id)
            as_int = label_id(int(value), label2id) if value.lstrip("-").isdigit() else None
            # A name matches as written; a number only indexes the names where it was an integer.
            if as_str is not None:
                lut[k] = as_str
            elif as_int is not None and is_int[rows_k].all():
                lut[k] = as_int
            else:
                bad = np.flatnonzero(rows_k & ~is_int) if as_int is not None else np.flatnonzero(rows_k)
                line = self.table.column("line")[int(bad[0])].as_py()
                raise unknown_label(self.source.where(line), value, label2id)
        self.label_ids = lut[index]


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
    if not path.is_file():
        iter_rows(source, "", "")  # raises the usual 'data file not found' error
    return file_fingerprint(path)


def make_encoder(tokenizer: Any, max_length: int) -> Callable[[list[str]], tuple[list[list[int]], list[list[int]] | None]]:
    """Token ids (and type ids when the model's tokenizer makes non-zero ones) for a batch of texts,
    exactly as `tokenizer(texts, truncation=True, max_length=...)`. A fast tokenizer's own copy encodes in
    its Rust thread pool on every core (TOKENIZERS_PARALLELISM)."""
    if getattr(tokenizer, "is_fast", False):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # our own copy: settings stay ours
        backend.no_padding()
        backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        types = any(backend.encode("a b").type_ids)

        def fast(texts: list[str]) -> tuple[list[list[int]], list[list[int]] | None]:
            encs = encode(texts)
            return [e.ids for e in encs], ([e.type_ids for e in encs] if types else None)

        return fast
    types = any(tokenizer("a b").get("token_type_ids") or [])

    def slow(texts: list[str]) -> tuple[list[list[int]], list[list[int]] | None]:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return enc["input_ids"], (enc["token_type_ids"] if types else None)

    return slow


def _record_batch(lines: list[int], texts: list[str], labels: list[Label], encoder: Callable[..., Any]) -> pa.RecordBatch:
    ids, types = encoder(texts)
    cols = {
        "text": pa.array(texts, pa.string()),
        "label": pa.array([str(x) for x in labels], pa.string()),
        "label_int": pa.array([x if isinstance(x, int) else None for x in labels], pa.int64()),
        "line": pa.array(lines, pa.int64()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "length": pa.array([len(x) for x in ids], pa.int32()),
    }
    if types is not None:
        cols["token_type_ids"] = pa.array(types, pa.list_(pa.int8()))
    return pa.RecordBatch.from_pydict(cols)


def build_split(source: str, text_field: str, label_field: str, encoder: Callable[..., Any], out: Path, progress: bool) -> dict[str, Any]:
    """Stream one split into out/tokens.arrow, BATCH_ROWS rows at a time; memory stays flat in the row count."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src, rows = iter_rows(source, text_field, label_field)
    out.mkdir(parents=True)
    distinct: dict[Label, None] = {}
    n = 0
    writer = None
    buf: tuple[list[int], list[str], list[Label]] = ([], [], [])
    bar = tqdm(desc=f"tokenizing {Path(src.name).name}", unit=" rows", disable=not progress, mininterval=2.0)
    with (out / TOKENS_FILE).open("wb") as sink:
        for line, text, label in rows:
            buf[0].append(line)
            buf[1].append(text)
            buf[2].append(label)
            distinct.setdefault(label)
            if len(buf[0]) == BATCH_ROWS:
                writer = _write(writer, sink, _record_batch(*buf, encoder))
                n, buf = n + BATCH_ROWS, ([], [], [])
                bar.update(BATCH_ROWS)
        if buf[0]:
            writer = _write(writer, sink, _record_batch(*buf, encoder))
            n += len(buf[0])
            bar.update(len(buf[0]))
        if writer is not None:
            writer.close()
    bar.close()
    info = {
        "rows": n,
        "unit": src.unit,
        "labels": list(distinct)[:100_000],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / META_FILE).write_text(json.dumps(info))
    return info


def _write(writer: Any, sink: Any, batch: pa.RecordBatch) -> Any:
    if writer is None:
        writer = pa.ipc.new_file(sink, batch.schema)
    writer.write_batch(batch)
    return writer


def load_split(directory: Path, source: str) -> TokenizedSplit:
    info = json.loads((directory / META_FILE).read_text())
    # Memory-mapped: pages come from the OS page cache, shared by every process that maps the file.
    table = pa.ipc.open_file(pa.memory_map(str(directory / TOKENS_FILE))).read_all()
    return TokenizedSplit(table, Source(source, info["unit"]), info)


def _remove_stale_partials(root: Path, key: str) -> None:
    """Partial builds of processes that died (killed mid-build) are removed; live ones are left alone."""
    for p in root.glob(f".{key}.*.partial"):
        try:
            os.kill(int(p.name.split(".")[-2]), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def load_or_build(source: str, text_field: str, label_field: str, max_length: int, tokenizer: Any, root: Path,
                  progress: bool) -> tuple[TokenizedSplit, str]:
    """The split from the cache, building it first when missing; returns it and 'hit' or 'built'."""
    parts = {
        "version": CACHE_VERSION,
        "source": source_fingerprint(source),
        "text_field": text_field,
        "label_field": label_field,
        "max_length": max_length,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    target = root / key
    if (target / META_FILE).is_file():
        return load_split(target, source), "hit"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, key)
    tmp = root / f".{key}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_split(source, text_field, label_field, make_encoder(tokenizer, max_length), tmp, progress)
        (tmp / "key.json").write_text(json.dumps(parts, indent=2))
        try:
            os.rename(tmp, target)  # atomic: readers see a whole split or none
        except OSError:
            if not (target / META_FILE).is_file():  # not another builder's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_split(target, source), "built"


__all__ = ["DataError", "TokenizedSplit", "default_cache_root", "load_or_build"]
