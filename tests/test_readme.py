from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_generated_sections_match_their_sources() -> None:
    res = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_results_section_shows_the_saved_figures() -> None:
    readme = (REPO / "benchmarks" / "README.md").read_text()
    section = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    for name in ("quality", "train_throughput", "inference"):
        path = REPO / "benchmarks" / "results" / f"{name}.json"
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            assert row["name"] in section


def test_readme_names_the_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/main_job.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_readme_links_the_generated_references() -> None:
    readme = (REPO / "README.md").read_text()
    assert "docs/config.md" in readme and "benchmarks/README.md#results" in readme
    assert "| `train.lr` |" in (REPO / "docs" / "config.md").read_text()
