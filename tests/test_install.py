"""scripts/install.sh on a Python that pyproject does not claim: one clear line, nothing installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO


def test_install_stops_with_one_line_on_an_older_python(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    # A python3 that is 3.10: answers the version question and would fail anything else.
    (fake / "python3").write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 3.10; exit 0; fi\nexit 3\n')
    (fake / "python3").chmod(0o755)
    res = subprocess.run(["bash", str(tmp_path / "scripts" / "install.sh"), "test"], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs Python >= 3.11" in lines[0] and "3.10" in lines[0], res.stderr
    assert not (tmp_path / ".venv").exists()


def test_pyproject_claims_what_the_code_uses() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
