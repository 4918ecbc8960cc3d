from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve_cli.__main__ import main
from serve_cli.runtime import OnnxClassifier
from tests.conftest import make_texts

REPO = Path(__file__).resolve().parent.parent
LABELS = ["Business", "Sci/Tech", "Sports", "World"]


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "serve_cli", *args], input=stdin, capture_output=True, env=env, cwd=REPO, timeout=120)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    # Lengths from 1 to ~60 words so that length sorting really reorders rows.
    rows = make_texts(100, seed=7, min_words=1, max_words=60)
    return [t for t, _ in rows]


def test_predict_jsonl_keeps_order_and_matches_unbatched(exported: Path, texts: list[str], tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t, "id": f"r{i}"}) for i, t in enumerate(texts)])
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--id-field", "id",
                 "--batch-size", "8", "--top-k", "4", "--variant", "fp32", "--quiet"]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
    clf = OnnxClassifier(exported, variant="fp32")
    for r, t in zip(rows, texts, strict=True):
        alone = clf.predict_proba([t])[0]  # batch of one: no padding at all
        assert r["label"] == LABELS[int(alone.argmax())]
        assert r["score"] == pytest.approx(float(alone.max()), abs=1e-4)
        assert r["top_k"][0]["label"] == r["label"] and len(r["top_k"]) == 4
        assert sum(x["score"] for x in r["top_k"]) == pytest.approx(1.0, abs=1e-4)
        assert r["top_k"] == sorted(r["top_k"], key=lambda x: -x["score"])


