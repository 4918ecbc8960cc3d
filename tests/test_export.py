from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from export.to_onnx import main
from tests.conftest import tiny_args
from trainer.train import main as train_main

ONNX_FILES = [
    ".loraship", "README.md", "config.json", "export_report.json", "model.onnx", "model_quantized.onnx",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
]


def test_export_writes_validated_onnx_dir(exported: Path, trained_run: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == ONNX_FILES
    report = json.loads((exported / "export_report.json").read_text())
    assert report["merge"]["max_abs_diff"] <= 1e-4
    shapes = {(c["batch_size"], c["max_length"]) for c in report["parity_fp32"]["cases"]}
    assert shapes == {(1, 16), (8, 16), (1, 32), (8, 32)}
    assert report["parity_fp32"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["min_argmax_agree"] == 1.0
    assert report["parity_int8"]["min_argmax_agree"] >= 0.75
    # The default variant is chosen on the run's validation split; the test file is only reported.
    assert report["gate"]["by"] == "validation accuracy (int8 search)" and report["gate"]["rows"] == 40
    search = report["int8_search"]
    assert search["selected_on"] == "validation" and search["max_drop_points"] == 0.3 and search["candidates"]
    assert report["default_variant"] == ("int8" if search["chosen"] else "fp32")
    for c in search["candidates"]:
        assert c["drop_points"] == pytest.approx(100 * (search["fp32"]["accuracy"] - c["accuracy"]))
        assert c["chosen"] == (c["name"] == search["chosen"]) and c["rows_per_second"] > 0 and c["bytes"] > 0
    ev = report["eval_file"]
    assert ev["file"] == "test.jsonl" and ev["rows"] == 40 and set(ev) >= {"onnx_fp32", "onnx_int8", "int8_drop_points"}
    assert "merged" not in ev, "the slow PyTorch evaluation only with --eval-merged"
    for v in ("fp32", "int8"):
        info = report["variants"][v]
        assert info["bytes"] == (exported / info["file"]).stat().st_size and len(info["sha256"]) == 64
    shipped = next(c for c in search["candidates"] if c["name"] == search["shipped"])
    assert shipped["bytes"] == report["variants"]["int8"]["bytes"], "a candidate's size is its file's as it ships"
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "Business", "1": "Sci/Tech", "2": "Sports", "3": "World"}
    assert report["versions"]["onnxruntime"] and report["opset"] == 18
    phases = report["phase_seconds"]
    assert set(phases) == {"merge", "onnx_export_and_parity", "int8_and_default_variant", "eval_file"}
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= report["total_seconds"]


def test_merged_model_differs_from_base_and_keeps_the_head(exported: Path, trained_run: Path, tiny_bert: Path) -> None:
    merged = load_file(str(trained_run / "merged" / "model.safetensors"))
    base = load_file(str(tiny_bert / "model.safetensors"))
    assert not any("lora_" in k or "modules_to_save" in k for k in merged)
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged[q], base[q.removeprefix("bert.")]), "LoRA was merged into the weights"
    adapter = load_file(str(trained_run / "adapter" / "adapter_model.safetensors"))
    head = next(k for k in adapter if k.endswith("classifier.weight"))
    torch.testing.assert_close(merged["classifier.weight"], adapter[head])


def test_optimum_ort_class_loads_the_dir(exported: Path) -> None:
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from serve_cli.runtime import OnnxClassifier

    texts = ["stock market profit shares", "game team coach win season league"]
    tok = AutoTokenizer.from_pretrained(str(exported))
    enc = tok(texts, padding=True, return_tensors="np")
    for file_name, variant in (("model.onnx", "fp32"), ("model_quantized.onnx", "int8")):
        ort_model = ORTModelForSequenceClassification.from_pretrained(str(exported), file_name=file_name)
        got = ort_model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
        ours = OnnxClassifier(exported, variant=variant).logits(texts)
        np.testing.assert_allclose(got, ours, atol=1e-5)


