"""The training loop off the default path: checkpoints at epoch ends, evaluation cadence, resume after
real kills (SIGKILL at a random step and during a checkpoint write), incomplete checkpoints, logging."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, assert_same_trained_weights, make_texts, tiny_args, write_jsonl
from trainer.train import main


def events(run: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


@pytest.fixture(scope="module")
def data60(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 rows: 45 train (6 batches of 8 an epoch), 15 validation."""
    d = tmp_path_factory.mktemp("data60")
    write_jsonl(d / "train.jsonl", make_texts(60, seed=3))
    return d


def test_checkpoint_on_an_epoch_end_step_is_written_once(tiny_bert: Path, data60: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=3", "train.save_every=6", "train.keep_checkpoints=10")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_12", "step_18", "step_6"]
    for step in (6, 12, 18):
        state = json.loads((run / "checkpoints" / f"step_{step}" / "train_state.json").read_text())
        assert state["global_step"] == step and state["batches_in_epoch"] == 0 and state["epoch"] == step // 6
    assert (run / "checkpoints" / "step_18" / "best_adapter" / "adapter_model.safetensors").is_file()


def test_eval_every_dividing_the_epoch_evaluates_each_step_once(tiny_bert: Path, data60: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=2", "train.eval_every=3")) == 0
    evals = [(e["event"], e["step"]) for e in events(run) if e["event"] in ("eval", "epoch_end")]
    assert evals == [("eval", 3), ("epoch_end", 6), ("eval", 9), ("epoch_end", 12)]


def test_patience_counts_real_evaluations_only(tiny_bert: Path, data60: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A learning rate this small changes no prediction: every evaluation after the first is "no improvement".
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=4", "train.eval_every=6", "train.patience=2", "train.lr=1e-12")) == 0
    assert [e["step"] for e in events(run, "epoch_end")] == [6, 12, 18]
    assert json.loads((run / "summary.json").read_text())["steps"] == 18, "stopped after 2 evaluations without improvement"
    assert json.loads((run / "summary.json").read_text())["best_step"] == 6


def test_early_stopping_with_loss_as_the_metric(tiny_bert: Path, data60: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A huge learning rate makes the validation loss worse after the first epoch: early stop, best = epoch 1.
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=5", "train.patience=1", "train.metric_for_best=loss", "train.lr=0.3")) == 0
    ends = events(run, "epoch_end")
    best = [e for e in ends if e["best"]]
    assert ends[-1]["best"] is False and len(ends) < 5
    losses = [e["val_loss"] for e in ends]
    assert best[-1]["val_loss"] == min(losses)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_loss"] == pytest.approx(min(losses)) and summary["best_step"] == best[-1]["step"]


def test_resume_latest_skips_incomplete_and_stray_checkpoints(tiny_bert: Path, data60: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=1")) == 0
    ckpts = run / "checkpoints"
    (ckpts / "step_x").mkdir()  # a stray name
    (ckpts / "step_99").mkdir()  # cut during a save: no train_state.json
    (ckpts / "step_99" / "model.safetensors").write_bytes(b"truncated")
    capsys.readouterr()
    assert main(tiny_args(tiny_bert, data60, run, "train.epochs=2", "train.resume=latest")) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out and "step_6 at step 6" in out.out
    assert "step_99: incomplete checkpoint" in out.err and "step_x: not a checkpoint" in out.err
    assert [e["step"] for e in events(run, "train")] == list(range(1, 13)), "no step logged twice"


def test_resume_after_max_steps_mid_epoch_continues_from_the_same_batch(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    constant = ("train.scheduler=constant", "train.warmup_ratio=0")
    cut = tmp_path / "cut"
    assert main(tiny_args(tiny_bert, toy_data, cut, *constant, "train.max_steps=7")) == 0
    state = json.loads((cut / "checkpoints" / "step_7" / "train_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 7)
    assert main(tiny_args(tiny_bert, toy_data, cut, *constant, "train.max_steps=12", "train.resume=latest")) == 0
    whole = tmp_path / "whole"
    assert main(tiny_args(tiny_bert, toy_data, whole, *constant, "train.max_steps=12")) == 0
    assert_same_trained_weights(whole / "checkpoints" / "step_12" / "model.safetensors", cut / "checkpoints" / "step_12" / "model.safetensors")


def test_logged_loss_is_the_mean_over_the_interval(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    each, every5 = tmp_path / "each", tmp_path / "every5"
    assert main(tiny_args(tiny_bert, toy_data, each, "train.max_steps=10", "train.log_every=1")) == 0
    assert main(tiny_args(tiny_bert, toy_data, every5, "train.max_steps=10", "train.log_every=5")) == 0
    per_step = [e["loss"] for e in events(each, "train")]
    logged = events(every5, "train")
    assert [e["step"] for e in logged] == [5, 10]
    assert logged[0]["loss"] == pytest.approx(sum(per_step[:5]) / 5, abs=1e-6)
    assert logged[1]["loss"] == pytest.approx(sum(per_step[5:]) / 5, abs=1e-6)


def test_grad_accum_matches_the_same_global_batch(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(tiny_args(tiny_bert, toy_data, a, "train.max_steps=6", "train.batch_size=8")) == 0
    assert main(tiny_args(tiny_bert, toy_data, b, "train.max_steps=6", "train.batch_size=4", "train.grad_accum=2")) == 0
    la, lb = events(a, "train"), events(b, "train")
    assert [e["step"] for e in la] == [e["step"] for e in lb] == list(range(1, 7))
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
    ta = load_file(str(a / "checkpoints" / "step_6" / "model.safetensors"))
    tb = load_file(str(b / "checkpoints" / "step_6" / "model.safetensors"))
    for k in (k for k in ta if "lora_" in k):
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_learning_rate_schedule_values(tiny_bert: Path, toy_data: Path, tmp_path: Path, scheduler: str) -> None:
    import math

    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.max_steps=10", "train.warmup_ratio=0.2", f"train.scheduler={scheduler}", "train.lr=0.01")) == 0
    lrs = [e["lr"] for e in events(run, "train")]  # the rate for the next step, after each optimizer step
    expected = []
    for step in range(1, 11):
        if step < 2:
            expected.append(0.01 * step / 2)
        elif scheduler == "linear":
            expected.append(0.01 * (10 - step) / 8)
        elif scheduler == "cosine":
            expected.append(0.01 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
        else:
            expected.append(0.01)
    assert lrs == pytest.approx(expected, abs=1e-9)


# --- real kills ------------------------------------------------------------------------------------

KILL_ARGS = ("train.epochs=3", "train.save_every=4", "lora.dropout=0.1", "train.keep_checkpoints=3")

# Runs the trainer in this process after arranging a SIGKILL of itself inside a checkpoint write: after
# every rank's save_state, before the checkpoint is completed and renamed.
KILL_IN_SAVE = """
import os, signal, sys
import trainer.checkpoints as c
target = int(os.environ["KILL_IN_SAVE_AT"])
real = c.finish
def finish(root, step, *a, **k):
    if step == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(root, step, *a, **k)
c.finish = finish
from trainer.train import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def kill_at_step(cmd: list[str], run: Path, step: int, timeout: float = 120) -> int:
    """Start training, SIGKILL it as soon as metrics.jsonl shows `step`; returns the step it had reached."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    reached = 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "metrics.jsonl").is_file():
                steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
                reached = max(steps, default=0)
                if reached >= step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (rc {proc.returncode}) before step {step}"
    return reached


def train_cmd(tiny_bert: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "trainer" / "train.py"), *tiny_args(tiny_bert, data, run, *KILL_ARGS, *extra)]


def assert_resumes_to(reference: Path, cut: Path, tiny_bert: Path, data: Path) -> None:
    res = subprocess.run(train_cmd(tiny_bert, data, cut, "train.resume=latest"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("adapter_model.safetensors",):
        a, b = load_file(str(reference / "adapter" / name)), load_file(str(cut / "adapter" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert_same_trained_weights(reference / "checkpoints" / "step_45" / "model.safetensors", cut / "checkpoints" / "step_45" / "model.safetensors")
    steps = [e["step"] for e in events(cut, "train")]
    assert steps == list(range(1, 46)), "every step logged exactly once after the resume"


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    res = subprocess.run(train_cmd(tiny_bert, toy_data, run), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(uninterrupted: Path, tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("LORASHIP_FAULT_SEED", random.randrange(10**6)))
    step = random.Random(seed).randint(2, 38)
    cut = tmp_path / "cut"
    reached = kill_at_step(train_cmd(tiny_bert, toy_data, cut), cut, step)
    print(f"fault seed {seed}: killed at step {reached} (target {step})")
    assert_resumes_to(uninterrupted, cut, tiny_bert, toy_data)


def test_sigkill_during_a_checkpoint_write_then_resume_equals_uninterrupted(uninterrupted: Path, tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-c", KILL_IN_SAVE, *tiny_args(tiny_bert, toy_data, cut, *KILL_ARGS)]
    res = subprocess.run(cmd, env={**_env(), "KILL_IN_SAVE_AT": "16"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names == [".step_16.partial", "step_12", "step_15", "step_8"], "the cut checkpoint stays partial"
    assert_resumes_to(uninterrupted, cut, tiny_bert, toy_data)
    assert not (cut / "checkpoints" / ".step_16.partial").exists()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_sigkill_trials(uninterrupted: Path, tiny_bert: Path, toy_data: Path, tmp_path: Path, trial: int) -> None:
    step = random.Random(1000 + trial).randint(2, 40)
    cut = tmp_path / "cut"
    kill_at_step(train_cmd(tiny_bert, toy_data, cut), cut, step)
    assert_resumes_to(uninterrupted, cut, tiny_bert, toy_data)


# --- one run dir, one training ---------------------------------------------------------------------


def test_second_training_on_a_locked_run_dir_fails_and_the_first_is_unharmed(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(tiny_bert, toy_data, run, "train.epochs=12"), env=_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    assert first.poll() is None
    for extra in ((), ("train.resume=latest",), ("output.overwrite=true",)):
        assert main(tiny_args(tiny_bert, toy_data, run, *extra)) == 1
        err = capsys.readouterr().err
        assert "in use by another loraship process" in err and f"pid {first.pid} " in err, err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 180
    assert [e["step"] for e in events(run, "train")] == list(range(1, 181))
    assert not (run / ".lock").exists(), "the lock is released at the end"


def test_stale_lock_of_a_killed_run_is_taken_over(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    cut = kill_at_step(train_cmd(tiny_bert, toy_data, run), run, 5)
    assert cut >= 5 and (run / ".lock").is_file(), "a SIGKILLed run leaves its lock file behind"
    holder = json.loads((run / ".lock").read_text())
    assert main(tiny_args(tiny_bert, toy_data, run, *KILL_ARGS, "train.resume=latest")) == 0
    assert f"took over the stale lock of pid {holder['pid']}" in capsys.readouterr().err


def test_output_overwrite_replaces_only_a_run_dir_loraship_wrote(tiny_bert: Path, data60: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(tiny_args(tiny_bert, data60, mine, "train.max_steps=2", "output.overwrite=true")) == 1
    assert "only replaces a run dir that loraship wrote" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, data60, run, "train.max_steps=2")) == 0
    assert main(tiny_args(tiny_bert, data60, run, "train.max_steps=3", "output.overwrite=true")) == 0
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3]


def test_export_gate_takes_integer_labels(trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    from export.to_onnx import main as export_main

    labels = json.loads((trained_run / "adapter" / "loraship.json").read_text())["labels"]
    rows = [json.loads(x) for x in (toy_data / "test.jsonl").read_text().splitlines()]
    evalf = tmp_path / "int.jsonl"
    evalf.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": r["text"], "label": labels.index(r["label"])}) + "\n" for r in rows).encode())
    assert export_main(["--run", str(trained_run), "--output", str(tmp_path / "onnx"), "--eval-file", str(evalf)]) == 0
    measured = json.loads((tmp_path / "onnx" / "export_report.json").read_text())["eval_file"]
    assert measured["rows"] == 40
