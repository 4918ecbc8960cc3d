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


def outlier_model(tiny_bert: Path, out: Path, layers: list[int], where: str, factor: float = 1000) -> Path:
    """A copy of the tiny BERT with one activation channel scaled up `factor` times and the weights that read it
    scaled down as much: the fp32 function is unchanged, but a per-tensor int8 activation scale is set by that one
    channel and the others collapse. where="pooler": channel 0 of the last LayerNorm (read only by the pooler);
    where="context": channel 0 of the attention context (value output), read only by the attention output."""
    import torch
    from safetensors.torch import load_file, save_file

    base = shutil.copytree(tiny_bert, out)
    w = load_file(str(base / "model.safetensors"))
    with torch.no_grad():
        for i in layers:
            if where == "pooler":
                w[f"encoder.layer.{i}.output.LayerNorm.weight"][0] *= factor
                w[f"encoder.layer.{i}.output.LayerNorm.bias"][0] *= factor
                w["pooler.dense.weight"][:, 0] /= factor
            else:
                w[f"encoder.layer.{i}.attention.self.value.weight"][0] *= factor
                w[f"encoder.layer.{i}.attention.self.value.bias"][0] *= factor
                w[f"encoder.layer.{i}.attention.output.dense.weight"][:, 0] /= factor
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def outlier_run(tiny_bert: Path, toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pooler outlier (a Gemm: smoothing does not touch it, keeping it in fp32 does)."""
    base = outlier_model(tiny_bert, tmp_path_factory.mktemp("outlier") / "base", [1], "pooler")
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
    assert search["sensitivity"]["dynamic-smooth"][0]["node"] == SENSITIVE, "the outlier's MatMul is found as the most sensitive"
    kept = by_name["dynamic-smooth-keep-4"]
    assert SENSITIVE in kept["exclude"] and kept["drop_points"] <= 5, "keeping it in fp32 brings dynamic int8 back"
    assert by_name[search["chosen"]]["drop_points"] <= 5 and report["default_variant"] == "int8"
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
    assert info["int8_batch_independent"] == (info["quantization"] in ("rowwise", "static", "static-rowwise-4"))
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


def test_search_smooths_an_activation_outlier(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    base = outlier_model(tiny_bert, tmp_path / "base", [0, 1], "context", factor=100)
    run = tmp_path / "run"
    # LoRA on the query only: the scaled value and output weights stay as built.
    assert train_main(tiny_args(base, toy_data, run, "train.epochs=3", "lora.init_std=0.02", "lora.target_modules=[query]",
                                "train.lr=0.02")) == 0
    out = tmp_path / "onnx"
    assert export_main(["--run", str(run), "--output", str(out), "--max-int8-drop", "5", "--int8-try-all"]) == 0
    search = json.loads((out / "export_report.json").read_text())["int8_search"]
    by_name = {c["name"]: c for c in search["candidates"]}
    assert by_name["dynamic"]["expected_drop_points"] > 5, "plain dynamic int8 fails the criterion on this model"
    smooth = by_name["dynamic-smooth"]
    # Smoothing alone (nothing kept in fp32) brings int8 back to fp32's predictions: the outlier was the cause.
    assert smooth["exclude"] == [] and smooth["expected_drop_points"] < 1 and smooth["unlabelled_expected_drop_points"] < 1
    assert smooth["agreement"] > by_name["dynamic"]["agreement"] + 0.1


def test_qualify_needs_both_expected_drops_and_a_labelled_drop_within_its_noise() -> None:
    import numpy as np

    from export.int8_search import Candidate, qualify
    from loraship.task import Task

    task = Task("single_label", ["a", "b"])
    ref = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]])
    # A flip where fp32 was sure costs 0.8 of a row, a near-tie flip 0.1: (0.8 + 0.1) / 3 rows = 30 points.
    assert task.expected_drop(ref, np.array([[0.1, 0.9], [0.45, 0.55], [0.2, 0.8]])) == pytest.approx(30.0)
    assert task.expected_drop(ref, ref) == 0.0
    # 4 of 400 rows changed: the net count wanders by sqrt(4) = 2 rows = 0.5 points; two of those: 1 point.
    y = np.zeros(400, dtype=int)
    assert task.labelled_tolerance(4, y) == pytest.approx(1.0) and task.labelled_tolerance(0, y) == 0.0

    def cand(drop: float, flips: int, expected: float = 0.1, unlabelled: float = 0.1) -> Candidate:
        return Candidate("c", "dynamic", drop_points=drop, flips=flips, expected_drop_points=expected,
                         unlabelled_expected_drop_points=unlabelled)

    assert qualify(cand(1.25, 4), 0.3, task, y), "1.25 <= 0.3 + 1.0: within the labelled noise"
    worse = cand(1.5, 4)
    assert not qualify(worse, 0.3, task, y) and "labelled validation drop" in worse.why
    held_out = cand(0.0, 0, expected=0.5, unlabelled=0.0)
    assert not qualify(held_out, 0.3, task, y) and "on validation texts" in held_out.why
    training = cand(0.0, 0, expected=0.0, unlabelled=0.5)
    assert not qualify(training, 0.3, task, y) and "on training texts" in training.why


def test_smoothing_keeps_the_fp32_function(outlier_run: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from export.int8_search import calibration_feeds
    from export.smooth import smooth_model
    from serve_cli.runtime import OnnxClassifier

    out = tmp_path / "onnx"
    assert export_main(["--run", str(outlier_run), "--output", str(out), "--max-int8-drop", "5"]) == 0
    texts = [json.loads(x)["text"] for x in (outlier_run / "calibration.jsonl").read_text().splitlines()]
    feeds = calibration_feeds(OnnxClassifier(out, variant="fp32"), texts)
    smoothed = smooth_model(out / "model.onnx", tmp_path / "smoothed.onnx", feeds, 0.7)
    assert len(smoothed) == 2 * 4, "per layer: the attention input (Q, K, V share it), the context, the FFN input, the GELU output"
    ref = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp_path / "smoothed.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds:
        a, b = ref.run(None, feed)[0], got.run(None, feed)[0]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["rowwise", "static", "mixed"])
def test_batch_independent_int8_gives_a_row_the_same_answer_whatever_its_batch(exported: Path, tmp_path: Path, kind: str) -> None:
    """Row-wise scales (one per token row), static ones (fixed, calibrated) or both in one graph, with exact
    integer products: a text's probabilities are bit-identical alone, in a batch, in another order; and close
    to fp32's."""
    import shutil

    import numpy as np
    import onnx

    from export.common import weight_layers
    from export.int8_search import calibration_feeds, store_fused
    from export.rowwise import calibrated_ranges, quantize_rowwise
    from serve_cli.runtime import OnnxClassifier, proba_in_order
    from tests.conftest import make_texts

    d = tmp_path / "onnx"
    shutil.copytree(exported, d)
    texts = [t for t, _ in make_texts(120, seed=31, min_words=1, max_words=30)]
    fp32_clf = OnnxClassifier(d, variant="fp32")
    layers = [n.name for n in weight_layers(onnx.load(str(exported / "model.onnx")).graph)]
    static = None if kind == "rowwise" else calibrated_ranges(exported / "model.onnx", calibration_feeds(fp32_clf, texts[60:]))
    rowwise = layers[::3] if kind == "mixed" else []
    assert quantize_rowwise(exported / "model.onnx", tmp_path / "int8.onnx", static=static, rowwise=rowwise) == layers
    store_fused(tmp_path / "int8.onnx", d / "model_quantized.onnx")  # as the export ships it
    int8_graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    row_scaled = sum(n.op_type == "ReduceMax" for n in int8_graph.node)
    tables = [i for i in int8_graph.initializer if len(i.dims) == 2 and i.dims[0] == fp32_clf.tokenizer.get_vocab_size()]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8], "the word embedding table is int8"
    assert row_scaled == {"rowwise": len(layers), "static": 0, "mixed": len(rowwise)}[kind]
    clf = OnnxClassifier(d, variant="int8")
    batched = proba_in_order(clf, texts, batch_size=32)
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = np.empty_like(batched)
    shuffled[perm] = proba_in_order(clf, [texts[i] for i in perm], batch_size=7)
    alone = np.stack([clf.predict_proba([t])[0] for t in texts[:20]])
    assert np.array_equal(batched, shuffled) and np.array_equal(batched[:20], alone)
    fp32 = proba_in_order(fp32_clf, texts)
    assert np.abs(batched - fp32).max() < 0.05 and (batched.argmax(-1) == fp32.argmax(-1)).mean() >= 0.95


