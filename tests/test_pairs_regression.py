"""Sentence pairs and regression targets through every stage: the reader, the trainer (pair encoding, MSE on
scaled targets, metrics), the export (parity of both heads, with and without token_type_ids), serve_cli
predict/eval, HTTP (TEI's pair shapes) and the page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from loraship import rows as reader
from loraship.labels import fractional, number
from loraship.metrics import average_ranks, pearson, regression_report, spearman
from loraship.task import REGRESSION, Task
from serve_cli.__main__ import main as serve_main
from serve_cli.runtime import OnnxClassifier, proba_in_order
from tests.conftest import PAIR_ARGS, REPO, _tokenizer_dir, make_pairs, tiny_args
from tests.test_http import Server
from trainer.data_cache import make_encoder
from trainer.train import main as train_main
from trainer.train import training_loss


def pairs_of(path: Path, n: int | None = None) -> list[tuple[str, str]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()][:n]
    return [(r["sentence_A"], r["sentence_B"]) for r in rows]


# --- encoding ------------------------------------------------------------------------------------------------


def test_pair_encoding_equals_the_tokenizers_pair_encoding_with_longest_first_truncation() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    long_a = "a fairly long first sentence " * 12
    cases = [("a man is playing a guitar", "nobody plays"), (long_a, "short second one"), ("short first", long_a), (long_a, long_a)]
    first, second = [a for a, _ in cases], [b for _, b in cases]
    for max_length in (16, 64):
        ids, types = make_encoder(tok, max_length, pair=True)(first, second)
        want = tok(first, second, truncation=True, max_length=max_length)
        assert ids == want["input_ids"]
        assert types == want["token_type_ids"]  # BERT's: 0 for the first text, 1 for the second
        assert any(1 in t for t in types) and all(len(x) <= max_length for x in ids)
        # longest-first keeps both sides: a long first text does not crowd out the second
        sep = tok.sep_token_id
        assert all(x.count(sep) == 2 and x.index(sep) < len(x) - 2 for x in ids)


def test_serving_encodes_a_pair_as_the_tokenizer_does(pair_exported: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair_exported)
    clf = OnnxClassifier(pair_exported, variant="fp32", max_length=16)
    pairs = [("a man is playing a guitar", "the man plays an instrument"), ("one two three four five six seven eight", "nine ten eleven twelve")]
    encs = clf.encode(pairs)
    want = tok([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=16)
    assert [e.ids for e in encs] == want["input_ids"]
    assert [e.type_ids for e in encs] == want["token_type_ids"]


def test_the_reader_reads_pairs_and_names_a_missing_second_text(tmp_path: Path) -> None:
    src = tmp_path / "p.csv"
    src.write_text("a,b,score\nfirst,second,4.5\nonly first,,2\n", encoding="utf-8")
    _, rows = reader.read(str(src), "auto", reader.Fields("a", "score", text_pair="b"))
    got = list(rows)
    assert isinstance(got[0], reader.Row) and got[0].input == ("first", "second") and number(got[0].label) == 4.5
    assert isinstance(got[1], reader.RowError) and got[1].where == f"{src}:3" and "'b' is empty" in got[1].message
    txt = tmp_path / "t.txt"
    txt.write_text("one\n")
    with pytest.raises(reader.InputError, match="pairs as JSONL, CSV or Parquet"):
        reader.read(str(txt), "auto", reader.Fields("text", text_pair="b"))


# --- regression: targets, loss, metrics -----------------------------------------------------------------------


def test_numbers_and_the_auto_rule() -> None:
    assert number(4.5) == 4.5 and number("3.25") == 3.25 and number(" 2 ") == 2.0
    assert number("abc") is None and number(True) is None and number(float("nan")) is None and number([1]) is None
    assert fractional([1.5, 2, "3"]) and not fractional([1, 2, 3]) and not fractional(["World", 1.5])


def test_regression_metrics_equal_scipy_and_sklearn() -> None:
    from scipy.stats import pearsonr, rankdata, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    rng = np.random.default_rng(0)
    y = np.round(rng.uniform(1, 5, 300), 1)  # rounded: many ties, which Spearman must rank by their mean
    p = y + rng.normal(0, 0.7, 300)
    rep = regression_report(y, p)
    assert rep["pearson"] == pytest.approx(pearsonr(y, p).statistic, abs=1e-12)
    assert rep["spearman"] == pytest.approx(spearmanr(y, p).statistic, abs=1e-12)
    assert rep["mse"] == pytest.approx(mean_squared_error(y, p), abs=1e-12)
    assert rep["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-12)
    np.testing.assert_array_equal(average_ranks(y), rankdata(y))
    assert pearson(y, np.ones_like(y)) == 0.0 and spearman(y, y) == pytest.approx(1.0)


def test_regression_loss_is_torchs_mse_on_the_scaled_target() -> None:
    class Head(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return type("Out", (), {"logits": input_ids[:, :1].float() / 10})()

    batch = {"input_ids": torch.tensor([[3, 1], [12, 1], [-5, 1]]), "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "labels": torch.tensor([2.0, 4.5, 1.0])}
    target = {"name": "score", "mean": 3.0, "std": 1.25}
    got = training_loss(Head(), batch, None, 0.0, target)
    want = torch.nn.functional.mse_loss(torch.tensor([0.3, 1.2, -0.5]), (batch["labels"] - 3.0) / 1.25)
    assert got.item() == pytest.approx(want.item(), abs=1e-7)


def test_scaled_outputs_round_trip_to_the_datas_units() -> None:
    y = np.array([1.0, 2.7, 3.4, 4.9, 5.0])
    target = {"name": "score", "mean": float(y.mean()), "std": float(y.std())}
    task = Task(REGRESSION, ["score"], target=target)
    scaled = ((y - target["mean"]) / target["std"]).astype(np.float32)[:, None]  # what the model learns to output
    np.testing.assert_allclose(task.probs(scaled)[:, 0], y, rtol=1e-6)
    assert task.row_output(task.probs(scaled)[2], 3) == {"score": pytest.approx(3.4, abs=1e-5)}
    # the int8 criterion without labels: no change costs nothing, a change costs Pearson points
    ref = task.probs(scaled)
    assert task.expected_drop(ref, ref) == pytest.approx(0.0, abs=1e-9)
    noise = np.random.default_rng(0).normal(0, 1, ref.shape).astype(np.float32)
    small, big = task.expected_drop(ref, ref + 0.03 * noise), task.expected_drop(ref, ref + 0.3 * noise)
    assert 0 < small < big
    assert task.changed(ref, ref + 0.3 * noise) > 0 and task.changed(ref, ref + 0.01 * noise) == 0


# --- training -------------------------------------------------------------------------------------------------


def test_regression_run_records_the_task_and_scale(reg_exported: Path, pair_data: Path) -> None:
    run = reg_exported.parent
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "regression" and "numbers with fractions" in summary["task_why"]
    y = np.array([json.loads(x)["score"] for x in (pair_data / "train.jsonl").read_text().splitlines()])
    assert summary["target"]["mean"] == pytest.approx(y.mean(), rel=1e-5)
    assert summary["target"]["std"] == pytest.approx(y.std(), rel=1e-4)
    assert {"test_pearson", "test_spearman", "test_mse", "test_mae"} <= summary.keys()
    preds = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert preds[0].keys() == {"text", "text_pair", "label", "pred"}
    # the run's test metrics are those of its own predictions (the data's units)
    rep = regression_report(np.array([p["label"] for p in preds]), np.array([p["pred"] for p in preds]))
    assert rep["pearson"] == pytest.approx(summary["test_pearson"], abs=1e-4)
    config = json.loads((reg_exported / "config.json").read_text())
    assert config["problem_type"] == "regression" and list(config["id2label"].values()) == ["score"]
    assert config["loraship_target"] == summary["target"]
    assert config["loraship_inputs"] == {"text": "sentence_A", "text_pair": "sentence_B"}


def test_a_target_that_is_not_a_number_names_its_file_and_line(tiny_bert: Path, pair_data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("validation", "test"):
        shutil.copy(pair_data / f"{name}.jsonl", data / f"{name}.jsonl")
    rows = make_pairs(40, 5)
    rows[6]["score"] = "high"
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = train_main(tiny_args(tiny_bert, data, tmp_path / "run", *PAIR_ARGS, "data.label_field=score", "data.task=regression"))
    err = capsys.readouterr().err
    assert rc == 1 and f"{data / 'train.jsonl'}:7" in err and "'high' is not a number" in err


def test_regression_with_class_names_is_a_config_error(tiny_bert: Path, pair_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_main(tiny_args(tiny_bert, pair_data, tmp_path / "run", *PAIR_ARGS, "data.label_field=score", "data.task=regression",
                              "data.labels=[a,b]"))
    assert rc == 2 and "data.task=regression: data.labels names classes" in capsys.readouterr().err


# --- export: parity of both heads, with and without token_type_ids -------------------------------------------


@pytest.mark.parametrize("which", ["pair_exported", "reg_exported"])
def test_every_conversion_keeps_parity(which: str, request: pytest.FixtureRequest) -> None:
    onnx_dir: Path = request.getfixturevalue(which)
    report = json.loads((onnx_dir / "export_report.json").read_text())
    assert report["merge"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    assert report["input_fields"] == {"text": "sentence_A", "text_pair": "sentence_B"}
    assert {i.name for i in OnnxClassifier(onnx_dir, variant="fp32").session.get_inputs()} >= {"token_type_ids"}
    # merged PyTorch vs ONNX on pairs, through the tokenizer's own pair encoding (non-zero LoRA init: lora.init_std)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged_dir = onnx_dir.parent / "merged"
    model = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    pairs = [("cat dog bird", "the stock market fell"), ("goal match team win", "football players scored"), ("a b c", "d e f g h")]
    with torch.no_grad():
        ref = model(**tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")).logits.numpy()
    clf = OnnxClassifier(onnx_dir, variant="fp32")
    np.testing.assert_allclose(clf.logits(pairs), ref, atol=1e-4)
    if clf.task.regression:
        np.testing.assert_allclose(clf.predict_proba(pairs)[:, 0], ref[:, 0] * clf.task.target["std"] + clf.task.target["mean"], rtol=1e-5)


def test_a_pair_model_without_token_type_ids_exports_with_parity(tiny_distilbert: Path, pair_data: Path, tmp_path: Path) -> None:
    from export.to_onnx import main as export_main

    run = tmp_path / "run"
    assert train_main(tiny_args(tiny_distilbert, pair_data, run, *PAIR_ARGS, "data.label_field=score", "train.epochs=1")) == 0
    assert export_main(["--run", str(run)]) == 0
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    assert report["parity_fp32"]["max_abs_diff"] <= 1e-4 and report["task"] == "regression"
    assert "token_type_ids" not in {i.name for i in OnnxClassifier(run / "onnx", variant="fp32").session.get_inputs()}


# --- serving: files, eval, HTTP ----------------------------------------------------------------------------


def _predict(model: Path, src: Path, out: Path, *extra: str) -> list[dict]:
    assert serve_main(["predict", "--model", str(model), "--input", str(src), "--output", str(out), "--quiet", *extra]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_predict_reads_the_trained_pair_fields_and_writes_scores(reg_exported: Path, pair_data: Path, tmp_path: Path) -> None:
    rows = _predict(reg_exported, pair_data / "test.jsonl", tmp_path / "o.jsonl", "--variant", "fp32")
    assert len(rows) == 80 and rows[0].keys() == {"id", "score"}
    clf = OnnxClassifier(reg_exported, variant="fp32")
    want = proba_in_order(clf, pairs_of(pair_data / "test.jsonl"))[:, 0]
    np.testing.assert_allclose([r["score"] for r in rows], want, atol=1e-5)
    # CSV with other column names: the fields are given
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("q,d\n" + "".join(f'"{a}","{b}"\n' for a, b in pairs_of(pair_data / "test.jsonl", 5)))
    out = tmp_path / "o.csv"
    assert serve_main(["predict", "--model", str(reg_exported), "--variant", "fp32", "--input", str(csv_in), "--output", str(out),
                       "--text-field", "q", "--text-pair-field", "d", "--quiet"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,score" and np.allclose([float(x.split(",")[1]) for x in lines[1:]], want[:5], atol=1e-5)


def test_a_one_text_model_refuses_a_pair_field(exported: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = serve_main(["predict", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                     "--text-pair-field", "b"])
    assert rc != 0 and "reads one text per row, not pairs" in capsys.readouterr().err


def test_eval_of_a_regression_model_writes_metrics_a_scatter_plot_and_the_report(reg_exported: Path, pair_data: Path, tmp_path: Path) -> None:
    rep_dir = tmp_path / "rep"
    assert serve_main(["eval", "--model", str(reg_exported), "--input", str(pair_data / "test.jsonl"), "--report-dir", str(rep_dir),
                       "--variant", "fp32", "--compare", f"{reg_exported}@int8", "--quiet"]) == 0
    metrics = json.loads((rep_dir / "metrics.json").read_text())
    y = np.array([json.loads(x)["score"] for x in (pair_data / "test.jsonl").read_text().splitlines()])
    pred = proba_in_order(OnnxClassifier(reg_exported, variant="fp32"), pairs_of(pair_data / "test.jsonl"))[:, 0]
    assert metrics["pearson"] == pytest.approx(regression_report(y, pred)["pearson"], abs=1e-9)
    assert [c["variant"] for c in metrics["compare"]] == ["fp32", "int8"]
    png = (rep_dir / "scatter.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = (rep_dir / "report.md").read_text()
    assert "![predicted against true](scatter.png)" in report and "| model | variant | Pearson |" in report
    first = json.loads((rep_dir / "predictions.jsonl").read_text().splitlines()[0])
    assert first.keys() == {"text", "text_pair", "true", "pred"}


def test_eval_of_a_pair_classifier(pair_exported: Path, pair_data: Path, tmp_path: Path) -> None:
    rep_dir = tmp_path / "rep"
    assert serve_main(["eval", "--model", str(pair_exported), "--input", str(pair_data / "test.jsonl"), "--report-dir", str(rep_dir),
                       "--label-field", "judgment", "--quiet"]) == 0
    metrics = json.loads((rep_dir / "metrics.json").read_text())
    assert metrics["rows"] == 80 and set(metrics["per_class"]) == {"OTHER", "SAME"}


@pytest.fixture(scope="module")
def reg_server(reg_exported: Path):  # type: ignore[no-untyped-def]
    server = Server(reg_exported, "--variant", "int8")
    yield server
    server.stop()


def test_http_takes_teis_pair_shapes_and_answers_what_predict_writes(reg_server: Server, reg_exported: Path, pair_data: Path,
                                                                     tmp_path: Path) -> None:
    pairs = pairs_of(pair_data / "test.jsonl")
    files = _predict(reg_exported, pair_data / "test.jsonl", tmp_path / "o.jsonl", "--variant", "int8")
    one = httpx.post(f"{reg_server.url}/predict", json={"inputs": list(pairs[0])}).json()
    assert one == [{"score": pytest.approx(files[0]["score"], abs=1e-5), "label": "score"}]
    batch = httpx.post(f"{reg_server.url}/predict", json={"inputs": [list(p) for p in pairs]}, timeout=30).json()
    # row-wise int8 computes each row from itself: the same scores as the file's batches, whatever the batch
    np.testing.assert_allclose([b[0]["score"] for b in batch], [r["score"] for r in files], atol=1e-5)
    info = httpx.get(f"{reg_server.url}/info").json()
    assert info["task"] == "regression" and info["inputs"] == "pair" and info["input_fields"]["text_pair"] == "sentence_B"
    assert info["target"]["name"] == "score"
    for payload, words in (({"inputs": "one text"}, "reads pairs of texts"), ({"inputs": ["a", "b", "c"]}, "a pair is two texts"),
                           ({"inputs": [["a", "b"], ["c"]]}, "inputs[1] must be a pair"), ({"inputs": [["a", ""]]}, "inputs[0][1] is empty")):
        r = httpx.post(f"{reg_server.url}/predict", json=payload)
        assert r.status_code == 422 and words in r.json()["error"], (payload, r.text)


def test_a_one_text_server_refuses_pairs(exported: Path) -> None:
    from serve_cli.http import ApiError, Limits, parse_predict

    with pytest.raises(ApiError, match="not pairs"):
        parse_predict(json.dumps({"inputs": [["a", "b"]]}).encode(), Limits(), pair=False)
    assert parse_predict(json.dumps({"inputs": [["a"], ["b"]]}).encode(), Limits())[0] == ["a", "b"]  # TEI's batch form
    assert parse_predict(json.dumps({"inputs": ["a", "b"]}).encode(), Limits())[0] == ["a", "b"]  # as before: two texts


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"), reason="chromium not installed (.ci/run installs it)")
def test_the_page_has_a_second_box_for_a_pair_model(reg_server: Server, reg_exported: Path, tmp_path: Path) -> None:
    a, b = "goal match team", "football players scored"
    want = OnnxClassifier(reg_exported, variant="int8").predict_proba([(a, b)])[0, 0]
    url = f"{reg_server.url}/?text={a.replace(' ', '+')}&text_pair={b.replace(' ', '+')}&autorun=1"
    dom = subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert f'<strong id="top-label">{want:.3f}</strong>' in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert 'id="text-pair"' in dom.stdout and "inputs: pairs (sentence_A, sentence_B)" in dom.stdout


def test_serve_cli_never_imports_torch_for_pairs(reg_exported: Path, pair_data: Path, tmp_path: Path) -> None:
    code = ("import sys; from serve_cli.__main__ import main; "
            f"rc = main(['predict', '--model', {str(reg_exported)!r}, '--input', {str(pair_data / 'test.jsonl')!r}, "
            f"'--output', {str(tmp_path / 'o.jsonl')!r}, '--quiet']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