def test_serve_output_matches_pytorch_merged_model(exported: Path, trained_run: Path, texts: list[str], tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = write_lines(tmp_path / "in.txt", texts[:40])
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--variant", "fp32", "--top-k", "4", "--quiet"]) == 0
    got = np.array([[dict((x["label"], x["score"]) for x in r["top_k"])[n] for n in LABELS] for r in read_jsonl(out)])
    model = AutoModelForSequenceClassification.from_pretrained(trained_run / "merged").eval()
    tok = AutoTokenizer.from_pretrained(trained_run / "merged")
    with torch.no_grad():
        ref = torch.softmax(model(**tok(texts[:40], padding=True, truncation=True, max_length=32, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_csv_with_quotes_commas_and_newlines_to_csv_output(exported: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerow(["a", 'stock market, "profit" shares'])
        w.writerow(["b", "game team\ncoach win\nseason"])
        w.writerow(["c", "software computer"])
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--id-field", "id", "--top-k", "2", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert list(rows[0]) == ["id", "label", "score", "label_1", "score_1", "label_2", "score_2"]
    assert all(r["label"] in LABELS and r["label"] == r["label_1"] for r in rows)


def test_tsv_and_line_numbers_as_ids(exported: Path, tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.tsv", ["text\tother", "stock market\tx", "", "game team\ty"])
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [2, 4]


def test_stdin_to_stdout_plain_text(exported: Path) -> None:
    res = run_cli("predict", "--model", str(exported), "--input", "-", "--format", "txt", stdin=b"stock market profit\n\ngame team win\n")
    assert res.returncode == 0, res.stderr.decode()
    rows = [json.loads(x) for x in res.stdout.decode().splitlines()]
    assert [r["id"] for r in rows] == [1, 3]
    assert "rows: 2 in, 2 predicted, 0 errors" in res.stderr.decode()


def test_predict_and_eval_never_import_torch(exported: Path, tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "stock market", "label": "Business"}), json.dumps({"text": "game", "label": "Sports"})])
    code = (
        "import sys\nfrom serve_cli.__main__ import main\n"
        f"assert main(['predict', '--model', {str(exported)!r}, '--input', {str(src)!r}, '--output', {str(tmp_path / 'o.jsonl')!r}, '--quiet']) == 0\n"
        f"assert main(['eval', '--model', {str(exported)!r}, '--input', {str(src)!r}, '--report-dir', {str(tmp_path / 'rep')!r}, '--quiet']) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'sklearn', 'optimum', 'peft', 'accelerate', 'datasets'))\n"
        "print(bad)\nassert not bad\nassert 'onnxruntime' in sys.modules and 'tokenizers' in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


BAD_ROWS = [
    ("malformed", b'{"text": "ok"}\n{"text": "broken\n', 2, "malformed JSON"),
    ("no_field", b'{"text": "ok"}\n{"body": "x"}\n', 2, "missing field 'text'"),
    ("empty", b'{"text": "ok"}\n{"text": "   "}\n', 2, "field 'text' is empty"),
    ("utf8", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
]


@pytest.mark.parametrize(("name", "data", "line", "message"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_fails_with_file_line_and_leaves_no_output(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes, line: int, message: str) -> None:
    src = tmp_path / f"{name}.jsonl"
    src.write_bytes(data + b'{"text": "game team"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{src}:{line}: {message}" in err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*")), "no partial output left in place"


@pytest.mark.parametrize("mode", ["skip", "record"])
def test_skip_and_record_count_every_row(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(d for _, d, _, _ in BAD_ROWS) + b"\n\n" + b'{"text": "game team"}\n')
    # lines 1-8 alternate good 'ok' rows and the 4 bad rows; 9-10 blank; 11 one more good row
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--on-error", mode]) == 0
    preds = read_jsonl(out)
    err = capsys.readouterr().err
    assert len(preds) == 5
    assert "rows: 9 in, 5 predicted, 4 errors" in err
    if mode == "record":
        errors = read_jsonl(Path(f"{out}.errors.jsonl"))
        assert [e["line"] for e in errors] == [2, 4, 6, 8]
        assert "malformed JSON" in errors[0]["error"] and "invalid UTF-8" in errors[3]["error"]
        assert [p["id"] for p in preds] == [1, 3, 5, 7, 11]
        assert sorted([p["id"] for p in preds] + [e["line"] for e in errors]) == [1, 2, 3, 4, 5, 6, 7, 8, 11]
    else:
        assert f"{src}:2: malformed JSON" in err and f"{src}:8: invalid UTF-8" in err


def test_huge_line_is_truncated_not_crashed(exported: Path, tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    src.write_text("market " * 150_000 + "\nteam game\n")  # ~1 MB first line
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [1, 2]


def test_empty_file_gives_empty_output(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out)]) == 0
    assert out.read_text() == ""
    assert "rows: 0 in, 0 predicted, 0 errors" in capsys.readouterr().err


def test_existing_output_needs_overwrite(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.txt", ["stock market"])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out)]) == 1
    assert "output exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert read_jsonl(out)[0]["id"] == 1


def test_missing_or_wrong_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.txt", ["x"])
    assert main(["predict", "--model", str(tmp_path / "none"), "--input", str(src)]) == 1
    assert "model dir not found" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--input", str(src)]) == 1
    assert "not an ONNX export" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path)]) == 1


def test_missing_input_file(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", str(exported), "--input", str(tmp_path / "nope.jsonl")]) == 1
    assert "input file not found" in capsys.readouterr().err


METRIC_SCRIPT = '''
import datasets
import evaluate


class MatchRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of equal ids", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"match_rate": sum(int(p == r) for p, r in zip(predictions, references)) / len(predictions)}
'''


def test_eval_report_matches_sklearn_and_compares_variants(exported: Path, toy_data: Path, tmp_path: Path) -> None:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    metric = tmp_path / "match_rate.py"
    metric.write_text(METRIC_SCRIPT)
    rep = tmp_path / "report"
    assert main(["eval", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--report-dir", str(rep),
                 "--variant", "int8", "--compare", f"{exported}@fp32", "--metric", str(metric), "--allow-metric-code", "--quiet"]) == 0
    assert sorted(p.name for p in rep.iterdir()) == [".loraship", "confusion_matrix.json", "confusion_matrix.png", "metrics.json", "predictions.jsonl", "report.md"]
    assert (rep / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((rep / "metrics.json").read_text())
    preds = read_jsonl(rep / "predictions.jsonl")
    y = [p["true"] for p in preds]
    yhat = [p["pred"] for p in preds]
    assert len(preds) == 40 == m["rows"]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, yhat))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, yhat, average="weighted", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y, yhat, average="macro", zero_division=0))
    sk = classification_report(y, yhat, labels=LABELS, output_dict=True, zero_division=0)
    for name in LABELS:
        assert m["per_class"][name]["precision"] == pytest.approx(sk[name]["precision"])
        assert m["per_class"][name]["recall"] == pytest.approx(sk[name]["recall"])
        assert m["per_class"][name]["f1"] == pytest.approx(sk[name]["f1-score"])
        assert m["per_class"][name]["support"] == sk[name]["support"]
    assert m["confusion_matrix"] == confusion_matrix(y, yhat, labels=LABELS).tolist()
    assert m["extra_metrics"][str(metric)]["match_rate"] == pytest.approx(m["accuracy"])
    assert [(c["variant"]) for c in m["compare"]] == ["int8", "fp32"]
    report_md = (rep / "report.md").read_text()
    assert "| model | variant | accuracy" in report_md and report_md.count(str(exported)) >= 2
    export_report = json.loads((exported / "export_report.json").read_text())
    assert m["compare"][1]["accuracy"] == pytest.approx(export_report["eval_file"]["onnx_fp32"]["accuracy"])
    assert m["accuracy"] == pytest.approx(export_report["eval_file"]["onnx_int8"]["accuracy"])


def test_eval_unknown_label_and_bad_metric(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": "stock", "label": "Business"}), json.dumps({"text": "rain", "label": "Weather"})])
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(tmp_path / "r1")]) == 1
    assert f"{src}:2: label 'Weather' is not one the model knows" in capsys.readouterr().err
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(tmp_path / "r2"), "--unknown-labels", "count", "--quiet"]) == 0
    m = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m["rows"] == 1 and m["unknown_labels"] == 1
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(tmp_path / "r3"), "--metric", str(tmp_path / "nometric.py"),
                 "--allow-metric-code"]) == 1
    assert "metric" in capsys.readouterr().err and not (tmp_path / "r3").exists()


