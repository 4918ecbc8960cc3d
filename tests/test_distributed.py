"""Multi-process correctness on CPU: two processes over gloo through the real `accelerate launch`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_same_trained_weights, make_texts, tiny_args, write_jsonl
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
ACCEL_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse_and_document_launch(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1
    head = path.read_text().splitlines()[:10]
    assert head[0].startswith("# ")
    assert any(f"accelerate launch --config_file configs/accelerate/{path.name} trainer/train.py" in x for x in head)


def test_expected_launch_configs_exist() -> None:
    names = {p.stem for p in ACCEL_CONFIGS}
    assert names >= {"cpu_1proc", "cpu_2proc", "gpu_bf16", "gpu_fp16", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "multi_node"}


def launch(config: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / config),
           str(REPO / "trainer" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# Global batch 8 either way: 2 processes x 4, or 1 process x 8. 41 validation and 43 test rows: neither
# splits evenly over 2 processes x 4, so gather_for_metrics must drop the padding duplicates.
TWO_PROC = ("train.batch_size=4", "train.eval_batch_size=4", "train.epochs=2", "train.save_every=5", "train.keep_checkpoints=20",
            "data.validation=val.jsonl", "data.test=test.jsonl")


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("uneven")
    write_jsonl(d / "train.jsonl", make_texts(120, seed=1))
    write_jsonl(d / "val.jsonl", make_texts(41, seed=7))
    write_jsonl(d / "test.jsonl", make_texts(43, seed=8))
    return d


@pytest.fixture(scope="module")
def two_proc_run(tiny_bert: Path, uneven_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    cache = tmp_path_factory.mktemp("ddp-cache")
    res = launch("cpu_2proc.yaml", tiny_args(tiny_bert, uneven_data, run, *TWO_PROC, f"data.cache_dir={cache}"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "processes: 2" in res.stdout
    (run / "launch_stdout.txt").write_text(res.stdout)
    return run


def test_two_processes_tokenize_once_and_agree_on_the_data(two_proc_run: Path) -> None:
    lines = sorted(x for x in (two_proc_run / "launch_stdout.txt").read_text().splitlines() if x.startswith("process "))
    assert len(lines) == 2, lines
    # Rank 0 builds every split; rank 1 waits for it and loads the same files.
    assert lines[0].startswith("process 0: data train=built validation=built test=built"), lines
    assert lines[1].startswith("process 1: data train=hit validation=hit test=hit"), lines
    assert lines[0].split("fingerprint=")[1] == lines[1].split("fingerprint=")[1]


def test_two_processes_write_once_and_evaluate_every_row_once(two_proc_run: Path, uneven_data: Path) -> None:
    ev = events(two_proc_run)
    steps = [e["step"] for e in ev if e["event"] == "train"]
    assert steps == list(range(1, 31)), "each step logged once, by rank 0 only"
    evals = [e for e in ev if e["event"] == "epoch_end"]
    assert [e["step"] for e in evals] == [15, 30]
    assert all(e["val_rows"] == 41 for e in evals), "gather_for_metrics drops the padding duplicates"
    assert json.loads((two_proc_run / "summary.json").read_text())["num_processes"] == 2
    assert (two_proc_run / "config.yaml").is_file() and not list(two_proc_run.glob("*.tmp"))
    # The test split: every one of the 43 rows exactly once, in file order.
    test = json.loads((two_proc_run / "test_metrics.json").read_text())
    assert test["rows"] == 43 and sum(sum(r) for r in test["confusion_matrix"]) == 43
    preds = [json.loads(x)["text"] for x in (two_proc_run / "test_predictions.jsonl").read_text().splitlines()]
    assert preds == [json.loads(x)["text"] for x in (uneven_data / "test.jsonl").read_text().splitlines()]


def test_saved_adapter_is_what_rank0_held(two_proc_run: Path) -> None:
    summary = json.loads((two_proc_run / "summary.json").read_text())
    held = load_file(str(two_proc_run / "checkpoints" / f"step_{summary['best_step']}" / "model.safetensors"))
    adapter = load_file(str(two_proc_run / "adapter" / "adapter_model.safetensors"))
    assert adapter
    for key, value in adapter.items():
        # peft drops the adapter name from saved keys; modules_to_save hold the trained head copy
        match = [k for k in held if k.replace(".default", "").replace("modules_to_save.", "") == key]
        assert len(match) == 1, key
        torch.testing.assert_close(value, held[match[0]], rtol=0, atol=0)


def test_two_processes_match_one_process_with_same_global_batch(two_proc_run: Path, tiny_bert: Path, uneven_data: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    args = [a.replace("batch_size=4", "batch_size=8") for a in TWO_PROC]
    assert train_main(tiny_args(tiny_bert, uneven_data, one, *args)) == 0
    # The logged loss is the mean over both ranks' rows, so it matches the one-process run step by step.
    la = [e["loss"] for e in events(one) if e["event"] == "train"]
    lb = [e["loss"] for e in events(two_proc_run) if e["event"] == "train"]
    assert la == pytest.approx(lb, abs=5e-3)
    a = [e for e in events(one) if e["event"] == "epoch_end"]
    b = [e for e in events(two_proc_run) if e["event"] == "epoch_end"]
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b, strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=5e-3)
    assert a[-1]["val_loss"] < a[0]["val_loss"] + 0.5


def test_resume_under_two_processes_matches_uninterrupted(two_proc_run: Path, tiny_bert: Path, uneven_data: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    ckpt = two_proc_run / "checkpoints" / "step_20"
    res = launch("cpu_2proc.yaml", tiny_args(tiny_bert, uneven_data, resumed, *TWO_PROC, f"train.resume={ckpt}"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "at step 20" in res.stdout
    assert_same_trained_weights(two_proc_run / "checkpoints" / "step_30" / "model.safetensors", resumed / "checkpoints" / "step_30" / "model.safetensors")
    assert [e["step"] for e in events(resumed) if e["event"] == "train"] == list(range(21, 31))


def test_fp16_from_accelerate_config_on_cpu_is_refused(tiny_bert: Path, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` sets from gpu_fp16.yaml
    assert train_main(tiny_args(tiny_bert, toy_data, tmp_path / "r", "train.mixed_precision=auto")) == 2
    assert "fp16: needs a GPU" in capsys.readouterr().err


def training_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line names `marker` (the run dir of one test)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
                state = (d / "stat").read_text().split(")")[-1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                pids.append(int(d.name))
    return pids


def kill_launch_at_step(run: Path, args: list[str], step: int) -> None:
    """Launch 2 processes, SIGKILL the launcher's process group once `step` is logged (as a scheduler does),
    then wait until no process of this run is left."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
           str(REPO / "trainer" / "train.py"), *args]
    launcher = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if (run / "metrics.jsonl").is_file() and f'"step": {step},' in (run / "metrics.jsonl").read_text():
            break
        time.sleep(0.01)
    assert launcher.poll() is None, "the run ended before it could be cut"
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 20
    while training_processes(str(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training_processes(str(run)) == [], "workers outlived their launcher"


def resume_and_compare(reference: Path, run: Path, args: list[str]) -> None:
    res = launch("cpu_2proc.yaml", [*args, "train.resume=latest"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_trained_weights(reference / "checkpoints" / "step_30" / "model.safetensors", run / "checkpoints" / "step_30" / "model.safetensors")
    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [e["step"] for e in events(run) if e["event"] == "train"] == list(range(1, 31))


def test_sigkill_to_the_launcher_group_stops_the_workers_and_resume_matches(two_proc_run: Path, tiny_bert: Path, uneven_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "orphaned"
    args = tiny_args(tiny_bert, uneven_data, run, *TWO_PROC)
    kill_launch_at_step(run, args, 7)
    logged = [e["step"] for e in events(run) if e["event"] == "train"]
    assert max(logged) < 30, "the workers stopped instead of finishing the run on their own"
    resume_and_compare(two_proc_run, run, args)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_two_process_sigkill_trials(two_proc_run: Path, tiny_bert: Path, uneven_data: Path, tmp_path: Path, trial: int) -> None:
    import random

    run = tmp_path / "cut"
    args = tiny_args(tiny_bert, uneven_data, run, *TWO_PROC)
    kill_launch_at_step(run, args, random.Random(2000 + trial).randint(2, 26))
    resume_and_compare(two_proc_run, run, args)
