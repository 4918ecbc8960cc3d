"""Filesystem rules every stage shares: owned outputs, atomic directory writes, permissions, the run-dir lock.

Torch-free and import-light, so the trainer, the export and serve_cli can all use it without an import
circle. The rules:

- A directory that loraship writes carries a marker file (`OWNER_MARKER`); `--force`, `--overwrite` and
  `output.overwrite` only ever replace a directory that has it, never one the project did not write.
- Outputs are built beside their target in a temp dir and renamed into place; the temp dir gets the
  permissions a plain `mkdir` would (mkdtemp's 0700 would keep other users, e.g. a service, out).
- A training holds an exclusive `flock` on `RUN/.lock` (its host and pid written inside); other writers
  (export, serve_cli outputs inside the run dir) refuse while it is held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OWNER_MARKER = ".loraship"
LOCK_FILE = ".lock"


class OutputError(RuntimeError):
    """An output cannot be written (exists without the flag, not ours to replace, locked by a training)."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """Give a mkstemp file or mkdtemp dir the mode open()/mkdir() would have given it (respecting the umask)."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def mark_owned(directory: Path, what: str) -> None:
    (directory / OWNER_MARKER).write_text(json.dumps({"written_by": "loraship", "what": what}) + "\n", encoding="utf-8")


def is_owned(directory: Path) -> bool:
    return (directory / OWNER_MARKER).is_file()


def check_replaceable(target: Path, overwrite: bool, flag: str) -> None:
    """Refuse before any work is done: an existing target needs the flag, and must be one loraship wrote."""
    if not target.exists():
        return
    if not overwrite:
        raise OutputError(f"{target}: exists; pass {flag} to replace it, or choose another path")
    if not target.is_dir() or not is_owned(target):
        raise OutputError(
            f"{target}: exists and was not written by loraship (no {OWNER_MARKER} marker in it); "
            f"{flag} only replaces loraship's own outputs. Remove it yourself or choose another path"
        )


def temp_dir_beside(target: Path) -> Path:
    """An empty temp dir next to `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".tmp", dir=target.parent))
    public_mode(tmp)
    return tmp


_RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h): swap two paths atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where the OS or filesystem can't."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, target: Path) -> None:
    """Put the complete dir `tmp` at `target` so that a complete copy is there at every moment: an existing
    target is exchanged with `tmp` in one atomic step and the old copy (now at `tmp`) removed afterwards.
    Where the filesystem cannot exchange, the old copy is renamed aside first (a crash between the two
    renames leaves it beside the target as `.NAME.old-PID`)."""
    if not target.exists():
        tmp.rename(target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def replace_dir(tmp: Path, target: Path, what: str) -> None:
    """Mark `tmp` as ours and swap it in for `target` (an existing target must be ours: see check_replaceable)."""
    mark_owned(tmp, what)
    if target.exists() and not is_owned(target):
        raise OutputError(f"{target}: appeared meanwhile and was not written by loraship; not replacing it")
    swap_in(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: Path, overwrite: bool, flag: str, what: str, check_lock: bool = True) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces `target`, on any error it is removed.

    `check_lock=False` when the caller holds the run-dir lock itself (the export writing into RUN/)."""
    check_replaceable(target, overwrite, flag)
    if check_lock:
        check_not_locked(target)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        replace_dir(tmp, target, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the run-dir lock --------------------------------------------------------------------------------


def _holder_text(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} ({info.get('what', 'training')}, since {since})"


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


class RunDirLock:
    """Exclusive `flock` on RUN/.lock for as long as a training (or an export into the run dir) runs.

    The kernel drops a flock when its holder dies, so a lock file left by a killed run is stale exactly
    when the flock can be taken: it is then taken over, and `stale_holder` says whose it was.
    """

    def __init__(self, run_dir: Path, what: str) -> None:
        self.path = run_dir / LOCK_FILE
        self.what = what
        self.fd: int | None = None
        self.stale_holder: str | None = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputError(
                    f"{self.path.parent}: in use by another loraship process: {_holder_text(_read_holder(self.path))}. "
                    "Wait for it to finish, stop it, or use another run dir"
                ) from None
            # The holder before us may have unlinked the file between our open and our flock: then we
            # hold a lock on a file nobody else can find, and a newcomer creates and locks a new one. Only
            # a lock on the inode that is still at the path counts; else open the new file and try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(self.path)
        if old:
            self.stale_holder = _holder_text(old)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            # Unlinked while still held: a process that opened it before and flocks it after finds the
            # path gone or pointing elsewhere (acquire's check), so it never counts as a holder.
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: Path) -> str | None:
    """Who holds the run-dir lock of `path` or of any directory above it; None when nobody does."""
    here = path.resolve()
    for d in (here, *here.parents):
        lock = d / LOCK_FILE
        if not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f"{d} ({_holder_text(_read_holder(lock))})"
        finally:
            os.close(fd)
    return None


def check_not_locked(path: Path) -> None:
    """Writers outside the trainer call this: nothing is written into a run dir while a training holds it."""
    holder = lock_holder(path)
    if holder:
        raise OutputError(f"{path}: inside a run dir that a training is writing: {holder}; write elsewhere or wait")
