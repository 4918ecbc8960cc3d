"""Checkpoints in RUN/checkpoints: written atomically, found only when complete, rotated.

A checkpoint is written into `.step_N.partial` by every rank (accelerate `save_state`), completed by the
main process (best adapter copy, then `train_state.json` last) and only then renamed to `step_N`. So a
`step_N` directory is complete by construction; a run killed mid-save leaves a `.partial` dir that
`train.resume=latest` reports and skips.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from loraship.fsutil import swap_in

STATE_FILE = "train_state.json"
BEST_ADAPTER = "best_adapter"
_NAME = re.compile(r"step_(\d+)")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".step_{step}.partial"


def scan(root: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """(complete checkpoints sorted by step, notes on everything else found in `root`)."""
    complete: list[tuple[int, Path]] = []
    notes: list[str] = []
    if not root.is_dir():
        return complete, notes
    for p in sorted(root.iterdir()):
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            complete.append((int(m[1]), p))
        elif m or p.name.endswith(".partial"):
            notes.append(f"{p}: incomplete checkpoint (cut during a save), skipped")
        else:
            notes.append(f"{p}: not a checkpoint, ignored")
    complete.sort()
    return complete, notes


def latest(root: Path) -> tuple[Path | None, list[str]]:
    complete, notes = scan(root)
    return (complete[-1][1] if complete else None), notes


def finish(root: Path, step: int, state: dict[str, Any], adapter_dir: Path, keep: int) -> Path:
    """Main process, after every rank's save_state into the partial dir: complete it, publish it, rotate."""
    tmp = partial_dir(root, step)
    if adapter_dir.is_dir():
        # The best adapter so far travels with the checkpoint: a resumed run restores it with the state.
        shutil.copytree(adapter_dir, tmp / BEST_ADAPTER)
    (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")  # written last: marks completeness
    # A step_N left by an earlier timeline of this run (resumed from an older checkpoint) is swapped out,
    # never removed first: a complete step_N exists at every moment.
    swap_in(tmp, checkpoint_dir(root, step))
    final = checkpoint_dir(root, step)
    complete, _ = scan(root)
    for _, old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partials(root: Path) -> None:
    """Partial checkpoints are ours and useless once a run (re)starts: remove them."""
    if root.is_dir():
        for p in root.glob(".step_*.partial"):
            shutil.rmtree(p, ignore_errors=True)
