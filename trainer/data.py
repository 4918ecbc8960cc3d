"""Data for the trainer: load labeled text files, check them row by row, tokenize, batch.

JSON Lines (.jsonl, or .json holding one object per line) are read line by line so that a malformed
line is reported with its number; a .json file holding one array of objects is read whole (errors name
the item). .csv/.tsv/.parquet go through `datasets`; 'hub:ID[:split]' loads a hub dataset. A UTF-8
byte-order mark is ignored; a `ClassLabel` label column gives its names.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class DataError(ValueError):
    """A problem in an input file, with the file and line (or row) that has it."""


@dataclass
class LabeledRows:
    """Texts and raw labels of one split, with where each row came from for error messages."""

    source: str
    texts: list[str]
    labels: list[Any]
    lines: list[int]  # 1-based line (JSONL, CSV), row (Parquet, hub) or item (JSON array) of each row
    unit: str = "line"

    def where(self, i: int) -> str:
        return f"{self.source}:{self.lines[i]}" if self.unit == "line" else f"{self.source} {self.unit} {self.lines[i]}"


BOM = "\ufeff"  # UTF-8 byte-order mark: Excel's CSV and some JSONL exports start with it


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from e
            if lineno == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _read_json_array(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file holding one array of objects; rows are numbered by item (1-based)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON Lines, got a {type(data).__name__}")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").removeprefix(BOM).lstrip()
    return head.startswith("[")


def _class_label_names(ds: Any, label_field: str) -> list[str] | None:
    """A hub or Parquet dataset whose label column is a `ClassLabel` carries the label names itself."""
    import datasets

    feature = ds.features.get(label_field)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _dataset_records(ds: Any, label_field: str, first: int) -> Iterator[tuple[int, dict[str, Any]]]:
    names = _class_label_names(ds, label_field)
    # A BOM in a CSV header makes the first column '\ufefftext'.
    renames = {c: c.removeprefix(BOM) for c in ds.column_names if c.startswith(BOM)}
    if renames:
        ds = ds.rename_columns(renames)
    for i, rec in enumerate(ds):
        if names is not None and isinstance(rec.get(label_field), int) and 0 <= rec[label_field] < len(names):
            rec = {**rec, label_field: names[rec[label_field]]}
        yield i + first, rec


def load_rows(source: str, text_field: str, label_field: str) -> LabeledRows:
    """Read one split and check every row: field present, text non-empty, label present."""
    if source.startswith("hub:"):
        import datasets

        _, _, spec = source.partition(":")
        name, _, split = spec.partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        records: Iterator[tuple[int, dict[str, Any]]] = _dataset_records(ds, label_field, 1)
        rows = LabeledRows(source, [], [], [], unit="row")
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(
                f"{path}: data file not found (set data.data_dir, the LORASHIP_DATA_DIR environment variable, "
                "or the split's path in the config)"
            )
        suffix = path.suffix.lower()
        rows = LabeledRows(str(path), [], [], [])
        if suffix == ".json" and _starts_with_array(path):
            records = _read_json_array(path)
            rows.unit = "item"
        elif suffix in (".jsonl", ".json"):
            records = _read_jsonl(path)
        elif suffix in (".csv", ".tsv", ".parquet"):
            import datasets

            if suffix == ".parquet":
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
                rows.unit = "row"
                records = _dataset_records(ds, label_field, 1)
            else:
                ds = datasets.load_dataset(
                    "csv", data_files=str(path), split="train", delimiter="\t" if suffix == ".tsv" else ","
                )
                # Line numbers assume one physical line per row after the header.
                records = _dataset_records(ds, label_field, 2)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    for lineno, rec in records:
        where = f"{rows.source}:{lineno}" if rows.unit == "line" else f"{rows.source} {rows.unit} {lineno}"
        for fname in (text_field, label_field):
            if fname not in rec or rec[fname] is None:
                raise DataError(f"{where}: missing field {fname!r} (fields: {', '.join(map(str, rec))})")
        text = rec[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: field {text_field!r} is empty")
        label = rec[label_field]
        if isinstance(label, str) and not label.strip():
            raise DataError(f"{where}: field {label_field!r} is empty")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{where}: field {label_field!r} must be a string or an integer, got {label!r}")
        rows.texts.append(text)
        rows.labels.append(label)
        rows.lines.append(lineno)
    if not rows.texts:
        raise DataError(f"{rows.source}: no rows")
    return rows


def label_names(train: LabeledRows, given: list[str]) -> list[str]:
    """The label set: as given in config, else the distinct training labels sorted (stable across runs)."""
    if given:
        return list(given)
    distinct = {str(x) for x in train.labels}
    if all(isinstance(x, int) for x in train.labels):
        return [str(x) for x in sorted({int(x) for x in train.labels})]
    return sorted(distinct)


def encode_labels(rows: LabeledRows, label2id: dict[str, int]) -> list[int]:
    """Map raw labels to ids; an unknown label is an error naming file, line and label.

    Names match first; an integer that is not a name is an index into the label names (AG News on the hub
    stores 0..3 for World, Sports, Business, Sci/Tech)."""
    ids = []
    for i, label in enumerate(rows.labels):
        key = str(label)
        if key in label2id:
            ids.append(label2id[key])
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(label2id):
            ids.append(label)
        else:
            raise DataError(
                f"{rows.where(i)}: label {key!r} is not one the model knows ({', '.join(label2id)}); "
                f"integer labels index these names (0..{len(label2id) - 1})"
            )
    return ids


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation): `fraction` of each class to validation, at least one row per class."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return sorted(train_idx), sorted(val_idx)


class EncodedDataset(Dataset):
    """Token ids per row (unpadded) and the label id; padding happens per batch in `collate`."""

    def __init__(self, input_ids: list[list[int]], labels: list[int], extra: dict[str, list[list[int]]]) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.extra = extra  # token_type_ids for BERT-like models

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}
        for k, v in self.extra.items():
            item[k] = v[i]
        return item

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> EncodedDataset:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    extra = {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}
    return EncodedDataset(enc["input_ids"], labels, extra)


def make_collate(pad_token_id: int, token_type_ids: bool):
    """Dynamic padding: pad each batch only to its longest row. `token_type_ids` only for models that take them."""

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        batch: dict[str, torch.Tensor] = {}
        ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for j, it in enumerate(items):
            n = len(it["input_ids"])
            ids[j, :n] = torch.tensor(it["input_ids"])
            mask[j, :n] = 1
        batch["input_ids"] = ids
        batch["attention_mask"] = mask
        if token_type_ids and "token_type_ids" in items[0]:
            tt = torch.zeros((len(items), width), dtype=torch.long)
            for j, it in enumerate(items):
                tt[j, : len(it["token_type_ids"])] = torch.tensor(it["token_type_ids"])
            batch["token_type_ids"] = tt
        batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        # Row index in the split: evaluation runs in length order and maps predictions back with it.
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch

    return collate


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which each run of `group` consecutive indices has similar lengths.

    The data are shuffled, cut into mega-chunks of 50 groups, each chunk sorted by length and cut into
    groups, and the groups shuffled. The DataLoader's batches (group = batch size x processes) then hold
    rows of similar length: far less padding than random batches, still random across the epoch.
    Deterministic given (seed, epoch) so a resumed run sees the same order.
    """

    def __init__(self, lengths: list[int], group: int, seed: int, shuffle: bool = True) -> None:
        self.lengths = lengths
        self.group = group
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.lengths)
        if not self.shuffle:
            yield from sorted(range(n), key=lambda i: -self.lengths[i])
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        chunk = self.group * 50
        groups: list[list[int]] = []
        for start in range(0, n, chunk):
            part = sorted(order[start : start + chunk].tolist(), key=lambda i: -self.lengths[i])
            groups.extend(part[k : k + self.group] for k in range(0, len(part), self.group))
        # The last group may be short; keep it last so every other batch is full.
        last = groups.pop() if len(groups) > 1 and len(groups[-1]) < self.group else None
        for gi in rng.permutation(len(groups)):
            yield from groups[gi]
        if last is not None:
            yield from last


class ShuffleSampler(Sampler[int]):
    """Plain seeded shuffle, deterministic per (seed, epoch); used when length grouping is off."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()


def steps_per_epoch(n_rows: int, batch_size: int, num_processes: int, grad_accum: int) -> int:
    batches = math.ceil(n_rows / (batch_size * num_processes))
    return math.ceil(batches / grad_accum)
