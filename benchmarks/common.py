"""Helpers shared by the benchmark scripts: machine description, data path, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def data_dir() -> Path:
    d = Path(os.environ.get("LORASHIP_DATA_DIR", REPO.parent / "shared" / "data" / "agnews"))
    if not (d / "train.jsonl").is_file() or not (d / "test.jsonl").is_file():
        sys.exit(f"error: AG News not found in {d} (train.jsonl, test.jsonl); set LORASHIP_DATA_DIR")
    return d


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "asimd", "fma")))
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "flags": flags,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "onnxruntime": version("onnxruntime"),
        "transformers": version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path.relative_to(REPO)}")
    return path


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of a whole process, start to exit."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return wall, res


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