def test_rerun_reuses_and_other_inputs_need_force(exported: Path, trained_run: Path, toy_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamp = (exported / "model.onnx").stat().st_mtime_ns
    assert main(["--run", str(trained_run), "--eval-file", str(toy_data / "test.jsonl")]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (exported / "model.onnx").stat().st_mtime_ns == stamp
    assert main(["--run", str(trained_run), "--opset", "17"]) == 1
    assert "exists and was built from other inputs; pass --force" in capsys.readouterr().err
    assert (exported / "model.onnx").stat().st_mtime_ns == stamp


def test_force_rebuilds_into_another_output(trained_run: Path, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main(["--run", str(trained_run), "--output", str(out), "--quantization", "ort-dynamic"]) == 0
    assert json.loads((out / "export_report.json").read_text())["quantization"]["method"] == "ort-dynamic"
    assert json.loads((out / "export_report.json").read_text())["merge"]["reused"] is True
    before = (out / "model.onnx").stat().st_mtime_ns
    assert main(["--run", str(trained_run), "--output", str(out), "--quantization", "optimum-avx2", "--force"]) == 0
    assert (out / "model.onnx").stat().st_mtime_ns != before
    assert sorted(p.name for p in out.iterdir()) == ONNX_FILES
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-")], "no temp dir left behind"


def test_distilbert_exports_without_token_type_ids(tiny_distilbert: Path, toy_data: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    run = tmp_path / "run"
    assert train_main(tiny_args(tiny_distilbert, toy_data, run, "train.epochs=1", "lora.init_std=0.02")) == 0
    assert main(["--run", str(run)]) == 0
    sess = ort.InferenceSession(str(run / "onnx" / "model.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    assert report["merge"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    merged = load_file(str(run / "merged" / "model.safetensors"))
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    pre = next(k for k in adapter if k.endswith("pre_classifier.weight"))
    torch.testing.assert_close(merged["pre_classifier.weight"], adapter[pre])


def test_corrupted_adapter_fails_cleanly(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = shutil.copytree(trained_run / "adapter", tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "onnx")]) == 1
    assert "cannot read adapter weights" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "nothing left behind"


def test_errors_for_missing_inputs(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run", str(tmp_path / "nope")]) == 1
    assert "run dir not found" in capsys.readouterr().err
    adapter = shutil.copytree(trained_run / "adapter", tmp_path / "a1")
    meta = json.loads((adapter / "loraship.json").read_text())
    (adapter / "loraship.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "no-base")}))
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "--base-model" in err
    (adapter / "loraship.json").unlink()
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "o")]) == 1
    assert "no label map" in capsys.readouterr().err


def test_parity_failure_leaves_no_onnx_dir(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    rc = main(["--run", str(trained_run), "--output", str(out), "--merged-dir", str(tmp_path / "merged"), "--atol", "1e-12"])
    assert rc == 1
    assert "parity failed" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_onnx_parity_failure_leaves_nothing(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import export.to_onnx as to_onnx

    real = to_onnx.validate_onnx

    def broken(onnx_dir: Path, variant: str, *args: object) -> dict:
        result = real(onnx_dir, variant, *args)
        assert (onnx_dir / "model.onnx").is_file(), "the ONNX stage ran"
        return {**result, "max_abs_diff": 1.0} if variant == "fp32" else result

    monkeypatch.setattr(to_onnx, "validate_onnx", broken)
    out = tmp_path / "onnx"
    assert main(["--run", str(trained_run), "--output", str(out), "--merged-dir", str(tmp_path / "merged")]) == 1
    assert "ONNX fp32 parity failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no ONNX dir, no temp dir"


def test_no_qualifying_int8_candidate_keeps_fp32(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.gate as gate_mod

    real = gate_mod.onnx_proba

    def worse_int8(onnx_dir: Path, variant: str, texts: list[str], threads: int) -> np.ndarray:
        probs = real(onnx_dir, variant, texts, threads)
        if variant == "int8":
            # The first 8 texts (of the 40 validation rows) get another label than fp32's: 20 points worse.
            wrong = (real(onnx_dir, "fp32", texts[:8], threads).argmax(-1) + 1) % probs.shape[1]
            probs[:8] = np.eye(probs.shape[1])[wrong]
        return probs

    monkeypatch.setattr(gate_mod, "onnx_proba", worse_int8)
    out = tmp_path / "onnx"
    assert main(["--run", str(trained_run), "--output", str(out), "--max-int8-drop", "0.3"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    search = report["int8_search"]
    assert search["chosen"] is None and len(search["candidates"]) >= 2, "every candidate was tried"
    assert all(c["expected_drop_points"] > 0.3 and not c["chosen"] for c in search["candidates"])
    assert report["default_variant"] == "fp32" and "fp32 is the default" in search["verdict"]
    assert (out / "model_quantized.onnx").is_file(), "the plain int8 file still ships, not as the default"


def test_without_validation_rows_int8_needs_agreement_on_every_parity_text(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main(["--adapter", str(trained_run / "adapter"), "--output", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    gate = report["gate"]
    assert gate["by"].startswith("int8 vs fp32 agreement") and gate["rows"] == report["parity_texts"]["rows"] >= 32
    ok = gate["argmax_agree"] >= 0.98 and gate["max_abs_logit_diff"] <= 1.0
    assert report["default_variant"] == ("int8" if ok else "fp32")
    strict = tmp_path / "strict"
    assert main(["--adapter", str(trained_run / "adapter"), "--output", str(strict), "--max-int8-logit-diff", "0"]) == 0
    assert json.loads((strict / "export_report.json").read_text())["default_variant"] == "fp32"


@pytest.mark.parametrize("change", ["atol", "eval-contents", "text-field", "int8-methods"])
def test_reuse_fingerprint_covers_every_input(trained_run: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str) -> None:
    evalf = tmp_path / "eval.jsonl"
    shutil.copy(toy_data / "test.jsonl", evalf)
    out = tmp_path / "onnx"
    base = ["--run", str(trained_run), "--output", str(out), "--eval-file", str(evalf)]
    assert main(base) == 0
    assert main(base) == 0 and "up to date" in capsys.readouterr().out
    extra: list[str] = []
    if change == "atol":
        extra = ["--atol", "1e-3"]
    elif change == "int8-methods":
        extra = ["--int8-methods", "rowwise"]
    elif change == "eval-contents":
        evalf.write_text("".join(evalf.read_text().splitlines(keepends=True)[:20]))
    else:
        evalf.write_text(evalf.read_text().replace('"text"', '"body"'))
        extra = ["--text-field", "body"]
    assert main(base + extra) == 1
    assert "built from other inputs" in capsys.readouterr().err


def test_adapter_mode_writes_only_under_its_outputs(trained_run: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    adapter = shutil.copytree(trained_run / "adapter", shared / "adapter")
    before = sorted(p.name for p in shared.iterdir())
    out = tmp_path / "out" / "onnx"
    assert main(["--adapter", str(adapter), "--output", str(out)]) == 0
    assert sorted(p.name for p in shared.iterdir()) == before, "nothing written beside the adapter"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx"], "the temporary merged model is gone"
    assert (out / "model_quantized.onnx").is_file()


def test_force_never_replaces_a_dir_loraship_did_not_write(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["--run", str(trained_run), "--output", str(out), "--force"]) == 1
    assert "was not written by loraship" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep"


def test_export_refuses_a_run_dir_that_is_training(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraship.fsutil import RunDirLock

    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("merged", "onnx", "checkpoints"))
    with RunDirLock(run, "training"):
        assert main(["--run", str(run)]) == 1
        assert "in use by another loraship process" in capsys.readouterr().err
    assert not (run / "onnx").exists() and not (run / "merged").exists()


def test_shared_artifacts_hold_no_data_paths_and_texts_only_when_asked(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Defaults: no flag asks for texts, so the adapter holds none.
    assert train_main(tiny_args(tiny_bert, toy_data, run, "train.epochs=1", "lora.init_std=0.02")) == 0
    meta_text = (run / "adapter" / "loraship.json").read_text()
    meta = json.loads(meta_text)
    assert meta["sample_texts"] == [] and str(toy_data) not in meta_text and str(tmp_path) not in meta_text
    assert meta["config"]["data"]["train"] == "train.jsonl"
    train_texts = [json.loads(x)["text"] for x in (toy_data / "train.jsonl").read_text().splitlines()]
    assert not any(t in meta_text for t in train_texts)
    assert main(["--run", str(run)]) == 0
    report_text = (run / "onnx" / "export_report.json").read_text()
    report = json.loads(report_text)
    assert report["parity_texts"]["from"].startswith("generated") and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    assert str(toy_data) not in report_text and str(tmp_path) not in report_text
    asked = tmp_path / "asked"
    assert train_main(tiny_args(tiny_bert, toy_data, asked, "train.epochs=1", "output.embed_sample_texts=true")) == 0
    assert len(json.loads((asked / "adapter" / "loraship.json").read_text())["sample_texts"]) == 32


def test_outputs_are_readable_by_others(trained_run: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "onnx"
        assert main(["--run", str(trained_run), "--output", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.onnx").stat().st_mode & 0o777 == 0o644


def test_trust_remote_code_reaches_every_load(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--trust-remote-code is passed to every model and tokenizer load the export makes, the reloads included
    (optimum's own preprocessor copy inside main_export is optimum's)."""
    import sys

    import transformers

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def record(*args: object, _real=real, _name=cls.__name__, **kwargs: object) -> object:
            caller = sys._getframe(1).f_code.co_filename
            if f"{Path('export')}/" in caller and "site-packages" not in caller:
                seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    out = tmp_path / "onnx"
    assert main(["--adapter", str(trained_run / "adapter"), "--output", str(out), "--merged-dir", str(tmp_path / "merged"),
                 "--quantization", "ort-dynamic", "--trust-remote-code"]) == 0
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(flag is True for _, flag in seen), [s for s in seen if s[1] is not True]
