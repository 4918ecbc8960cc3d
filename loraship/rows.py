"""The one reader: rows of text (and label, id) from every input format, for every stage.

The trainer, the export gate, `serve_cli predict/eval` and the Ray engine all read through here, so one
file means the same rows and the same errors everywhere. Torch-free; pyarrow only for Parquet, `datasets`
only for `hub:ID[:split]`.

Formats: JSON Lines (.jsonl, .ndjson, or .json holding one object per line), a JSON array of objects
(.json starting with `[`), CSV/TSV with a header row, Parquet, plain text (one text per line), stdin (`-`),
a directory (every supported file in it, recursively, in name order) and `hub:ID[:split]`.

The rules, one set for all formats:
- A UTF-8 byte-order mark at the start of a file is ignored; CRLF line ends are fine; blank lines (and
  all-blank CSV records) are not rows.
- A row that cannot be used is a `RowError` naming where it is (`file:line`, `file row N` for Parquet and
  hub rows, `file item N` for JSON arrays) and why; the rows around it are read on. One line of invalid
  UTF-8 costs that line (that CSV record), not the file.
- A problem with the whole input (no such file, a CSV header without the text column, an unreadable JSON
  array) is an `InputError`.
- Texts must be non-empty strings; a label must be a non-empty string or an integer (an integer-looking
  CSV cell is the same label as that JSON integer: see loraship.labels); an id field, when asked for,
  must be present.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "txt")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".txt": "txt"}
BOM = "\ufeff"  # UTF-8 byte-order mark: Excel's CSV and some JSONL exports start with it
BATCH_ROWS = 10_000  # Parquet/hub rows read per Arrow batch


class InputError(ValueError):
    """A problem with the whole input (missing file, missing column), not with one row."""


@dataclass(frozen=True)
class Fields:
    """Which fields a stage reads. `label`/`id` None: not read (and not required).

    Multi-label rows: a label field holding a list (JSON, Parquet); or one string split at
    `label_separator` (CSV/TSV: `joy;love`); or `label_fields`, one 0/1 column per label (the row's labels
    are the columns set to 1; `label` is then not read)."""

    text: str = "text"
    label: str | None = None
    id: str | None = None
    label_separator: str | None = None
    label_fields: tuple[str, ...] = ()
    text_pair: str | None = None  # the second text of a sentence pair (None: rows are single texts)

    @property
    def reads_labels(self) -> bool:
        return bool(self.label or self.label_fields)

    def columns(self) -> list[str]:
        """The columns a file must have."""
        named = [self.text, self.text_pair, self.id] + ([*self.label_fields] if self.label_fields else [self.label])
        return list(dict.fromkeys(c for c in named if c))


Input = str | tuple[str, str]  # what a model reads: a text, or a pair (text, text_pair)


def as_input(value: Any) -> Input:
    """A text, or a pair from a 2-item list/tuple (JSON has no tuples: stored pairs come back as lists)."""
    return (str(value[0]), str(value[1])) if isinstance(value, (list, tuple)) else value


def split_pairs(inputs: list[Input]) -> tuple[list[str], list[str] | None]:
    """(first texts, second texts or None): the two arguments a Hugging Face tokenizer takes for pairs."""
    if inputs and isinstance(inputs[0], tuple):
        return [x[0] for x in inputs], [x[1] for x in inputs]  # type: ignore[index]
    return list(inputs), None  # type: ignore[arg-type]


def input_record(x: Input) -> dict[str, str]:
    """{"text": ...} or {"text": ..., "text_pair": ...}: an input as output files write it."""
    return {"text": x} if isinstance(x, str) else {"text": x[0], "text_pair": x[1]}


def input_chars(x: Input) -> int:
    """Characters of a text or of both sides of a pair (length ordering without tokenizing)."""
    return len(x) if isinstance(x, str) else len(x[0]) + len(x[1])


def where(file: str, n: int, unit: str) -> str:
    """`file:12` for a line, `file row 3` / `file item 3` for Parquet/hub rows and JSON array items."""
    return f"{file}:{n}" if unit == "line" else f"{file} {unit} {n}"


@dataclass
class Row:
    file: str
    line: int  # line (JSONL, CSV, TXT), row (Parquet, hub) or item (JSON array) number, from 1
    text: str
    label: Any = None  # str or int as read (None when not read)
    id: Any = None  # the id field's value (None when not read)
    unit: str = "line"
    text_pair: str | None = None  # the second text of a pair (Fields.text_pair)

    @property
    def where(self) -> str:
        return where(self.file, self.line, self.unit)

    @property
    def input(self) -> str | tuple[str, str]:
        """What the model reads: the text, or (text, text_pair) for a pair."""
        return self.text if self.text_pair is None else (self.text, self.text_pair)


@dataclass
class RowError:
    file: str
    line: int
    message: str
    unit: str = "line"

    @property
    def where(self) -> str:
        return where(self.file, self.line, self.unit)


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


def _flag(value: Any) -> bool | None:
    """A 0/1 label column's cell: True, False, or None when it is neither."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _label_problem(label: Any, name: str) -> str | None:
    # Floats pass here: a regression target is a number; a classifier's label map rejects one it does not know.
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        return f"field {name!r} must be a string or a number, got {label!r}"
    if isinstance(label, str) and not label.strip():
        return f"field {name!r} is empty"
    return None


