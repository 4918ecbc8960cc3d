"""Streaming readers for JSONL, CSV/TSV and plain text, and atomic output files.

Every input row comes out as a `Row` or a `RowError` carrying its 1-based line number, so nothing is
lost silently: rows in = rows predicted + rows in error. Files are read as bytes and decoded line by
line, so one line of invalid UTF-8 is one bad row, not a crashed run.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from serve_cli.fsutil import check_not_locked, public_mode

FORMATS = ("auto", "jsonl", "csv", "tsv", "txt")
BOM = "\ufeff"  # UTF-8 byte-order mark: Excel's CSV and some JSONL exports start with it


class InputError(ValueError):
    """A problem with the whole input (missing file, missing column), not with one row."""


@dataclass
class Row:
    line: int
    id: Any
    text: str
    label: Any = None


@dataclass
class RowError:
    line: int
    message: str


def detect_format(path: str, fmt: str, first_line: bytes) -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix == "" and first_line.lstrip().startswith(b"{"):
        return "jsonl"
    return "txt"


def open_binary(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: input file not found")
    return p.open("rb")


class _Peekable:
    """A binary line source whose first line can be looked at before reading starts."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.first = f.readline()

    def __iter__(self) -> Iterator[bytes]:
        if self.first:
            yield self.first
        yield from self.f


def check_text(text: Any, field: str) -> str | None:
    """None when `text` is a usable text, else the error message (both engines use these words)."""
    if text is None:
        return f"missing field {field!r}"
    if not isinstance(text, str):
        return f"field {field!r} must be a string, got {type(text).__name__}"
    if not text.strip():
        return f"field {field!r} is empty"
    return None


def read_rows(
    path: str,
    fmt: str,
    text_field: str = "text",
    id_field: str | None = None,
    label_field: str | None = None,
) -> tuple[str, Iterator[Row | RowError]]:
    """(resolved format, iterator of rows) for a file or '-' (stdin)."""
    source = _Peekable(open_binary(path))
    fmt = detect_format(path, fmt, source.first)
    if fmt == "jsonl":
        if source.first.decode("utf-8", errors="replace").removeprefix(BOM).lstrip().startswith("["):
            raise InputError(f"{path}: a JSON array; serve_cli streams JSON Lines (one object per line). "
                             f"Convert it with: jq -c '.[]' {path} > {Path(path).stem}.jsonl")
        return fmt, _jsonl(source, text_field, id_field, label_field)
    if fmt in ("csv", "tsv"):
        return fmt, _csv(path, source, "\t" if fmt == "tsv" else ",", text_field, id_field, label_field)
    if label_field:
        raise InputError(f"{path}: plain text has no labels; use JSONL or CSV with a {label_field!r} field")
    return fmt, _txt(source)


def _decode(raw: bytes, lineno: int) -> tuple[str | None, RowError | None]:
    try:
        text = raw.decode("utf-8")
        return (text.removeprefix(BOM) if lineno == 1 else text), None
    except UnicodeDecodeError as e:
        return None, RowError(lineno, f"invalid UTF-8 ({e.reason} at byte {e.start})")


def _text_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, str] | RowError]:
    """(line number, decoded line) for each non-blank line; a RowError for a line that is not UTF-8."""
    for lineno, raw in enumerate(lines, start=1):
        line, err = _decode(raw, lineno)
        if err:
            yield err
        elif line and line.strip():  # blank lines are not rows
            yield lineno, line


def _jsonl(lines: Iterable[bytes], text_field: str, id_field: str | None, label_field: str | None) -> Iterator[Row | RowError]:
    for item in _text_lines(lines):
        if isinstance(item, RowError):
            yield item
            continue
        lineno, line = item
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield RowError(lineno, f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield RowError(lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        problem = check_text(obj.get(text_field), text_field)
        if problem is None and id_field and id_field not in obj:
            problem = f"missing field {id_field!r}"
        if problem is None and label_field and obj.get(label_field) is None:
            problem = f"missing field {label_field!r}"
        if problem:
            yield RowError(lineno, problem)
            continue
        yield Row(lineno, obj[id_field] if id_field else lineno, obj[text_field], obj.get(label_field) if label_field else None)


def _txt(lines: Iterable[bytes]) -> Iterator[Row | RowError]:
    for item in _text_lines(lines):
        yield item if isinstance(item, RowError) else Row(item[0], item[0], item[1].rstrip("\r\n"))


def _csv(path: str, lines: Iterable[bytes], delimiter: str, text_field: str, id_field: str | None, label_field: str | None) -> Iterator[Row | RowError]:
    bad_lines: dict[int, RowError] = {}

    def decoded() -> Iterator[str]:
        for lineno, raw in enumerate(lines, start=1):
            line, err = _decode(raw, lineno)
            if err:
                bad_lines[lineno] = err
                line = raw.decode("utf-8", errors="replace")
            yield line  # type: ignore[misc]

    reader = csv.reader(decoded(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise InputError(f"{path}:1: unreadable CSV header: {e}") from e
    columns = {name.strip(): i for i, name in enumerate(header)}
    for needed in (text_field, id_field, label_field):
        if needed and needed not in columns:
            raise InputError(f"{path}:1: no column {needed!r} in the header (columns: {', '.join(columns)})")
    last = reader.line_num
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield RowError(start, f"malformed CSV: {e}")
            last = reader.line_num
            continue
        last = reader.line_num
        bad = [bad_lines.pop(n) for n in range(start, last + 1) if n in bad_lines]
        if bad:
            yield RowError(start, bad[0].message)
            continue
        if not record or all(not c.strip() for c in record):
            continue
        values = {name: record[i] if i < len(record) else None for name, i in columns.items()}
        problem = check_text(values[text_field], text_field)
        if problem is None and label_field and not (values[label_field] or "").strip():
            problem = f"missing field {label_field!r}"
        if problem:
            yield RowError(start, problem)
            continue
        yield Row(start, values[id_field] if id_field else start, values[text_field], values[label_field] if label_field else None)


class AtomicOutput:
    """Write to a temp file beside `path`, rename over it on `commit`; '-' writes straight to stdout."""

    def __init__(self, path: str, overwrite: bool) -> None:
        self.path = path
        self.tmp: str | None = None
        if path == "-":
            self.f: IO[str] = sys.stdout
            return
        target = Path(path)
        if target.exists() and not overwrite:
            raise InputError(f"{path}: output exists; pass --overwrite to replace it")
        if not target.parent.is_dir():
            raise InputError(f"{target.parent}: output directory not found")
        if target.is_dir():
            raise InputError(f"{path}: is a directory; give a file name")
        check_not_locked(target)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        public_mode(Path(self.tmp))  # mkstemp's 0600 would keep everyone else (a service user) out
        self.f = open(fd, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        if self.tmp is None:
            self.f.flush()
            return
        self.f.close()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.f.close()
            os.unlink(self.tmp)
            self.tmp = None
