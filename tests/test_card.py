"""The model card written into every merged and ONNX dir: Hugging Face format, figures from the export report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("which", ["exported", "ml_exported", "pair_exported", "reg_exported"])
def test_every_exported_dir_has_a_card_whose_figures_are_the_reports(which: str, request: pytest.FixtureRequest) -> None:
    onnx: Path = request.getfixturevalue(which)
    report = json.loads((onnx / "export_report.json").read_text())
    card = _card(onnx / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "onnx" and data["pipeline_tag"] == "text-classification" and data["base_model"]
    results = {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}
    ev = report["eval_file"]
    for variant in ("fp32", "int8"):
        for metric, value in ev[f"onnx_{variant}"].items():
            assert results[("test", f"test {metric} (ONNX {variant})")] == pytest.approx(value, abs=1e-6)
    search = report["int8_search"]
    assert results[("validation", f"validation {search['metric']} (ONNX fp32)")] == pytest.approx(search["fp32"]["accuracy"], abs=1e-6)
    text = card.text
    for section in ("## Task and labels", "## Training data", "## Training", "## Evaluation", "## How to use", "## Limitations"):
        assert section in text
    assert f"Default variant: **{report['default_variant']}**" in text
    assert "ORTModelForSequenceClassification" in text and "serve_cli predict" in text
    assert "Fingerprint of the training rows" in text and "optimizer steps" in text
    run = onnx.parent
    assert str(run.parent) not in (onnx / "README.md").read_text(), "no local paths in a shared card"
    merged = _card(run / "merged" / "README.md")
    assert merged.data.to_dict()["library_name"] == "transformers" and "AutoModelForSequenceClassification" in merged.text


def test_a_multi_label_card_lists_the_thresholds(ml_exported: Path) -> None:
    text = (ml_exported / "README.md").read_text()
    thresholds = json.loads((ml_exported / "config.json").read_text())["loraship_thresholds"]
    assert "| label | threshold |" in text and "multi-label" in text
    for name, t in thresholds["per_label"].items():
        assert f"| {name} | {t:.2f} |" in text


def test_a_regression_pair_card_says_the_inputs_the_scale_and_how_to_undo_it(reg_exported: Path) -> None:
    text = (reg_exported / "README.md").read_text()
    config = json.loads((reg_exported / "config.json").read_text())
    target = config["loraship_target"]
    assert "sentence-pair regression model" in text and "`sentence_A` and `sentence_B`" in text
    assert f"mean {target['mean']:.4g} and standard deviation {target['std']:.4g}" in text
    assert 'tok.encode("a text", "its pair")' in text and "Training target `score`" in text
    merged = (reg_exported.parent / "merged" / "README.md").read_text()
    assert "loraship_target['std']" in merged and '["a text"], ["its pair"]' in merged
