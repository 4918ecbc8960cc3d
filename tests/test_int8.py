"""Accuracy-aware int8: a model whose plain dynamic int8 fails, and the search that fixes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.to_onnx import main as export_main
from tests.conftest import tiny_args
from trainer.train import main as train_main

SENSITIVE = "/bert/pooler/dense/Gemm"


@pytest.fixture(scope="module")
def outlier_run(tiny_bert: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with an activation outlier at one MatMul's input: channel 0 of the last LayerNorm is scaled
    up 1000x and the pooler's weights for that channel down 1000x, so the fp32 function is unchanged, but
    dynamic int8 picks the pooler input's activation scale from that one channel and the rest collapse."""
    import torch
    from safetensors.torch import load_file, save_file

    base = shutil.copytree(tiny_bert, tmp_path_factory.mktemp("outlier") / "base")
    weights = load_file(str(base / "model.safetensors"))
    with torch.no_grad():
        weights["encoder.layer.1.output.LayerNorm.weight"][0] *= 1000
        weights["encoder.layer.1.output.LayerNorm.bias"][0] *= 1000
        weights["pooler.dense.weight"][:, 0] /= 1000
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path_factory.mktemp("outlier-run") / "run"
    # LoRA on attention only: the pooler stays exactly the scaled base weights.
    assert train_main(tiny_args(base, toy_data, run, "train.epochs=3", "lora.init_std=0.02", "lora.target_modules=[query, value]",
                                "train.lr=0.02")) == 0
    return run


def test_search_keeps_the_sensitive_matmul_in_fp32(outlier_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    # 40 validation rows: one row is 2.5 points, so the criterion here is 2 rows (5 points).
    assert export_main(["--run", str(outlier_run), "--output", str(out), "--int8-try-all", "--max-int8-drop", "5"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    search = report["int8_search"]
    by_name = {c["name"]: c for c in search["candidates"]}
    assert by_name["dynamic"]["drop_points"] > 5, "plain dynamic int8 fails the criterion on this model"
    assert search["sensitivity"][0]["node"] == SENSITIVE, "the outlier's MatMul is found as the most sensitive"
    chosen = by_name[search["chosen"]]
    assert SENSITIVE in chosen["exclude"] and chosen["drop_points"] <= 5
    assert report["default_variant"] == "int8"
    from serve_cli.__main__ import main as serve_main

    assert serve_main(["info", "--model", str(out)]) == 0


def test_info_shows_the_chosen_method(outlier_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serve_cli.__main__ import main as serve_main

    out = tmp_path / "onnx"
    assert export_main(["--run", str(outlier_run), "--output", str(out), "--max-int8-drop", "5"]) == 0
    capsys.readouterr()
    assert serve_main(["info", "--model", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    report = json.loads((out / "export_report.json").read_text())
    assert info["quantization"] == report["int8_search"]["chosen"] and info["quantization"] != "dynamic"
    assert info["default_variant"] == "int8" and info["int8_search"]["selected_on"] == "validation"


def test_static_only_search_gives_batch_independent_int8(outlier_run: Path, tmp_path: Path) -> None:
    import numpy as np

    from serve_cli.runtime import OnnxClassifier

    out = tmp_path / "onnx"
    assert export_main(["--run", str(outlier_run), "--output", str(out), "--int8-static-only", "--max-int8-drop", "5"]) == 0
    search = json.loads((out / "export_report.json").read_text())["int8_search"]
    assert search["candidates"] and all(c["name"].startswith("static") for c in search["candidates"])
    clf = OnnxClassifier(out, variant="int8")
    texts = ["stock market profit", "game team win league season", "war", "software computer internet data research"]
    alone = np.concatenate([clf.logits([t]) for t in texts])
    together = clf.logits(texts)
    # Static scales: a row's logits do not depend on its batch mates (padding is masked).
    np.testing.assert_allclose(alone, together, atol=1e-4)