def read_label(rec: dict[str, Any], fields: Fields) -> tuple[Any, str | None]:
    """(label, problem): a str/int for one label, a list for several (possibly empty where the format says so
    explicitly: a JSON `[]`, all 0/1 columns at 0)."""
    if fields.label_fields:
        chosen = []
        for col in fields.label_fields:
            flag = _flag(rec.get(col))
            if flag is None:
                return None, f"field {col!r} must be 0 or 1, got {rec.get(col)!r}"
            if flag:
                chosen.append(col)
        return chosen, None
    assert fields.label
    label = rec.get(fields.label)
    if label is None:
        return None, _missing(rec, fields.label)
    if isinstance(label, str) and fields.label_separator is not None:
        if not label.strip():
            return None, f"field {fields.label!r} is empty (write no labels as an empty JSON list or 0/1 columns)"
        label = [part for part in label.split(fields.label_separator) if part.strip()]
    if isinstance(label, (list, tuple)):
        for item in label:
            problem = _label_problem(item, fields.label)
            if problem:
                return None, problem + " (in the list)"
        return [x.strip() if isinstance(x, str) else x for x in label], None
    problem = _label_problem(label, fields.label)
    return (label.strip() if isinstance(label, str) else label), problem


def _missing(rec: dict[str, Any], name: str) -> str:
    if name in rec:
        return f"missing field {name!r} (null)"
    return f"missing field {name!r} (fields: {', '.join(map(str, rec)) or 'none'})"


def check_record(rec: dict[str, Any], fields: Fields) -> str | None:
    """None when the record has what `fields` asks for, else the problem (the same words in every stage)."""
    for name in (fields.text, fields.text_pair):
        if name is None:
            continue
        text = rec.get(name)
        if text is None:
            return _missing(rec, name)
        if not isinstance(text, str):
            return f"field {name!r} must be a string, got {type(text).__name__}"
        if not text.strip():
            return f"field {name!r} is empty"
    if fields.id and rec.get(fields.id) is None:
        return _missing(rec, fields.id)
    return None


def make_row(rec: dict[str, Any], fields: Fields, file: str, n: int, unit: str) -> Row | RowError:
    """The per-row rule every format and engine applies to a decoded record."""
    problem = check_record(rec, fields)
    label = None
    if problem is None and fields.reads_labels:
        label, problem = read_label(rec, fields)
    if problem:
        return RowError(file, n, problem, unit)
    return Row(file, n, rec[fields.text], label, rec[fields.id] if fields.id else None, unit,
               rec[fields.text_pair] if fields.text_pair else None)


# --- formats -------------------------------------------------------------------------------------------


def detect_format(path: str, fmt: str, head: bytes) -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix in SUFFIXES:
        kind = SUFFIXES[suffix]
        if kind == "json":
            return "json" if head.decode("utf-8", errors="replace").removeprefix(BOM).lstrip().startswith("[") else "jsonl"
        return kind
    start = head.decode("utf-8", errors="replace").removeprefix(BOM).lstrip()
    if start.startswith("{"):
        return "jsonl"
    if start.startswith("["):
        return "json"
    return "txt"


