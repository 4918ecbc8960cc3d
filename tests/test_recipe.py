"""The recipe's decisions: epochs from the data, steps from a time budget, the schedule that follows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_texts, tiny_args, write_jsonl
from trainer import recipe
from trainer.config import ConfigError, load_config
from trainer.train import main


def test_auto_epochs_gives_many_small_classes_more_passes() -> None:
    # AG News (4 labels, 19,373 training rows) and TREC coarse keep today's 2 epochs.
    assert recipe.auto_epochs(19_373, np.full(4, 4_843))[0] == 2
    assert recipe.auto_epochs(5_103, np.array([1_100, 1_200, 800, 80, 1_000, 923]))[0] == 2
    # TREC fine (50 labels, ~100 rows each) and a 77-label intent set of 10k rows get more.
    epochs, why = recipe.auto_epochs(5_103, np.r_[np.full(49, 100), 203])
    assert epochs == 10 and "50 labels" in why and "1,000 presentations per label" in why
    assert recipe.auto_epochs(10_003, np.full(77, 130))[0] == 8
    # Labels absent from the training rows do not count; tiny sets stop at the cap.
    assert recipe.auto_epochs(5_103, np.r_[np.full(49, 100), 203, 0, 0])[0] == 10
    assert recipe.auto_epochs(40, np.array([20, 20]))[0] == recipe.AUTO_MAX_EPOCHS


def test_events_count_epoch_ends_multiples_and_the_last_step() -> None:
    assert recipe.events(0, 25, steps_per_epoch=10, every=0) == 3  # 10, 20, 25
    assert recipe.events(0, 20, steps_per_epoch=10, every=4) == 6  # 4, 8, 10, 12, 16, 20
    assert recipe.events(12, 20, steps_per_epoch=10, every=0) == 1  # 20
    assert recipe.events(20, 20, steps_per_epoch=10, every=0) == 0


def test_budget_steps_is_the_largest_total_that_fits() -> None:
    costs = recipe.Costs(step=1.0, evaluation=5.0, checkpoint=1.0)
    # 10 s and 10 steps done, 100 steps per epoch. Ending inside epoch 1 costs one evaluation and one checkpoint
    # at the last step: 10 + (T - 10) + 5 + 1 <= 105  ->  T = 99.
    assert recipe.budget_steps(105, 10, 10, 1000, costs, 100, 0, 0) == 99
    # With 110 s, T = 100 fits (106 s); T = 101 would add the epoch end's evaluation and checkpoint (113 s).
    assert recipe.budget_steps(110, 10, 10, 1000, costs, 100, 0, 0) == 100
    # Never more than the cap; at least one more step even when nothing fits.
    assert recipe.budget_steps(10_000, 10, 10, 50, costs, 100, 0, 0) == 50
    assert recipe.budget_steps(5, 10, 10, 1000, costs, 100, 0, 0) == 11
    # Epoch ends cost an evaluation and a checkpoint each: 20 steps per epoch, 100 s from step 0:
    # T = 70 needs 70 + 4 x 6 = 94 s (ends at 20, 40, 60 and 70), T = 75: 75 + 24 = 99, T = 76: 100.
    assert recipe.budget_steps(100, 0, 0, 1000, costs, 20, 0, 0) == 76


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_factor_matches_transformers_schedules(kind: str) -> None:
    import torch
    from transformers import get_scheduler

    total, warmup_ratio = 37, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if kind == "constant" else kind
    sched = get_scheduler(name, opt, num_warmup_steps=int(warmup_ratio * total), num_training_steps=total)
    ours = [recipe.lr_factor(step, total, warmup_ratio, kind) for step in range(total)]
    theirs = []
    for _ in range(total):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_config_takes_auto_or_a_number() -> None:
    assert load_config(None, ["data.train=x.jsonl"]).train.epochs == "auto"
    assert load_config(None, ["data.train=x.jsonl", "train.epochs=3"]).train.epochs == 3.0
    assert load_config(None, ["data.train=x.jsonl", "train.patience=2"]).train.patience == 2
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x.jsonl", "train.epochs=many", "train.patience=soon", "train.time_budget_minutes=-1"])
    text = str(e.value)
    assert "train.epochs: got 'many'; expected float or one of 'auto'" in text
    assert "train.patience: got 'soon'" in text and "train.time_budget_minutes: got -1.0" in text


def test_auto_epochs_and_early_stopping_in_a_run(tiny_bert: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", make_texts(64, seed=5))
    run = tmp_path / "run"
    # lr ~0: validation never improves after the first epoch, so patience 3 (auto) stops at epoch 4 of 20.
    assert main(tiny_args(tiny_bert, tmp_path, run, "train.epochs=auto", "train.lr=1e-12")) == 0
    summary = json.loads((run / "summary.json").read_text())
    r = summary["recipe"]
    assert r["epochs_setting"] == "auto" and r["epochs"] == recipe.AUTO_MAX_EPOCHS and r["patience"] == 3
    assert "48 training rows, 4 labels" in r["why"]
    assert r["early_stopped_at_step"] == 4 * r["steps_per_epoch"] == summary["steps"]
    # A number keeps today's behaviour: no early stopping unless asked.
    run2 = tmp_path / "run2"
    assert main(tiny_args(tiny_bert, tmp_path, run2, "train.epochs=2", "train.lr=1e-12")) == 0
    r2 = json.loads((run2 / "summary.json").read_text())["recipe"]
    assert r2["patience"] == 0 and r2["epochs"] == 2 and "early_stopped_at_step" not in r2


def test_time_budget_fixes_the_steps_and_the_schedule_ends_there(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.train as train

    # The loop's clock is driven by the work done, not the wall: each training micro-batch takes 40 ms and
    # each evaluation 50 ms of it, however loaded the machine is. 3,000 steps cannot fit in 3 seconds.
    now = [0.0]
    real_loss, real_evaluate = train.training_loss, train.evaluate

    def loss(*args: Any, **kwargs: Any) -> Any:
        now[0] += 0.04
        return real_loss(*args, **kwargs)

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        now[0] += 0.05
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "clock", lambda: now[0])
    monkeypatch.setattr(train, "training_loss", loss)
    monkeypatch.setattr(train, "evaluate", evaluate)
    write_jsonl(tmp_path / "train.jsonl", make_texts(64, seed=5))
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, tmp_path, run, "train.epochs=500", "train.time_budget_minutes=0.05", "train.warmup_ratio=0.1")) == 0
    summary = json.loads((run / "summary.json").read_text())
    plan, cap = summary["recipe"]["time_budget"], summary["recipe"]["steps"]
    assert cap == 500 * summary["recipe"]["steps_per_epoch"]
    assert summary["steps"] == plan["planned_steps"] < cap, "the budget, not the epochs, ends the run"
    assert plan["step_seconds"] > 0 and plan["evaluation_seconds"] > 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    # The schedule was fitted to the plan: it decays to zero at the planned last step, not at the cap.
    assert lrs[summary["steps"]] == 0.0
    assert max(lrs.values()) > 0.005
    # About 3 s / 40 ms steps, less the evaluations: the plan follows the measured step cost.
    assert 50 <= summary["steps"] <= 75 and plan["step_seconds"] == pytest.approx(0.04)


def test_step_flops_count_frozen_and_trainable_linear_weights() -> None:
    import torch

    from trainer.mfu import step_flops_per_token

    model = torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.Linear(10, 5))
    model[0].weight.requires_grad_(False)
    # frozen: forward + input gradient (4 per weight); trainable: + weight gradient (6 per weight)
    assert step_flops_per_token(model, mean_length=7) == 4 * 200 + 6 * 50


def test_summary_reports_mfu_against_the_measured_peak(trained_run: Path) -> None:
    m = json.loads((trained_run / "summary.json").read_text())["mfu"]
    assert m["dtype"] == "float32" and m["peak_gemm_gflops"] > 0 and m["flops_per_token"] > 0
    assert m["mfu"] == pytest.approx(m["achieved_gflops"] / m["peak_gemm_gflops"], rel=0.01, abs=1e-5)


def test_class_weights_are_balanced_and_capped() -> None:
    w = recipe.class_weights(np.array([300, 100, 0, 2]))
    # 402 rows, 3 labels present: 402 / (3 x count); the 2-row label is capped; an absent label gets 1.
    assert w.tolist() == pytest.approx([402 / 900, 402 / 300, 1.0, recipe.MAX_CLASS_WEIGHT])


def _model_batch_logits(tiny_bert: Path) -> tuple[Any, dict[str, Any], Any]:
    """A 4-label tiny classifier, a batch of 6 random rows, and its logits."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4).eval()
    batch = {"input_ids": torch.randint(5, 100, (6, 9)), "attention_mask": torch.ones(6, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 3, 0, 0])}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return model, batch, logits


