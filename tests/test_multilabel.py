"""Multi-label classification end to end: input shapes, training, thresholds, metrics, export, serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loraship.labels import LabelMap
from loraship.metrics import choose_thresholds, decide, multilabel_report
from loraship.rows import Fields
from tests.conftest import LABELS, make_multilabel, tiny_args
from trainer.data import iter_rows
from trainer.train import main as train_main


def test_metrics_equal_scikit_learn() -> None:
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = (rng.random((300, 6)) < 0.2).astype(int)
    y[:, 5] = 0  # a label nobody has
    p = (rng.random((300, 6)) < 0.25).astype(int)
    p[:10] = 0  # rows with no label predicted
    got = multilabel_report(y, p, [f"l{i}" for i in range(6)])
    for avg in ("micro", "macro", "weighted", "samples"):
        assert got[f"f1_{avg}"] == pytest.approx(sk.f1_score(y, p, average=avg, zero_division=0)), avg
    assert got["precision_micro"] == pytest.approx(sk.precision_score(y, p, average="micro", zero_division=0))
    assert got["recall_micro"] == pytest.approx(sk.recall_score(y, p, average="micro", zero_division=0))
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert got["hamming_loss"] == pytest.approx(sk.hamming_loss(y, p))
    assert got["jaccard_samples"] == pytest.approx(sk.jaccard_score(y, p, average="samples", zero_division=0))
    per = sk.precision_recall_fscore_support(y, p, zero_division=0)
    for i in range(6):
        c = got["per_label"][f"l{i}"]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((per[0][i], per[1][i], per[2][i], per[3][i]))


def test_thresholds_per_label_above_the_floor_else_global() -> None:
    rng = np.random.default_rng(1)
    n = 400
    y = np.zeros((n, 3), dtype=int)
    y[:100, 0] = 1  # label 0: frequent, its positives score 0.35-0.45, negatives below 0.3
    y[:5, 2] = 1  # label 2: five positives, below the floor
    probs = rng.uniform(0.0, 0.3, (n, 3))
    probs[:100, 0] = rng.uniform(0.35, 0.45, 100)
    probs[100:200, 1] = rng.uniform(0.6, 0.9, 100)
    y[100:200, 1] = 1
    th = choose_thresholds(y, probs, ["a", "b", "c"], min_positives=20)
    assert 0.30 < th["per_label"]["a"] <= 0.35 and th["own_threshold"] == ["a", "b"]
    assert th["per_label"]["c"] == th["global"]
    on = decide(probs, np.array([th["per_label"][k] for k in "abc"]))
    assert on[:100, 0].all() and not on[200:, 0].any()


@pytest.mark.parametrize("shape", ["list", "separator", "columns"])
def test_each_input_shape_reads_the_same_label_sets(tmp_path: Path, shape: str) -> None:
    rows = make_multilabel(12, seed=3)
    if shape == "list":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"text": t, "labels": ls}) + "\n" for t, ls in rows))
        fields = Fields("text", "labels")
    elif shape == "separator":
        rows = [r for r in rows if r[1]]  # an empty cell is missing, not "no labels": see the next test
        path = tmp_path / "d.csv"
        path.write_text("text,labels\n" + "".join(f'"{t}","{";".join(ls)}"\n' for t, ls in rows))
        fields = Fields("text", "labels", label_separator=";")
    else:
        path = tmp_path / "d.csv"
        path.write_text("text," + ",".join(LABELS) + "\n"
                        + "".join(f'"{t}",' + ",".join(str(int(lab in ls)) for lab in LABELS) + "\n" for t, ls in rows))
        fields = Fields("text", None, label_fields=tuple(LABELS))
    names = LabelMap(LABELS)
    got = [(r.text, names.target(r.label, multi=True)) for r in iter_rows(str(path), fields)]
    assert got == [(t, names.target(ls, multi=True)) for t, ls in rows]


def test_no_labels_only_where_the_format_says_so(tmp_path: Path) -> None:
    from loraship import rows as reader

    (tmp_path / "d.csv").write_text("text,labels\nsome text,\nmore text,joy;fear\nbad,\"0,1\"\n")
    items = list(reader.read(str(tmp_path / "d.csv"), "auto", Fields("text", "labels", label_separator=";"))[1])
    assert isinstance(items[0], reader.RowError) and "is empty" in items[0].message
    assert items[1].label == ["joy", "fear"]
    (tmp_path / "c.csv").write_text("text,joy,fear\nnone at all,0,0\nboth,1,true\nodd,2,0\n")
    items = list(reader.read(str(tmp_path / "c.csv"), "auto", Fields("text", None, label_fields=("joy", "fear")))[1])
    assert items[0].label == [] and items[1].label == ["joy", "fear"]
    assert isinstance(items[2], reader.RowError) and "must be 0 or 1" in items[2].message


@pytest.mark.parametrize("shape", ["separator", "columns"])
def test_training_chooses_multi_label_from_the_settings(tiny_bert: Path, tmp_path: Path, shape: str) -> None:
    rows = [r for r in make_multilabel(60, seed=4) if r[1]]
    if shape == "separator":
        (tmp_path / "train.csv").write_text("text,tags\n" + "".join(f'"{t}","{";".join(ls)}"\n' for t, ls in rows))
        extra = ["data.label_field=tags", "data.label_separator=;"]
    else:
        (tmp_path / "train.csv").write_text("text," + ",".join(LABELS) + "\n"
                                            + "".join(f'"{t}",' + ",".join(str(int(lab in ls)) for lab in LABELS) + "\n" for t, ls in rows))
        extra = [f"data.label_fields={json.dumps(LABELS)}"]
    run = tmp_path / "run"
    assert train_main(tiny_args(tiny_bert, tmp_path, run, "data.train=train.csv", "train.max_steps=4", *extra)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "multi_label" and ("separator" in summary["task_why"] or "label_fields" in summary["task_why"])
    assert set(summary["thresholds"]["per_label"]) == set(LABELS)


# --- end to end on a trained and exported tiny model -------------------------------------------------------


def _test_rows(ml_data: Path) -> list[dict]:
    return [json.loads(x) for x in (ml_data / "test.jsonl").read_text().splitlines()]


def test_thresholds_are_chosen_on_validation_and_travel_with_the_model(ml_exported: Path) -> None:
    run = ml_exported.parent
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "adapter" / "loraship.json").read_text())
    config = json.loads((ml_exported / "config.json").read_text())
    report = json.loads((ml_exported / "export_report.json").read_text())
    assert summary["task"] == meta["task"] == report["task"] == "multi_label"
    assert config["problem_type"] == "multi_label_classification"
    assert summary["thresholds"] == meta["thresholds"] == config["loraship_thresholds"] == report["thresholds"]
    assert summary["thresholds"]["chosen_on"].startswith("validation")
    # Parity at every conversion with the sigmoid head (LoRA B non-zero from the start).
    assert report["merge"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    assert report["int8_search"]["task"] == "multi_label" and report["int8_search"]["metric"] == "f1_macro"
    ev = report["eval_file"]
    assert ev["task"] == "multi_label" and {"f1_macro", "f1_micro"} <= set(ev["onnx_fp32"])


def test_predict_and_eval_apply_the_thresholds_and_match_training(ml_exported: Path, ml_data: Path, tmp_path: Path) -> None:
    from serve_cli.__main__ import main as cli
    from serve_cli.runtime import OnnxClassifier, proba_in_order

    clf = OnnxClassifier(ml_exported, variant="fp32")
    rows = _test_rows(ml_data)
    probs = proba_in_order(clf, [r["text"] for r in rows])
    cut = clf.task.cut()
    out = tmp_path / "pred.jsonl"
    assert cli(["predict", "--model", str(ml_exported), "--variant", "fp32", "--input", str(ml_data / "test.jsonl"),
                "--output", str(out), "--quiet"]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["labels"] for p in preds] == [[n for n, on in zip(clf.labels, pr >= cut, strict=True) if on] for pr in probs]
    assert all(len(p["scores"]) == len(clf.labels) for p in preds)
    # The trainer's test metrics (same thresholds, PyTorch) equal serve_cli eval's (ONNX fp32).
    rep = tmp_path / "eval"
    assert cli(["eval", "--model", str(ml_exported), "--variant", "fp32", "--input", str(ml_data / "test.jsonl"),
                "--label-field", "labels", "--report-dir", str(rep), "--quiet"]) == 0
    m = json.loads((rep / "metrics.json").read_text())
    trained = json.loads((ml_exported.parent / "test_metrics.json").read_text())
    for k in ("f1_micro", "f1_macro", "f1_samples", "accuracy", "hamming_loss"):
        assert m[k] == pytest.approx(trained[k], abs=1e-9), k
    assert sorted(p.name for p in rep.iterdir()) == [".loraship", "metrics.json", "per_label_f1.png", "predictions.jsonl", "report.md"]
    assert "| label | threshold |" in (rep / "report.md").read_text()


def test_rows_below_every_threshold_get_no_label_and_count_as_missed(ml_exported: Path, ml_data: Path, tmp_path: Path) -> None:
    from sklearn.metrics import f1_score

    from serve_cli.__main__ import main as cli

    out = tmp_path / "pred.jsonl"
    assert cli(["predict", "--model", str(ml_exported), "--input", str(ml_data / "test.jsonl"), "--output", str(out),
                "--threshold", "1.01", "--quiet"]) == 0
    assert all(json.loads(x)["labels"] == [] for x in out.read_text().splitlines())
    rep = tmp_path / "eval"
    assert cli(["eval", "--model", str(ml_exported), "--input", str(ml_data / "test.jsonl"), "--label-field", "labels",
                "--report-dir", str(rep), "--threshold", "1.01", "--quiet"]) == 0
    m = json.loads((rep / "metrics.json").read_text())
    names = LabelMap(m["labels"])
    y = np.array([names.target(r["labels"], multi=True) for r in _test_rows(ml_data)])
    assert m["f1_micro"] == 0.0 == f1_score(y, np.zeros_like(y), average="micro", zero_division=0)
    empty = int((y.sum(1) == 0).sum())
    assert m["accuracy"] == pytest.approx(empty / len(y)), "rows without labels are right when nothing is predicted"


def test_http_gives_every_label_its_sigmoid_score_and_the_same_choice(ml_exported: Path, ml_data: Path, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from serve_cli.__main__ import main as cli
    from serve_cli.http import create_app
    from serve_cli.runtime import OnnxClassifier

    out = tmp_path / "pred.jsonl"
    assert cli(["predict", "--model", str(ml_exported), "--variant", "fp32", "--input", str(ml_data / "test.jsonl"),
                "--output", str(out), "--quiet"]) == 0
    want = [json.loads(x)["labels"] for x in out.read_text().splitlines()]
    texts = [r["text"] for r in _test_rows(ml_data)]
    with TestClient(create_app(OnnxClassifier(ml_exported, variant="fp32"))) as client:
        body = client.post("/predict", json={"inputs": texts}).json()
        info = client.get("/info").json()
    assert info["task"] == "multi_label" and info["thresholds"]["global"] > 0
    assert len(body[0]) == len(info["labels"]) and abs(sum(s["score"] for s in body[0]) - 1) > 1e-3
    assert [sorted(s["label"] for s in row if s["chosen"]) for row in body] == [sorted(w) for w in want]