def _decode(raw: bytes, lineno: int) -> tuple[str | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
    return (text.removeprefix(BOM) if lineno == 1 else text), None


def _jsonl(lines: Iterable[bytes], name: str, fields: Fields) -> Iterator[Row | RowError]:
    for lineno, raw in enumerate(lines, start=1):
        line, err = _decode(raw, lineno)
        if err:
            yield RowError(name, lineno, err)
            continue
        if not line or not line.strip():
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))  # a line cut inside a string: "unterminated", not "control character"
        except json.JSONDecodeError as e:
            yield RowError(name, lineno, f"malformed JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield RowError(name, lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield make_row(obj, fields, name, lineno, "line")


def _json_array(data: bytes, name: str, fields: Fields) -> Iterator[Row | RowError]:
    """A JSON array of objects, read whole (one document: a bad byte or bracket makes the file unreadable)."""
    try:
        items = json.loads(data.decode("utf-8").removeprefix(BOM))
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: invalid UTF-8 ({e.reason} at byte {e.start}); a JSON array is read whole") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{name}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(items, list):
        raise InputError(f"{name}: expected a JSON array of objects or JSON Lines, got a {type(items).__name__}")
    for i, obj in enumerate(items, start=1):
        if isinstance(obj, dict):
            yield make_row(obj, fields, name, i, "item")
        else:
            yield RowError(name, i, f"expected a JSON object, got {type(obj).__name__}", "item")


def _txt(lines: Iterable[bytes], name: str, fields: Fields) -> Iterator[Row | RowError]:
    if fields.reads_labels:
        raise InputError(f"{name}: plain text has no labels; use JSONL, CSV or Parquet with a {fields.label!r} field")
    if fields.text_pair:
        raise InputError(f"{name}: plain text holds one text per line; give pairs as JSONL, CSV or Parquet with "
                         f"{fields.text!r} and {fields.text_pair!r} fields")
    for lineno, raw in enumerate(lines, start=1):
        line, err = _decode(raw, lineno)
        if err:
            yield RowError(name, lineno, err)
        elif line and line.strip():
            yield Row(name, lineno, line.rstrip("\r\n"), None, lineno if fields.id else None)


def _csv(lines: Iterable[bytes], name: str, delimiter: str, fields: Fields) -> Iterator[Row | RowError]:
    bad_lines: dict[int, str] = {}

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
        raise InputError(f"{name}:1: unreadable CSV header: {e}") from e
    columns = {col.strip(): i for i, col in enumerate(header)}
    for needed in fields.columns():
        if needed not in columns:
            raise InputError(f"{name}:1: no column {needed!r} in the header (columns: {', '.join(columns)})")
    last = reader.line_num
    while True:
        start = last + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            last = reader.line_num
            yield RowError(name, start, f"malformed CSV: {e}")
            continue
        last = reader.line_num
        bad = [bad_lines.pop(n) for n in range(start, last + 1) if n in bad_lines]
        if bad:
            yield RowError(name, start, bad[0])
            continue
        if not record or all(not c.strip() for c in record):
            continue
        rec = {col: record[i] if i < len(record) else None for col, i in columns.items()}  # short record: missing
        yield make_row(rec, fields, name, start, "line")


def _class_names(schema_metadata: dict[bytes, bytes] | None, field: str | None) -> list[str] | None:
    """ClassLabel names that `datasets` stores in a Parquet file's schema metadata."""
    if not field or not schema_metadata:
        return None
    try:
        feature = json.loads(schema_metadata[b"huggingface"])["info"]["features"][field]
    except (KeyError, ValueError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") in ("Sequence", "List", "LargeList"):
        feature = feature.get("feature")  # multi-label: a list of ClassLabel values
    return list(feature["names"]) if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None


def _arrow_batches(batches: Iterable[Any], name: str, fields: Fields, names: list[str] | None, first: int) -> Iterator[Row | RowError]:
    """Rows of Arrow record batches (Parquet, hub), numbered from `first` + 1. A ClassLabel's integer is
    its name (hub AG News stores 0..3 for World, Sports, Business, Sci/Tech)."""
    n = first
    for batch in batches:
        cols = {f: batch.column(f).to_pylist() for f in batch.schema.names}
        for i in range(batch.num_rows):
            n += 1
            rec = {f: col[i] for f, col in cols.items()}
            if names is not None and fields.label:
                rec[fields.label] = _class_name(rec.get(fields.label), names)
            yield make_row(rec, fields, name, n, "row")


def _class_name(value: Any, names: list[str]) -> Any:
    """A ClassLabel integer (or a list of them) as its name; anything else as it is."""
    if isinstance(value, list):
        return [_class_name(v, names) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    return value


def _parquet(f: Any, name: str, fields: Fields, row_group: int | None, first: int) -> Iterator[Row | RowError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{name}: cannot read as Parquet: {e}") from e
    available = pf.schema_arrow.names
    for needed in fields.columns():
        if needed not in available:
            raise InputError(f"{name}: no column {needed!r} (columns: {', '.join(available)})")
    cols = fields.columns()
    names = _class_names(pf.schema_arrow.metadata, fields.label)
    groups = [row_group] if row_group is not None else None
    batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=cols, row_groups=groups)
    return _arrow_batches(batches, name, fields, names, first)


def _hub(spec: str, fields: Fields) -> Iterator[Row | RowError]:
    import datasets

    ident, _, split = spec.partition(":")
    ds = datasets.load_dataset(ident, split=split or "train")
    for needed in fields.columns():
        if needed not in ds.column_names:
            raise InputError(f"hub:{spec}: no column {needed!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features.get(fields.label) if fields.label else None
    feature = getattr(feature, "feature", feature)  # a Sequence(ClassLabel) for multi-label sets
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _arrow_batches(ds.with_format("arrow").iter(batch_size=BATCH_ROWS), f"hub:{spec}", fields, names, 0)


class _Peekable:
    """A binary line source whose first bytes can be looked at before reading starts."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.first = f.readline()

    def __iter__(self) -> Iterator[bytes]:
        if self.first:
            yield self.first
        yield from self.f


def read_stream(f: IO[bytes], name: str, fmt: str, fields: Fields, row_group: int | None = None,
                first_row: int = 0) -> tuple[str, Iterator[Row | RowError]]:
    """(format, rows) of one open binary stream (Parquet: a seekable file; `row_group` reads only that group,
    numbered after `first_row`). Ray's readers call this on their own filesystems' streams."""
    if fmt == "parquet" or (fmt == "auto" and Path(name).suffix.lower() == ".parquet"):
        return "parquet", _parquet(f, name, fields, row_group, first_row)
    source = _Peekable(f)
    fmt = detect_format(name, fmt, source.first)
    if fmt == "jsonl":
        return fmt, _jsonl(source, name, fields)
    if fmt == "json":
        return fmt, _json_array(b"".join(source), name, fields)
    if fmt in ("csv", "tsv"):
        return fmt, _csv(source, name, "\t" if fmt == "tsv" else ",", fields)
    if fmt == "txt":
        return fmt, _txt(source, name, fields)
    raise InputError(f"{name}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def list_files(directory: Path) -> list[Path]:
    """The supported files under `directory`, recursively, in name order; hidden and `_`-prefixed ones skipped."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts))


def _file_rows(path: Path, fmt: str, fields: Fields) -> Iterator[Row | RowError]:
    with path.open("rb") as f:
        yield from read_stream(f, str(path), fmt, fields)[1]


def read(source: str, fmt: str = "auto", fields: Fields | None = None) -> tuple[str, Iterator[Row | RowError]]:
    """(resolved format, rows) of a file, a directory, '-' (stdin) or 'hub:ID[:split]'.

    Whole-input problems (no such file, a missing column) raise InputError before the first row."""
    fields = fields or Fields()
    if fmt not in FORMATS:
        raise InputError(f"{source}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if source.startswith("hub:"):
        return "hub", _hub(source[4:], fields)
    if source == "-":
        return read_stream(sys.stdin.buffer, "-", fmt, fields)
    path = Path(source)
    if path.is_dir():
        files = list_files(path)
        if not files:
            raise InputError(f"{source}: no {', '.join(SUFFIXES)} files in this directory")
        # Each file is opened (and its header checked) as its turn comes; the first one now, so a missing
        # column stops before any row is used.
        first = _file_rows(files[0], fmt, fields)
        head = next(first, None)

        def rows() -> Iterator[Row | RowError]:
            if head is not None:
                yield head
            yield from first
            for p in files[1:]:
                yield from _file_rows(p, fmt, fields)

        return "dir", rows()
    if not path.is_file():
        raise InputError(f"{source}: input file not found")
    if fmt == "auto" and path.suffix.lower() not in SUFFIXES and path.suffix:
        raise InputError(f"{source}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)} (or --format)")
    f = path.open("rb")
    try:
        resolved, rows = read_stream(f, str(path), fmt, fields)
        first_item = next(rows, None)  # opens the header: a missing column is an InputError now
    except BaseException:
        f.close()
        raise

    def gen() -> Iterator[Row | RowError]:
        with f:
            if first_item is not None:
                yield first_item
            yield from rows

    return resolved, gen()
