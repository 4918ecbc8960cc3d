from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LABELS, assert_same_trained_weights, tiny_args, write_jsonl
from trainer.train import main


def _train_losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["event"] == "train"]


def test_end_to_end_writes_exactly_the_run_dir(trained_run: Path, toy_data: Path) -> None:
    run = trained_run
    # merged/ and onnx/ appear once the export tests have used this shared run
    assert sorted(p.name for p in run.iterdir() if p.name not in ("merged", "onnx")) == [
        ".loraship", "adapter", "calibration.jsonl", "checkpoints", "config.yaml", "metrics.jsonl", "summary.json", "test_metrics.json",
        "test_predictions.jsonl", "validation.jsonl",
    ]
    # What the export chooses its int8 method on: the validation split and training texts, in the run dir only.
    val = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    assert len(val) == 40 and {v["label"] for v in val} == set(LABELS)
    calibration = (run / "calibration.jsonl").read_text().splitlines()
    train_texts = {json.loads(x)["text"] for x in (toy_data / "train.jsonl").read_text().splitlines()}
    assert len(calibration) == 120 and all(json.loads(x)["text"] in train_texts for x in calibration)
    assert sorted(p.name for p in (run / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loraship.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
    ]
    # keep_checkpoints=2 with checkpoints at each of the 3 epoch ends
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_30", "step_45"]
    assert (run / "checkpoints" / "step_45" / "best_adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((run / "adapter" / "loraship.json").read_text())
    assert meta["labels"] == sorted(LABELS)
    assert meta["id2label"] == {str(i): n for i, n in enumerate(sorted(LABELS))}
    losses = _train_losses(run)
    assert len(losses) == 45 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, "loss falls"
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["rows"] == 40 and test["accuracy"] > 0.5
    assert set(test["per_class"]) == set(LABELS) and len(test["confusion_matrix"]) == 4
    preds = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and set(preds[0]) == {"text", "label", "pred", "probs"}
    assert sum(preds[0]["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(p["label"] == p["pred"] for p in preds) / 40 == pytest.approx(test["accuracy"])
    first_test_text = (toy_data / "test.jsonl").read_text().splitlines()[0]
    assert preds[0]["text"] == json.loads(first_test_text)["text"], "predictions are in file order"


def test_existing_run_dir_is_not_overwritten(trained_run: Path, tiny_bert: Path, toy_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (trained_run / "metrics.jsonl").read_text()
    assert main(tiny_args(tiny_bert, toy_data, trained_run)) == 1
    assert "run dir exists" in capsys.readouterr().err
    assert (trained_run / "metrics.jsonl").read_text() == before


def test_data_errors_exit_nonzero_with_file_and_line(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n')
    assert main(tiny_args(tiny_bert, tmp_path, tmp_path / "run")) == 1
    assert "train.jsonl:2: malformed JSON" in capsys.readouterr().err
    write_jsonl(tmp_path / "train.jsonl", [("a b", "x"), ("c d", "y")] * 4)
    write_jsonl(tmp_path / "test.jsonl", [("a b", "x"), ("c d", "z")])
    assert main(tiny_args(tiny_bert, tmp_path, tmp_path / "run2", "data.test=test.jsonl")) == 1
    assert "test.jsonl:2: label 'z' is not one the model knows" in capsys.readouterr().err


def test_bad_config_exits_2(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "r", "train.lr=fast", "lora.rank=3")) == 2
    err = capsys.readouterr().err
    assert "train.lr: got 'fast'" in err and "lora.rank: unknown key" in err


def test_fp16_on_cpu_is_a_clear_error(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args(tiny_bert, toy_data, tmp_path / "r", "train.mixed_precision=fp16")) == 2
    err = capsys.readouterr().err
    assert "fp16: needs a GPU" in err
    # Each command line the message suggests works as written.
    suggested = err.split("Use ")[1].split()
    assert suggested[0].startswith("train.mixed_precision=") and suggested[1:3] == ["or", "no"]
    for override in (suggested[0], "train.mixed_precision=" + suggested[2]):
        assert main(tiny_args(tiny_bert, toy_data, tmp_path / override, override, "train.max_steps=2")) == 0


def test_question_answer_format_by_config_alone(tiny_bert: Path, tmp_path: Path) -> None:
    from tests.conftest import make_texts

    write_jsonl(tmp_path / "train.jsonl", make_texts(48, seed=5), text_field="question", label_field="answer")
    run = tmp_path / "run"
    rc = main(tiny_args(tiny_bert, tmp_path, run, "data.text_field=question", "data.label_field=answer", "train.epochs=1"))
    assert rc == 0
    assert json.loads((run / "adapter" / "loraship.json").read_text())["text_field"] == "question"


def test_bf16_autocast_on_cpu_trains(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(tiny_args(tiny_bert, toy_data, run, "train.mixed_precision=bf16", "train.epochs=1")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16"
    losses = _train_losses(run)
    assert len(losses) == 15 and all(math.isfinite(x) for x in losses)
    # master weights stay fp32
    assert all(t.dtype == torch.float32 for t in load_file(str(run / "adapter" / "adapter_model.safetensors")).values())


def test_distilbert_trains_and_saves_pre_classifier(tiny_distilbert: Path, toy_data: Path, tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.modeling import build_model

    run = tmp_path / "run"
    assert main(tiny_args(tiny_distilbert, toy_data, run, "train.epochs=1")) == 0
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any("q_lin.lora_A" in k for k in saved) and any("v_lin.lora_B" in k for k in saved)
    pre = [k for k in saved if "pre_classifier.weight" in k]
    assert len(pre) == 1 and any("classifier.weight" in k and "pre_" not in k for k in saved)
    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml", [f"model.name_or_path={tiny_distilbert}"])
    fresh = build_model(cfg.model, cfg.lora, sorted(LABELS), cfg.train.seed)
    init = dict(fresh.named_parameters())["base_model.model.pre_classifier.modules_to_save.default.weight"]
    assert not torch.allclose(saved[pre[0]], init.detach()), "pre_classifier moved away from its random init"


def test_resume_after_interruption_equals_uninterrupted(tiny_bert: Path, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.train as train_mod

    extra = ("train.epochs=2", "lora.dropout=0.1")  # dropout: the RNG state must be restored too
    full = tmp_path / "full"
    assert main(tiny_args(tiny_bert, toy_data, full, *extra, "train.save_every=5")) == 0

    cut = tmp_path / "cut"
    real_log_line = train_mod.log_line

    def crash_at_step_23(path: Path, record: dict) -> None:
        if record.get("event") == "train" and record["step"] == 23:
            raise KeyboardInterrupt("simulated kill")
        real_log_line(path, record)

    monkeypatch.setattr(train_mod, "log_line", crash_at_step_23)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tiny_bert, toy_data, cut, *extra, "train.save_every=5"))
    monkeypatch.setattr(train_mod, "log_line", real_log_line)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_15", "step_20"]
    assert main(tiny_args(tiny_bert, toy_data, cut, *extra, "train.save_every=5", "train.resume=latest")) == 0

    assert_same_trained_weights(full / "checkpoints" / "step_30" / "model.safetensors", cut / "checkpoints" / "step_30" / "model.safetensors")
    fa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=1e-6)
    # A run that did not move would pass the comparison trivially.
    assert _train_losses(full)[-1] < _train_losses(full)[0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    # An absurd learning rate overflows the weights after the first update.
    rc = main(tiny_args(tiny_bert, toy_data, run, "train.lr=1e30", "train.max_grad_norm=0", "train.save_every=1", "train.warmup_ratio=0"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss by step" in err and "last good checkpoint" in err
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts and all(math.isfinite(x) for x in _train_losses(run))
    state = json.loads((run / "checkpoints" / ckpts[-1] / "train_state.json").read_text())
    assert f"non-finite loss by step {state['global_step'] + 1}" in err


def test_an_exported_accelerate_variable_does_not_make_a_plain_run_a_launched_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """`export ACCELERATE_MIXED_PRECISION=bf16; nohup python trainer/train.py ...`: the parent shell exits, and
    a run that believed it was launched would stop as "launcher gone"."""
    from trainer.train import launched_by_accelerate

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.setenv(name, "bf16" if "PRECISION" in name else "true")
    assert launched_by_accelerate() is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launched_by_accelerate() is True


def test_tensorboard_logs_survive_the_start_of_a_run(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    """The TensorBoard writer starts after the run dir is claimed and cleared: a run (fresh, or replacing an old
    one) must not delete the event file it is about to write (the main job died of it)."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    for extra in ((), ("output.overwrite=true",)):
        assert main(tiny_args(tiny_bert, toy_data, run, "output.tensorboard=true", "train.log_every=1", *extra)) == 0
        events = list((run / "tb").rglob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 100
