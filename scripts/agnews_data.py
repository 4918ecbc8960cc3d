"""Find AG News for the main job and print the directory that holds train.jsonl and test.jsonl.

    python scripts/agnews_data.py            # what scripts/main_job.sh runs
    FULL=1 python scripts/agnews_data.py     # from the hub: all 120,000 training rows

In this order: $LORASHIP_DATA_DIR; ../shared/data/agnews beside the repository; the hub dataset
fancyzhx/ag_news through `datasets` (labels 0..3 -> World, Sports, Business, Sci/Tech; the training split
sampled, stratified and seeded, to the 20,392 rows of the shared copy unless FULL=1), written once as
JSON Lines under data/agnews (git-ignored) and reused. Messages go to stderr; only the path to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from loraship.fsutil import atomic_dir  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SHARED_TRAIN_ROWS = 20_392


def has_splits(d: Path) -> bool:
    return (d / "train.jsonl").is_file() and (d / "test.jsonl").is_file()


def from_hub(hub: str, out: Path, full: bool, seed: int = 0) -> Path:
    """Download through `datasets`, map labels to names, sample train, write JSON Lines atomically."""
    import datasets
    import numpy as np

    stamp = {"hub": hub, "full": full, "seed": seed}
    if has_splits(out) and (out / "source.json").is_file() and json.loads((out / "source.json").read_text()) == stamp:
        return out
    ds = datasets.load_dataset(hub)
    feature = ds["train"].features.get("label")
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else LABELS
    # Written atomically with the project's helper: a cut download leaves nothing half-written, and only a
    # directory this script wrote (marked) is ever replaced.
    with atomic_dir(out, overwrite=True, flag="(a rerun)", what="AG News from the hub") as tmp:
        for split in ("train", "test"):
            rows = ds[split]
            keep = np.arange(len(rows))
            if split == "train" and not full:
                rng = np.random.default_rng(seed)
                y = np.array(rows["label"])
                per_class = SHARED_TRAIN_ROWS // len(names)
                keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(len(names))]))
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for row in rows.select(keep.tolist()):
                    f.write(json.dumps({"text": " ".join(row["text"].split()), "label": names[row["label"]]}) + "\n")
        (tmp / "source.json").write_text(json.dumps(stamp))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data" / "agnews")
    p.add_argument("--hub", default=os.environ.get("LORASHIP_AGNEWS_HUB", "fancyzhx/ag_news"), help="hub id or a local dir laid out as the hub's")
    p.add_argument("--out", type=Path, default=REPO / "data" / "agnews")
    args = p.parse_args(argv)
    full = os.environ.get("FULL", "") not in ("", "0")
    env_dir = os.environ.get("LORASHIP_DATA_DIR")
    if env_dir:
        if not has_splits(Path(env_dir)):
            print(f"error: LORASHIP_DATA_DIR={env_dir} has no train.jsonl and test.jsonl", file=sys.stderr)
            return 1
        print(f"data: {env_dir} (LORASHIP_DATA_DIR)", file=sys.stderr)
        print(env_dir)
        return 0
    if has_splits(args.shared) and not full:
        print(f"data: {args.shared}", file=sys.stderr)
        print(args.shared)
        return 0
    print(f"data: {args.shared} not found; loading {args.hub} through datasets" + (" (all rows)" if full else ""), file=sys.stderr)
    try:
        out = from_hub(args.hub, args.out, full)
    except Exception as e:  # unreachable hub, offline mode, missing dataset: one clear message below
        print(f"error: AG News not found ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Provide it one of three ways:\n"
              "  1. LORASHIP_DATA_DIR=/path/to/agnews with train.jsonl and test.jsonl ({\"text\", \"label\"} per line)\n"
              f"  2. the shared copy beside the repository: {args.shared}\n"
              "  3. a reachable Hugging Face hub: fancyzhx/ag_news is downloaded through `datasets`\n"
              "     (or LORASHIP_AGNEWS_HUB=/local/copy laid out as the hub's; FULL=1 keeps all 120,000 training rows)",
              file=sys.stderr)
        return 1
    print(f"data: {out} (from {args.hub})", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