def test_info(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(exported)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == LABELS and set(info["variants"]) == {"fp32", "int8"} and info["max_length"] == 32


# --- off the default path --------------------------------------------------------------------------


def test_order_across_several_windows_with_mixed_lengths(exported: Path, tmp_path: Path) -> None:
    from serve_cli.runtime import WINDOW_BATCHES

    rows = make_texts(2 * 2 * WINDOW_BATCHES + 37, seed=11, min_words=1, max_words=60)  # > 2 windows at batch size 2
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t, "id": i}) for i, (t, _) in enumerate(rows)])
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--batch-size", "2",
                 "--variant", "fp32", "--id-field", "id", "--quiet"]) == 0
    got = read_jsonl(out)
    assert [r["id"] for r in got] == list(range(len(rows)))
    clf = OnnxClassifier(exported, variant="fp32")
    alone = [clf.predict_proba([t])[0] for t, _ in rows]
    assert [r["label"] for r in got] == [LABELS[int(p.argmax())] for p in alone]
    assert [r["score"] for r in got] == pytest.approx([float(p.max()) for p in alone], abs=1e-4)


def test_byte_order_mark_in_jsonl_and_csv(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "stock market"}\n{"text": "game team"}\n')
    (tmp_path / "in.csv").write_bytes(b"\xef\xbb\xbftext,label\nstock market,Business\ngame team,Sports\n")
    for name in ("in.jsonl", "in.csv"):
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["predict", "--model", str(exported), "--input", str(tmp_path / name), "--output", str(out), "--quiet"]) == 0
        assert len(read_jsonl(out)) == 2
    rep = tmp_path / "rep"
    assert main(["eval", "--model", str(exported), "--input", str(tmp_path / "in.csv"), "--report-dir", str(rep), "--quiet"]) == 0


def test_eval_takes_integer_labels_as_indexes(exported: Path, toy_data: Path, tmp_path: Path) -> None:
    rows = read_jsonl(toy_data / "test.jsonl")
    src = write_lines(tmp_path / "int.jsonl", [json.dumps({"text": r["text"], "label": LABELS.index(r["label"])}) for r in rows])
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--report-dir", str(a), "--quiet"]) == 0
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(b), "--quiet"]) == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["rows"] == mb["rows"] == 40 and ma["accuracy"] == mb["accuracy"]