def test_stored_int8_adds_each_static_layers_bias_inside_its_integer_product(exported: Path, tmp_path: Path) -> None:
    """The shipped static int8 file adds a layer's bias in MatMulIntegerToFloat itself (its bias input) instead of
    in an Add after it: one pass less over every layer's output. Same answers as the graph before."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export.int8_search import calibration_feeds, store_fused
    from export.rowwise import calibrated_ranges, quantize_rowwise
    from serve_cli.runtime import OnnxClassifier
    from tests.conftest import make_texts

    texts = [t for t, _ in make_texts(40, seed=5, min_words=1, max_words=30)]
    fp32_clf = OnnxClassifier(exported, variant="fp32")
    ranges = calibrated_ranges(exported / "model.onnx", calibration_feeds(fp32_clf, texts))
    layers = quantize_rowwise(exported / "model.onnx", tmp_path / "int8.onnx", static=ranges)
    store_fused(tmp_path / "int8.onnx", tmp_path / "shipped.onnx")
    graph = onnx.load(str(tmp_path / "shipped.onnx")).graph
    products = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    product_outputs = {n.output[0] for n in products}
    assert len(products) == len(layers)
    assert sum(len(n.input) == 7 and n.input[6] != "" for n in products) == len(layers), "every layer has a bias"
    vectors = {i.name for i in graph.initializer if len(i.dims) == 1}
    vectors |= {n.output[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in vectors}
    assert not [n.name for n in graph.node if n.op_type == "Add" and product_outputs & set(n.input) and vectors & set(n.input)]
    feeds = calibration_feeds(fp32_clf, texts, batch_size=8)
    before, after = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (tmp_path / "int8.onnx", tmp_path / "shipped.onnx"))
    for feed in feeds:
        assert np.abs(before.run(None, feed)[0] - after.run(None, feed)[0]).max() < 1e-4


def test_int8_methods_limits_the_search_to_the_methods_asked(outlier_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--int8-methods rowwise: only row-wise candidates (closer to fp32 than static, slower); a method that does
    not exist is a usage error before any work."""
    out = tmp_path / "onnx"
    assert export_main(["--run", str(outlier_run), "--output", str(out), "--int8-methods", "rowwise", "--max-int8-drop", "5"]) == 0
    search = json.loads((out / "export_report.json").read_text())["int8_search"]
    assert [c["name"] for c in search["candidates"]] == ["rowwise"] and search["chosen"] == "rowwise"
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(outlier_run), "--output", str(tmp_path / "x"), "--int8-methods", "rowwise,fp8"])
    assert e.value.code == 2 and "static, rowwise, dynamic" in capsys.readouterr().err and not (tmp_path / "x").exists()
