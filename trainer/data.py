"""Data for the trainer: rows through the one reader (loraship.rows), labels through the one label map
(loraship.labels), then splits, batches and samplers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from loraship import labels as labels_mod
from loraship import rows as rows_mod
from loraship.labels import LabelError, LabelMap, UnknownLabel
from loraship.rows import Fields, Row

Label = str | int  # a raw label as read: a string, or an integer (JSON number, Parquet int column)


class DataError(ValueError):
    """A problem in an input file, with the file and line (or row) that has it."""


BATCH_ROWS = 10_000  # rows per Arrow record batch and per tokenizer call


def iter_rows(source: str, fields: Fields) -> Iterator[Row]:
    """Checked rows of one split, streamed through the one reader; the first bad row stops training
    with the reader's own words (`file:line: problem`)."""
    try:
        _, rows = rows_mod.read(source, "auto", fields)
        count = 0
        for item in rows:
            if isinstance(item, rows_mod.RowError):
                raise DataError(f"{item.where}: {item.message}")
            count += 1
            yield item
    except rows_mod.InputError as e:
        raise DataError(_with_data_hint(str(e))) from e
    if not count:
        raise DataError(f"{source}: no rows")


def _with_data_hint(message: str) -> str:
    if message.endswith("input file not found"):
        return message.replace("input file not found", "data file not found (set data.data_dir, the LORASHIP_DATA_DIR "
                               "environment variable, or the split's path in the config)")
    return message


@dataclass
class LabeledRows:
    """A whole small split in memory (tests, the export's --eval-file); the trainer streams through data_cache."""

    source: str
    texts: list[str]
    labels: list[Label]
    wheres: list[str]


def load_rows(source: str, text_field: str, label_field: str) -> LabeledRows:
    out = LabeledRows(source, [], [], [])
    for row in iter_rows(source, Fields(text_field, label_field)):
        out.wheres.append(row.where)
        out.texts.append(row.text)
        out.labels.append(row.label)
    return out


def label_map(distinct: Iterable[Label], given: list[str], source: str) -> LabelMap:
    """The run's labels (loraship.labels.from_data), errors as DataError."""
    try:
        return labels_mod.from_data(distinct, given, source)
    except LabelError as e:
        raise DataError(str(e)) from e


UNKNOWN_FIX = "List every label the data uses with data.labels=[...] (in id order), or fix the file"


def encode_labels(rows: LabeledRows, labels: LabelMap, fix: str = UNKNOWN_FIX) -> list[int]:
    """Map raw labels to ids; an unknown label is an error naming file, line, label and the fix."""
    ids = []
    for where, label in zip(rows.wheres, rows.labels, strict=True):
        try:
            ids.append(labels.target(label))
        except UnknownLabel as e:
            raise DataError(str(labels.unknown(where, e.value, fix))) from e
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


def rarest_label(y: np.ndarray) -> np.ndarray:
    """Multi-label stratification key: each row's rarest label (by training frequency), -1 for no label.
    Stratifying on it keeps every label's rare rows in both parts (a documented simpler rule than iterative
    stratification; it holds each label's share within a row or two on GoEmotions-like data)."""
    y = np.asarray(y) > 0
    freq = y.sum(0).astype(float)
    ranked = np.where(y, freq[None, :], np.inf)
    key = ranked.argmin(1)
    return np.where(y.any(1), key, -1)


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
        # Multi-label rows carry a 0/1 row over the labels (BCE targets, float), regression rows a number;
        # single-label rows one id.
        targets = isinstance(items[0]["labels"], (list, float))
        batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.float32 if targets else torch.long)
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