def test_tsv_output_is_tab_separated(exported: Path, tmp_path: Path) -> None:
    src = write_lines(tmp_path / "in.txt", ["stock market, profit", "game team"])
    out = tmp_path / "out.tsv"
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(out), "--quiet"]) == 0
    rows = list(csv.reader(out.open(encoding="utf-8"), delimiter="\t"))
    assert rows[0][:3] == ["id", "label", "score"] and len(rows) == 3 and all(len(r) == len(rows[0]) for r in rows)


def test_eval_records_bad_rows_in_an_errors_file(exported: Path, tmp_path: Path) -> None:
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"text": "stock market", "label": "Business"}\n{"text": 5, "label": "Sports"}\n{"text": "game", "label": "Sports"}\n')
    rep = tmp_path / "rep"
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(rep), "--on-error", "record", "--quiet"]) == 0
    assert [e["line"] for e in read_jsonl(rep / "errors.jsonl")] == [2]
    assert json.loads((rep / "metrics.json").read_text())["row_errors"] == 1
    errors = tmp_path / "bad.jsonl"
    assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(tmp_path / "rep2"),
                 "--on-error", "record", "--errors-file", str(errors), "--quiet"]) == 0
    assert [e["line"] for e in read_jsonl(errors)] == [2]


@pytest.mark.parametrize("args, message", [
    (["--errors-file", "x.jsonl"], "--errors-file needs --on-error record"),
    (["--batch-size", "0"], "expected an integer >= 1"),
])
def test_bad_options_are_usage_errors(exported: Path, tmp_path: Path, args: list[str], message: str) -> None:
    src = write_lines(tmp_path / "in.txt", ["stock market"])
    res = run_cli("predict", "--model", str(exported), "--input", str(src), "--output", str(tmp_path / "o.jsonl"), *args)
    assert res.returncode == 2 and message in res.stderr.decode() and b"Traceback" not in res.stderr


