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


def _readme_commands() -> list[list[str]]:
    """Every trainer, export and serve_cli command line in the bash blocks of the README and docs/, as argv lists."""
    import re
    import shlex

    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("|")[-1].strip()  # `cat x | serve_cli ...`: the command after the pipe
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def test_every_readme_command_is_accepted_by_its_program() -> None:
    """The commands of the README and docs/ parse as written: known flags and values, config keys that exist, typed values."""
    from export.to_onnx import parse_args as export_args
    from serve_cli.__main__ import parse_args as serve_args
    from trainer.config import load_config
    from trainer.train import parse_args as train_args

    seen = {"train": 0, "export": 0, "serve_cli": 0}
    for argv in _readme_commands():
        if "trainer/train.py" in argv:
            args = train_args([a for a in argv[argv.index("trainer/train.py") + 1 :] if a != "[key=value" and a != "...]"])
            load_config(REPO / args.config if args.config else None, args.overrides)
            seen["train"] += 1
        elif argv[:3] == ["python", "-m", "export.to_onnx"]:
            export_args(argv[3:])
            seen["export"] += 1
        elif argv[0] == "serve_cli":
            serve_args(argv[1:])
            seen["serve_cli"] += 1
    assert seen["train"] >= 5 and seen["export"] >= 4 and seen["serve_cli"] >= 8, seen
