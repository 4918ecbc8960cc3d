"""First run anywhere: the main job's data resolution without ../shared, training without --config, quiet output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_texts, write_jsonl

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def resolve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LORASHIP_DATA_DIR", "FULL")}
    cmd = [sys.executable, str(REPO / "scripts" / "agnews_data.py"), "--shared", str(tmp_path / "no-shared"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**base, **env}, timeout=300)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local directory laid out as the hub's fancyzhx/ag_news: data/{train,test}-*.parquet, ClassLabel 0..3."""
    import datasets

    d = tmp_path_factory.mktemp("fake_hub")
    (d / "data").mkdir()
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})
    for split, n, seed in (("train", 80, 1), ("test", 20, 2)):
        rows = make_texts(n, seed=seed)
        datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [NAMES.index(y) for _, y in rows]}, features=features) \
            .to_parquet(str(d / "data" / f"{split}-00000-of-00001.parquet"))
    return d


def test_without_shared_data_the_hub_copy_is_used(fake_hub: Path, tmp_path: Path) -> None:
    res = resolve(tmp_path, "--hub", str(fake_hub))
    assert res.returncode == 0, res.stderr
    out = Path(res.stdout.strip())
    assert out == tmp_path / "out"
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 80 and len(test) == 20
    assert {r["label"] for r in train} == set(NAMES), "labels 0..3 are mapped to their names"
    assert "loading" in res.stderr
    # Reused on the second run, and readable by the trainer as it is.
    again = resolve(tmp_path, "--hub", str(fake_hub))
    assert again.returncode == 0 and again.stdout == res.stdout
    from trainer.data import load_rows

    assert len(load_rows(str(out / "train.jsonl"), "text", "label").texts) == 80


def test_the_hub_train_split_is_sampled_stratified_unless_full(fake_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import agnews_data
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(agnews_data, "SHARED_TRAIN_ROWS", 40)
    out = agnews_data.from_hub(str(fake_hub), tmp_path / "s", full=False)
    labels = [json.loads(x)["label"] for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(labels) == 40 and all(labels.count(n) == 10 for n in NAMES)
    again = agnews_data.from_hub(str(fake_hub), tmp_path / "s2", full=False)
    assert (again / "train.jsonl").read_text() == (out / "train.jsonl").read_text(), "seeded"
    full = agnews_data.from_hub(str(fake_hub), tmp_path / "f", full=True)
    assert len((full / "train.jsonl").read_text().splitlines()) == 80


def test_no_data_anywhere_is_one_clear_message(tmp_path: Path) -> None:
    res = resolve(tmp_path, "--hub", "fancyzhx/ag_news", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert res.returncode == 1 and res.stdout == ""
    assert "AG News not found" in res.stderr and "Provide it one of three ways" in res.stderr
    for way in ("LORASHIP_DATA_DIR=", str(tmp_path / "no-shared"), "fancyzhx/ag_news"):
        assert way in res.stderr
    assert "Traceback" not in res.stderr


def test_data_dir_env_comes_first(toy_data: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", make_texts(8, seed=1))
    write_jsonl(tmp_path / "d" / "test.jsonl", make_texts(8, seed=2))
    res = resolve(tmp_path, "--hub", "/nonexistent", LORASHIP_DATA_DIR=str(tmp_path / "d"))
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "d")


def test_main_job_resolves_data_through_the_script() -> None:
    text = (REPO / "scripts" / "main_job.sh").read_text()
    assert "scripts/agnews_data.py" in text and "main_job_summary.py" in text


def test_train_on_a_csv_without_a_config(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.train import main

    rows = make_texts(40, seed=4)
    (tmp_path / "reviews.csv").write_text("review,stars\n" + "".join(f"{t},{y}\n" for t, y in rows))
    monkeypatch.chdir(tmp_path)
    assert main(["data.train=reviews.csv", "data.text_field=review", "data.label_field=stars", f"model.name_or_path={tiny_bert}",
                 "train.max_steps=3", "data.max_length=32", "output.tensorboard=false"]) == 0
    run = tmp_path / "runs" / "reviews"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["labels"] == sorted(NAMES)


def _quiet_run(tiny_bert: Path, toy_data: Path, run: Path, *flags: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LORASHIP_VERBOSE", None)
    train = subprocess.run([sys.executable, str(REPO / "trainer" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"), *flags,
                            f"model.name_or_path={tiny_bert}", f"data.data_dir={toy_data}", f"output.run_dir={run}", "train.max_steps=3"],
                           capture_output=True, text=True, env=env, timeout=300)
    export = subprocess.run([sys.executable, "-m", "export.to_onnx", "--run", str(run), *flags], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert train.returncode == 0 and export.returncode == 0, train.stderr[-2000:] + export.stderr[-2000:]
    # Progress bars are carriage-return lines; everything else is what a user reads.
    return "\n".join(line.split("\r")[-1] for line in (train.stdout + train.stderr + export.stdout + export.stderr).splitlines())


def test_training_and_export_print_no_third_party_warnings(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    out = _quiet_run(tiny_bert, toy_data, tmp_path / "quiet")
    for noise in ("Warning", "warn(", "Some weights of", "torch_dtype", "newly initialized", "pre-processing before quantization"):
        assert noise not in out, f"{noise!r} in:\n{out}"
    loud = _quiet_run(tiny_bert, toy_data, tmp_path / "loud", "--verbose")
    assert "Some weights of" in loud and "TracerWarning" in loud
