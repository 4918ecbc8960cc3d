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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


class DataError(ValueError):
    """A problem in an input file, with the file and line (or row) that has it."""


# A raw label as read: a string, or an integer (JSON number, Parquet int column, integer-looking CSV cell).
Label = str | int
BOM = "\ufeff"  # UTF-8 byte-order mark: Excel's CSV and some JSONL exports start with it
BATCH_ROWS = 10_000  # rows per Arrow record batch and per tokenizer call


@dataclass
class Source:
    """One data source: a display name and how rows are numbered in error messages."""

    name: str
    unit: str = "line"  # line (JSONL, CSV), row (Parquet, hub) or item (JSON array)

    def where(self, n: int) -> str:
        return f"{self.name}:{n}" if self.unit == "line" else f"{self.name} {self.unit} {n}"


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
    """A .json file holding one array of objects (read whole: arrays are small); rows numbered by item."""
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


def _batch_records(batches: Iterator[Any], first: int, fields: tuple[str, str],
                   names: list[str] | None, int_like_strings: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of Arrow record batches (CSV, Parquet, hub) as numbered dicts of the two fields we read.

    `names`: a ClassLabel's names, which integer labels are mapped to. `int_like_strings`: CSV cells are
    text, so a label cell holding a whole number counts as an integer label (it may index the label names)."""
    n = first
    for batch in batches:
        cols = {f: batch.column(f).to_pylist() if f in batch.schema.names else None for f in fields}
        available = ", ".join(batch.schema.names)
        for i in range(batch.num_rows):
            rec: dict[str, Any] = {f: col[i] for f, col in cols.items() if col is not None}
            label = rec.get(fields[1])
            if names is not None and isinstance(label, int) and 0 <= label < len(names):
                rec[fields[1]] = names[label]
            elif int_like_strings and isinstance(label, str) and label.strip().lstrip("-").isdigit():
                rec[fields[1]] = int(label)
            yield n, rec if len(rec) == 2 else {**rec, "__fields__": available}
            n += 1


def _parquet_class_names(path: Path, label_field: str) -> list[str] | None:
    """ClassLabel names that `datasets` stores in a Parquet file's schema metadata."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    try:
        feature = json.loads(meta[b"huggingface"])["info"]["features"][label_field]
    except (KeyError, ValueError, TypeError):
        return None
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None


def _hub_records(spec: str, fields: tuple[str, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    feature = ds.features.get(fields[1])
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    batches = (b for b in ds.with_format("arrow").iter(batch_size=BATCH_ROWS))
    return _batch_records(batches, 1, fields, names, False)


def open_records(source: str, text_field: str, label_field: str) -> tuple[Source, Iterator[tuple[int, dict[str, Any]]]]:
    """The numbered records of one split, streamed (JSON arrays excepted), without checking them yet."""
    fields = (text_field, label_field)
    if source.startswith("hub:"):
        return Source(source, "row"), _hub_records(source.partition(":")[2], fields)
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"{path}: data file not found (set data.data_dir, the LORASHIP_DATA_DIR environment variable, "
            "or the split's path in the config)"
        )
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with_array(path):
        return Source(str(path), "item"), _read_json_array(path)
    if suffix in (".jsonl", ".json"):
        return Source(str(path)), _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = [f for f in fields if f in pf.schema_arrow.names]
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)
        return Source(str(path), "row"), _batch_records(batches, 1, fields, _parquet_class_names(path, label_field), False)
    if suffix in (".csv", ".tsv"):
        import pyarrow as pa
        import pyarrow.csv as pcsv

        try:
            reader = pcsv.open_csv(
                path,
                parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                # Text and label stay text (a label column of digits must not become float on one block).
                convert_options=pcsv.ConvertOptions(column_types={f: pa.string() for f in fields}),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read as {suffix[1:].upper()}: {e}") from e
        # Line numbers assume one physical line per row after the header.
        return Source(str(path)), _batch_records(_csv_batches(reader, path), 2, fields, None, True)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def _csv_batches(reader: Any, path: Path) -> Iterator[Any]:
    import pyarrow as pa

    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: malformed {path.suffix[1:].upper()}: {e}") from e


def check_row(where: str, rec: dict[str, Any], text_field: str, label_field: str) -> tuple[str, Label]:
    """The (text, label) of one record, or a DataError naming the row and the field."""
    for fname in (text_field, label_field):
        if fname not in rec or rec[fname] is None:
            fields = rec.get("__fields__") or ", ".join(map(str, rec))
            raise DataError(f"{where}: missing field {fname!r} (fields: {fields})")
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
    return text, label


def iter_rows(source: str, text_field: str, label_field: str) -> tuple[Source, Iterator[tuple[int, str, Label]]]:
    """Checked rows of one split, streamed: (line or row number, text, raw label)."""
    src, records = open_records(source, text_field, label_field)

    def rows() -> Iterator[tuple[int, str, Label]]:
        count = 0
        for n, rec in records:
            text, label = check_row(src.where(n), rec, text_field, label_field)
            count += 1
            yield n, text, label
        if not count:
            raise DataError(f"{src.name}: no rows")

    return src, rows()


@dataclass
class LabeledRows:
    """A whole small split in memory (tests, the first-run helper); the trainer streams through data_cache."""

    source: Source
    texts: list[str]
    labels: list[Label]
    lines: list[int]


def load_rows(source: str, text_field: str, label_field: str) -> LabeledRows:
    src, rows = iter_rows(source, text_field, label_field)
    out = LabeledRows(src, [], [], [])
    for n, text, label in rows:
        out.lines.append(n)
        out.texts.append(text)
        out.labels.append(label)
    return out


def label_names(distinct: Iterable[Label], given: list[str]) -> list[str]:
    """The label set: as given in config, else the distinct training labels sorted (stable across runs);
    integer labels sort numerically."""
    if given:
        return list(given)
    values = set(distinct)
    if values and all(isinstance(x, int) for x in values):
        return [str(x) for x in sorted(values)]  # type: ignore[type-var]
    return sorted({str(x) for x in values})


def label_id(label: Label, label2id: dict[str, int]) -> int | None:
    """Names match first; an integer that is not a name indexes the label names (AG News on the hub
    stores 0..3 for World, Sports, Business, Sci/Tech). None: not a label the model knows."""
    key = str(label)
    if key in label2id:
        return label2id[key]
    if isinstance(label, int) and 0 <= label < len(label2id):
        return label
    return None


def unknown_label(where: str, label: Label, label2id: dict[str, int]) -> DataError:
    return DataError(
        f"{where}: label {str(label)!r} is not one the model knows ({', '.join(label2id)}); "
        f"integer labels index these names (0..{len(label2id) - 1})"
    )


def encode_labels(rows: LabeledRows, label2id: dict[str, int]) -> list[int]:
    """Map raw labels to ids; an unknown label is an error naming file, line and label."""
    ids = []
    for n, label in zip(rows.lines, rows.labels, strict=True):
        k = label_id(label, label2id)
        if k is None:
            raise unknown_label(rows.source.where(n), label, label2id)
        ids.append(k)
    return ids


def stratified_split(labels: np.ndarray | Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): `fraction` of each class to validation, at least one row per class.

    numpy index arrays (no Python object per row); the shuffle is Python's seeded one, so the split is the
    same as before the data moved to Arrow."""
    rng = random.Random(seed)
    y = np.asarray(labels)
    train_parts, val_parts = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)  # type: ignore[arg-type]
        n_val = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


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

    def __init__(self, lengths: np.ndarray | Sequence[int], group: int, seed: int, shuffle: bool = True) -> None:
        self.lengths = np.asarray(lengths)
        self.group = group
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        # numpy throughout: no Python object per row (millions of rows), the same order as a stable sort.
        n = len(self.lengths)
        if not self.shuffle:
            yield from np.argsort(-self.lengths, kind="stable").tolist()
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        chunk = self.group * 50
        flat = np.concatenate([
            part[np.argsort(-self.lengths[part], kind="stable")] for part in (order[s : s + chunk] for s in range(0, n, chunk))
        ]) if n else order
        # Chunks are whole groups, so the groups are consecutive slices of `flat`; only the last may be short.
        starts = np.arange(0, n, self.group)
        last = len(starts) > 1 and n - starts[-1] < self.group
        body = starts[:-1] if last else starts
        for gi in rng.permutation(len(body)):
            yield from flat[body[gi] : body[gi] + self.group].tolist()
        if last:
            yield from flat[starts[-1] :].tolist()


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
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for s in range(0, self.n, BATCH_ROWS):
            yield from perm[s : s + BATCH_ROWS].tolist()


def steps_per_epoch(n_rows: int, batch_size: int, num_processes: int, grad_accum: int) -> int:
    batches = math.ceil(n_rows / (batch_size * num_processes))
    return math.ceil(batches / grad_accum)
