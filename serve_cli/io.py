"""What serve_cli's verbs share about rows and outputs: bad-row policy, error records, atomic output files
(inputs are read by the one reader, loraship.rows)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from loraship.fsutil import check_not_locked, public_mode
from loraship.rows import InputError, Row, RowError


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


class RowFailure(ValueError):
    """A bad row under --on-error fail."""


def fail_fast(items: Iterable[Row | RowError], path: str, on_error: str) -> Iterator[Row | RowError]:
    for it in items:
        if isinstance(it, RowError) and on_error == "fail":
            raise RowFailure(f"{it.where}: {it.message} (use --on-error skip or record to go on past bad rows)")
        yield it


def error_record(item: RowError) -> dict[str, Any]:
    return {"file": item.file, "line": item.line, "where": item.where, "error": item.message}