def test_overwrite_never_deletes_a_dir_serve_cli_did_not_write(exported: Path, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    args = ["eval", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--overwrite", "--quiet"]
    assert main([*args, "--report-dir", "."]) == 1
    assert "was not written by loraship" in capsys.readouterr().err
    assert (work / "precious.txt").read_text() == "keep me"
    # A report dir serve_cli wrote is replaced; one under a missing parent is created.
    assert main([*args, "--report-dir", "new/parent/rep"]) == 0
    assert main([*args, "--report-dir", "new/parent/rep"]) == 0
    assert (work / "new" / "parent" / "rep" / "report.md").is_file()
    assert sorted(p.name for p in (work / "new" / "parent").iterdir()) == ["rep"], "no temp dirs left"


def test_outputs_get_the_usual_permissions(exported: Path, toy_data: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "p.jsonl"
        assert main(["predict", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--output", str(out), "--quiet"]) == 0
        rep = tmp_path / "rep"
        assert main(["eval", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--report-dir", str(rep), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert rep.stat().st_mode & 0o777 == 0o755


def test_no_output_into_a_run_dir_that_is_training(exported: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loraship.fsutil import RunDirLock

    run = tmp_path / "run"
    with RunDirLock(run, "training"):
        assert main(["predict", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--output", str(run / "p.jsonl")]) == 1
        assert "a training is writing" in capsys.readouterr().err
        assert main(["eval", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--report-dir", str(run / "eval")]) == 1
        assert "a training is writing" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == []
    assert main(["predict", "--model", str(exported), "--input", str(toy_data / "test.jsonl"), "--output", str(run / "p.jsonl"), "--quiet"]) == 0


def test_json_array_input_is_read_like_the_trainer_reads_it(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"text": "a b"}, {"txt": "no text"}, {"text": "c"}]))
    assert main(["predict", "--model", str(exported), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                 "--on-error", "skip"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert f"{src} item 2: missing field 'text'" in capsys.readouterr().err


def test_eval_metric_runs_code_only_when_allowed(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c", "label": "World"}\n')
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(exported), "--input", str(data), "--report-dir", str(tmp_path / "r"), "--metric", "accuracy"])
    assert e.value.code == 2
    assert "--allow-metric-code" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_eval_checks_the_errors_file_before_any_inference(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import serve_cli.evaluate as cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c", "label": "World"}\n')
    (tmp_path / "errors.jsonl").write_text("mine\n")

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(cli, "OnnxClassifier", no_inference)
    code = main(["eval", "--model", str(exported), "--input", str(data), "--report-dir", str(tmp_path / "r"),
                 "--on-error", "record", "--errors-file", str(tmp_path / "errors.jsonl")])
    assert code == 1 and "output exists" in capsys.readouterr().err
    assert (tmp_path / "errors.jsonl").read_text() == "mine\n" and not (tmp_path / "r").exists()


def test_a_confusion_plot_of_many_labels_never_costs_the_report(tmp_path: Path) -> None:
    from serve_cli.evaluate import markdown_report, plot_confusion

    many = [f"label_{i}" for i in range(600)]
    reason = plot_confusion(np.eye(600, dtype=np.int64), many, tmp_path / "big.png", "600 labels")
    assert reason and not (tmp_path / "big.png").exists()
    assert plot_confusion(np.eye(60, dtype=np.int64), many[:60], tmp_path / "mid.png", "60 labels") is None
    assert (tmp_path / "mid.png").stat().st_size > 0
    report = {"model": "m", "variant": "fp32", "rows": 1, "per_class": {}, "labels": ["a"], "confusion_matrix": [[1]]}
    assert "no plot: 600 labels" in markdown_report(report, [], {}, "in.jsonl", 0, reason)


def test_eval_takes_csv_integer_labels_as_the_trainer_does(exported: Path, tmp_path: Path) -> None:
    """A CSV cell `2` is the JSON integer 2: it indexes the model's (non-integer) labels in eval too."""
    rows = [(t, y) for t, y in make_texts(30, seed=8)]
    named, numbered = tmp_path / "named.csv", tmp_path / "numbered.csv"
    named.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    numbered.write_text("text,label\n" + "".join(f'"{t}",{LABELS.index(y)}\n' for t, y in rows))
    for src in (named, numbered):
        assert main(["eval", "--model", str(exported), "--input", str(src), "--report-dir", str(tmp_path / src.stem), "--quiet"]) == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("named", "numbered"))
    assert a["rows"] == b["rows"] == 30 and a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_predict_reads_a_directory_of_files(exported: Path, tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (d / "sub" / "b.csv").write_text("text\nthree\n")
    (d / ".hidden.jsonl").write_text('{"text": "skipped"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(exported), "--input", str(d), "--output", str(out), "--quiet"]) == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"{d / 'a.jsonl'}:1", f"{d / 'a.jsonl'}:2", f"{d / 'sub' / 'b.csv'}:2"]


def test_batches_end_where_padding_would_pass_its_share() -> None:
    """Length-sorted rows: a few long rows never pad a batch of short ones to their length, rows of equal
    length fill whole batches, and every row is in exactly one batch."""
    from serve_cli.runtime import MAX_PADDING, length_batches

    widths = [26, 32, 43, 54, 55, 68, 77, 128, 128, 128]
    batches = list(length_batches(widths, 32))
    assert [i for a, b in batches for i in range(a, b)] == list(range(len(widths)))
    assert batches == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 10)], "the long rows run together, without the short ones"
    for a, b in batches:
        padded, real = (b - a) * widths[b - 1], sum(widths[a:b])
        assert (1 - MAX_PADDING) * padded <= real
    assert list(length_batches([50] * 70, 32)) == [(0, 32), (32, 64), (64, 70)]
    assert list(length_batches([50] * 10, 32, max_tokens=200)) == [(0, 4), (4, 8), (8, 10)]
    assert list(length_batches(widths, 32, max_padding=1.0)) == [(0, 10)]
