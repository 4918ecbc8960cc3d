"""Training data past memory: peak RSS per process, data setup time (first run and cache hit), training speed.

    python benchmarks/data_scale.py [--rows 2000000] [--steps 30] [--baseline-ref 46f1a3b]

Generates the AG News training copy repeated to --rows rows in a temp dir (deleted at the end) and runs the
real trainer (`accelerate launch`, the default MiniLM config) for a few steps:
  1. first run, 1 process, empty cache: reads, checks and tokenizes every row into the Arrow cache;
  2. rerun, 1 process: cache hit;
  3. 2 processes (configs/accelerate/cpu_2proc.yaml): both map the same cached files.
Peak RSS is each process's VmHWM from /proc, polled while it runs. Training speed on the 20k copy is
measured side by side with the list-based data path of --baseline-ref (checked out with `git archive`),
median of --reps runs each. The validation carve is kept small (0.2%) so evaluation does not dominate.
Writes benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, data_dir, machine, median, save


def write_rows(src: Path, dst: Path, rows: int) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    with dst.open("w", encoding="utf-8") as f:
        f.writelines(itertools.islice(itertools.cycle(lines), rows))


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out.extend(int(k) for k in kids)
        todo.extend(int(k) for k in kids)
    return out


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_trainer(code: Path, accel_config: str, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One `accelerate launch` of code/trainer/train.py; the peak RSS of every trainer process, and its summary."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / accel_config),
           "--num_cpu_threads_per_process", str(os.cpu_count()), str(code / "trainer" / "train.py"),
           "--config", str(REPO / "configs" / "agnews_minilm.yaml"), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env={**env, "PYTHONPATH": str(code)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            hwm = peak_rss_mb(pid)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}/cmdline").exists() else b""
            if hwm is not None and b"train.py" in cmdline and b"accelerate" not in cmdline:
                peaks[pid] = max(peaks.get(pid, 0.0), hwm)
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        sys.exit("trainer failed:\n" + "".join(log[-40:]))
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.run_dir="))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb_per_process": sorted(round(v) for v in peaks.values()),
        "data_setup_seconds": (summary.get("data") or {}).get("setup_seconds"),
        "data_cache": (summary.get("data") or {}).get("cache"),
        "samples_per_second": summary.get("samples_per_second"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per scale run")
    p.add_argument("--speed-steps", type=int, default=60, help="optimizer steps per 20k-copy speed run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline-ref", default="46f1a3b", help="commit with the list-based data path")
    args = p.parse_args(argv)

    agnews = data_dir()
    tmp = Path(tempfile.mkdtemp(prefix="loraship-data-scale-"))
    try:
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf_datasets"), "TOKENIZERS_PARALLELISM": "true"}
        big = tmp / "big"
        big.mkdir()
        t0 = time.perf_counter()
        write_rows(agnews / "train.jsonl", big / "train.jsonl", args.rows)
        print(f"wrote {args.rows:,} rows ({(big / 'train.jsonl').stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s", flush=True)
        common = ["output.tensorboard=false", "train.save_every=0", "data.test=", "data.validation=", "train.eval_every=0",
                  "data.validation_fraction=0.002", "output.overwrite=true", "train.eval_baseline=false"]
        scale = lambda name: [f"data.data_dir={big}", f"train.max_steps={args.steps}", f"output.run_dir={tmp / name}", *common]  # noqa: E731
        results: dict[str, Any] = {}
        for name, accel in (("first_run_1proc", "cpu_1proc.yaml"), ("rerun_1proc", "cpu_1proc.yaml"), ("rerun_2proc", "cpu_2proc.yaml")):
            results[name] = run_trainer(REPO, accel, scale(name), env)
            print(name, results[name], flush=True)

        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline_ref], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        speed: dict[str, list[dict[str, Any]]] = {"arrow": [], "lists_baseline": []}
        for rep in range(args.reps):
            for name, code in (("arrow", REPO), ("lists_baseline", base)):
                over = [f"data.data_dir={agnews}", f"train.max_steps={args.speed_steps}", f"output.run_dir={tmp / f'speed_{name}'}", *common]
                speed[name].append(run_trainer(code, "cpu_1proc.yaml", over, env))
                print(name, rep, speed[name][-1], flush=True)
        result = {
            "benchmark": "data_scale",
            "machine": machine(),
            "rows": args.rows,
            "steps": args.steps,
            "validation_fraction": 0.002,
            "runs": results,
            "speed_20k": {
                name: {
                    "samples_per_second_median": median([r["samples_per_second"] for r in runs]),
                    "samples_per_second": [r["samples_per_second"] for r in runs],
                    "peak_rss_mb": median([max(r["peak_rss_mb_per_process"]) for r in runs]),
                    "data_setup_seconds": median([r["data_setup_seconds"] for r in runs if r["data_setup_seconds"] is not None] or [0]),
                }
                for name, runs in speed.items()
            },
            "baseline_ref": args.baseline_ref,
        }
        save("data_scale", result)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