def test_weighted_training_loss(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    import torch

    from trainer.train import training_loss

    model, batch, logits = _model_batch_logits(tiny_bert)
    with torch.no_grad():
        plain = float(training_loss(model, batch, None))
        weighted = float(training_loss(model, batch, torch.tensor([0.5, 1.0, 2.0, 4.0])))
    assert plain == pytest.approx(float(torch.nn.functional.cross_entropy(logits, batch["labels"])), rel=1e-5)
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = (torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none") * w[batch["labels"]]).sum() / w[batch["labels"]].sum()
    assert weighted == pytest.approx(float(expected), rel=1e-5) and weighted != pytest.approx(plain, rel=1e-3)
    # In a run: the weights are in summary.json, label by label.
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.class_weights=auto", "train.max_steps=2")) == 0
    weights = json.loads((run / "summary.json").read_text())["recipe"]["class_weights"]
    assert set(weights) == {"World", "Sports", "Business", "Sci/Tech"} and all(0 < v <= 10 for v in weights.values())


def test_label_smoothing_in_the_training_loss(tiny_bert: Path) -> None:
    import torch

    from trainer.train import training_loss

    model, batch, logits = _model_batch_logits(tiny_bert)
    with torch.no_grad():
        smoothed = float(training_loss(model, batch, None, 0.1))
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.1)
    assert smoothed == pytest.approx(float(expected), rel=1e-5)
    assert smoothed != pytest.approx(float(torch.nn.functional.cross_entropy(logits, batch["labels"])), rel=1e-3)


def test_head_learns_at_its_own_rate(tiny_bert: Path) -> None:
    from trainer.config import load_config
    from trainer.modeling import build_model
    from trainer.train import param_groups

    cfg = load_config(None, [f"model.name_or_path={tiny_bert}", "data.train=x.jsonl", "train.lr=0.001", "train.head_lr_scale=10"])
    model = build_model(cfg.model, cfg.lora, ["a", "b", "c"], seed=0)
    groups = param_groups(model, cfg.train, recipe.head_lr_scale(cfg.train.head_lr_scale, 3)[0])
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, list[str]] = {}
    for g in groups:
        by_lr.setdefault(g["lr"], []).extend(names[id(p)] for p in g["params"])
    assert set(by_lr) == {0.001, 0.01}
    assert by_lr[0.01] and all("modules_to_save" in n for n in by_lr[0.01]), "the head at 10x"
    assert all("lora_" in n for n in by_lr[0.001])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].ndim < 2)
    with pytest.raises(ConfigError, match="head_lr_scale"):
        load_config(None, ["data.train=x.jsonl", "train.head_lr_scale=0"])


def test_auto_head_lr_scale_follows_the_label_count() -> None:
    assert recipe.head_lr_scale("auto", 4)[0] == 1.0 and recipe.head_lr_scale("auto", 10)[0] == 1.0
    scale, why = recipe.head_lr_scale("auto", 50)
    assert scale == recipe.AUTO_HEAD_LR_SCALE and "50 labels" in why
    assert recipe.head_lr_scale(2.5, 50) == (2.5, "train.head_lr_scale")

