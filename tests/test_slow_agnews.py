"""Slow end-to-end checks on the real packaged MiniLM and the AG News copy (run with -m slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LORASHIP_DATA_DIR", REPO.parent / "shared" / "data" / "agnews"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (DATA / "train.jsonl").is_file():
        pytest.skip(f"AG News not found in {DATA}")
    from trainer.train import main

    run = tmp_path_factory.mktemp("minilm") / "run"
    rc = main(["--config", str(REPO / "configs" / "agnews_minilm.yaml"), f"data.data_dir={DATA}", f"output.run_dir={run}",
               "data.max_train_samples=512", "train.max_steps=12", "data.test=", "train.eval_baseline=false",
               "train.save_every=0", "data.validation_fraction=0.02"])
    assert rc == 0
    return run


def test_real_model_export_parity_and_serve(minilm_run: Path, tmp_path: Path) -> None:
    from export.to_onnx import main as export_main
    from serve_cli.__main__ import main as serve_main

    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(DATA.joinpath("test.jsonl").read_text().splitlines(keepends=True)[:300]))
    assert export_main(["--run", str(minilm_run), "--eval-file", str(sample)]) == 0
    report = json.loads((minilm_run / "onnx" / "export_report.json").read_text())
    assert report["merge"]["max_abs_diff"] <= 1e-4 and report["parity_fp32"]["max_abs_diff"] <= 1e-4
    assert serve_main(["eval", "--model", str(minilm_run / "onnx"), "--input", str(sample), "--report-dir", str(tmp_path / "ev"),
                       "--variant", "fp32", "--quiet"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx(report["eval_file"]["onnx_fp32"]["accuracy"])
