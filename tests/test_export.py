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
    "config.json", "export_report.json", "model.onnx", "model_quantized.onnx",
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
    assert report["default_variant"] in ("int8", "fp32")
    gate = report["gate"]
    assert gate["rows"] == 40 and set(gate) >= {"merged", "onnx_fp32", "onnx_int8", "verdict"}
    assert gate["onnx_fp32"]["accuracy"] == pytest.approx(gate["merged"]["accuracy"])
    for v in ("fp32", "int8"):
        info = report["variants"][v]
        assert info["bytes"] == (exported / info["file"]).stat().st_size and len(info["sha256"]) == 64
    config = json.loads((exported / "config.json").read_text())
    assert config["id2label"] == {"0": "Business", "1": "Sci/Tech", "2": "Sports", "3": "World"}
    assert report["versions"]["onnxruntime"] and report["opset"] == 18


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
    assert main(["--adapter", str(adapter)]) == 1
    assert "cannot read adapter weights" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "merged").exists()


def test_errors_for_missing_inputs(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--run", str(tmp_path / "nope")]) == 1
    assert "run dir not found" in capsys.readouterr().err
    adapter = shutil.copytree(trained_run / "adapter", tmp_path / "a1")
    meta = json.loads((adapter / "loraship.json").read_text())
    (adapter / "loraship.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "no-base")}))
    assert main(["--adapter", str(adapter)]) == 1
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "--base-model" in err
    (adapter / "loraship.json").unlink()
    assert main(["--adapter", str(adapter)]) == 1
    assert "no label map" in capsys.readouterr().err


def test_parity_failure_leaves_no_onnx_dir(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    rc = main(["--run", str(trained_run), "--output", str(out), "--merged-dir", str(tmp_path / "merged"), "--atol", "1e-12"])
    assert rc == 1
    assert "parity failed" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
