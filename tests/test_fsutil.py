"""Filesystem rules: the run-dir lock under contention (never two holders), replacing a dir atomically."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from loraship.fsutil import OutputError, RunDirLock


def _contend(run_dir: str, rounds: int, out: mp.Queue) -> None:
    inside = Path(run_dir) / "inside"
    held = overlaps = 0
    while held < rounds:
        try:
            lock = RunDirLock(Path(run_dir), "test").acquire()
        except OutputError:
            continue
        try:
            # Exclusive creation: it fails exactly when another process believes it holds the lock too.
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os.unlink(inside)
        except FileExistsError:
            overlaps += 1
        finally:
            lock.release()
        held += 1
    out.put(overlaps)


def test_many_processes_never_hold_the_lock_together(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), 300, out)) for _ in range(8)]
    for p in procs:
        p.start()
    overlaps = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(overlaps) == 0, f"two holders at once {sum(overlaps)} times"
    assert not (tmp_path / ".lock").exists(), "the last holder removes the lock file"


def test_replacing_a_dir_keeps_one_complete_copy_at_every_moment(tmp_path: Path, monkeypatch) -> None:
    """A crash in the middle of a replace (simulated: no rename may land on the target) leaves a complete
    copy at the target, never none."""
    from loraship import fsutil

    target, new = tmp_path / "adapter", tmp_path / ".adapter-new"
    for d, version in ((target, "old"), (new, "new")):
        d.mkdir()
        (d / "weights").write_text(version)
        fsutil.mark_owned(d, "test")
    real_rename = Path.rename

    def crash_onto_target(self: Path, dest: Path) -> Path:
        if Path(dest) == target:
            raise OSError("killed between the two renames")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", crash_onto_target)
    try:
        fsutil.replace_dir(new, target, "test")
    except OSError:
        pass
    assert (target / "weights").is_file(), "no copy left at the target"
    monkeypatch.setattr(Path, "rename", real_rename)
    assert (target / "weights").read_text() == "new"
    assert not new.exists(), "the old copy is removed after the swap"
